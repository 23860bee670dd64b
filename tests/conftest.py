import os
import sys
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from workloads import build_workloads  # noqa: E402

# Every migration in the tests is checked before the restored tree may run (the stage,
# tracker and serve daemons inherit this): page by page against the frozen source on one
# host (prerestore.restore.staged), and by what /proc shows of the source and the husks
# everywhere (prerestore.restore.verify, --verify): a page or a field the restore failed to
# carry fails the migration, and the test, at once.
os.environ.setdefault("PRERESTORE_VERIFY", "1")


@pytest.fixture(scope="session")
def workload_bins(tmp_path_factory):
    """{"counters": Path to built binary, "pycounters": Path to script}."""
    return build_workloads(tmp_path_factory.mktemp("workload_bins"))


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """Fail a test that leaves a process of its trees running or stopped: every process it
    started or restored, and their descendants (tests/leftovers.py). They are killed first,
    so that later tests do not inherit them."""
    import leftovers
    leftovers.reset()
    yield
    left = leftovers.left_behind()
    leftovers.reset()
    assert not left, "processes left behind (killed now):\n" + "\n".join(left)


@pytest.fixture
def cleanup():
    """Processes, stage daemons and sources a test owns; all gone at its end, or it fails."""
    from migration import Cleanup, helper_processes
    c = Cleanup()
    yield c
    c.run()
    for src in c.sources:
        assert not helper_processes(src), f"a husk or namespace init of {src} was left behind"


@pytest.fixture(scope="session")
def cbin(tmp_path_factory):
    """cbin("name"): tests/workloads/name.c built once for the session (-pthread); its path."""
    import subprocess
    from workloads import WORKLOAD_DIR
    out_dir = tmp_path_factory.mktemp("cbins")
    built = {}

    def build(name: str):
        if name not in built:
            out = out_dir / name
            subprocess.run(["cc", "-O2", "-Wall", "-pthread", "-o", str(out),
                            str(WORKLOAD_DIR / f"{name}.c")], check=True)
            built[name] = out
        return built[name]
    return build
