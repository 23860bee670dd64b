"""Exact or refused: System V IPC (shared memory segments, semaphore sets, message queues)
comes back with its ids, keys, owners, modes and contents, in the IPC namespace the tree had
(a new one made for it, or on one host the very one), by pre-restore and cold restore, on one
host and through image files. zdtm-like: each workload checks its objects itself through the
ids it holds; its output is compared with an unmigrated run's."""
from __future__ import annotations

import os
import subprocess

import pytest

from migration import move_and_compare, needs_root

pytestmark = needs_root

HOW = [pytest.param(False, True, id="prerestore-direct"),
       pytest.param(True, True, id="cold-direct"),
       pytest.param(False, False, id="prerestore-files"),
       pytest.param(True, False, id="cold-files")]


def _ipcs() -> str:
    """The host namespace's objects, as ipcs lists them (ids and owners)."""
    return subprocess.run(["ipcs"], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def no_ipc_left():
    """The test leaves no System V object behind in the host's namespace."""
    before = _ipcs()
    yield
    assert _ipcs() == before, "System V IPC objects left behind"


def _ipc_ns(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/ipc").st_ino


@pytest.mark.parametrize("place", ["own", "host"])
@pytest.mark.parametrize("cold,direct", HOW)
def test_shared_memory_segments(cbin, tmp_path, no_ipc_left, cold, direct, place):
    """A parent and its child share a segment and count in it, one removed while attached,
    one made by another uid, attached in three pieces by the child; with an IPC namespace
    of its own, one attached by nobody keeps its content. Ids, keys, owners, creators, modes,
    sizes and attachments come back."""
    def check(host, _log):
        # own: a new namespace (through images) or the source's own one (on one host);
        # host: ours on one host (the very segments), else a new one (the frozen source
        # still holds the ids here)
        assert (_ipc_ns(host) == _ipc_ns(os.getpid())) == (place == "host" and direct)

    move_and_compare(tmp_path, [cbin("sysvshm"), place], direct=direct, cold=cold,
                     warm_up=200, more=300, check=check)
