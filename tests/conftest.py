import sys
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from workloads import build_workloads  # noqa: E402


@pytest.fixture(scope="session")
def workload_bins(tmp_path_factory):
    """{"counters": Path to built binary, "pycounters": Path to script}."""
    return build_workloads(tmp_path_factory.mktemp("workload_bins"))
