"""Unix sockets beyond socketpairs: bound to paths (relative too) and abstract names, listening
with connections waiting in the accept queue, connections accepted from them, datagram
sockets with queued datagrams and their senders' names, seqpacket records, half-closed and
peer-closed connections. Carried on one host (the same objects handed over) and through
image files, as between hosts (made anew from the image); compared line by line with an
unmigrated run. A connection to a peer outside the tree is refused by name unless declared
external."""
from __future__ import annotations

import os
import socket
import stat
import sys
import threading
import time

import pytest

from migration import Cleanup, needs_root, prerestore
from workloads import (WORKLOAD_DIR, compare_with_reference, last_iteration, start_workload,
                       wait_for_iteration)

from prerestore.errors import UnsupportedState
from prerestore.migrate import migrate
from prerestore.policy import ConvergencePolicy

pytestmark = needs_root
POLICY = ConvergencePolicy(min_rounds=2, max_rounds=3)


def unix_argv(work, direct: bool) -> list:
    # through image files on this host, the workload keeps its abstract names in a network
    # namespace of its own: the frozen source holds them until the restored tree runs
    return [sys.executable, WORKLOAD_DIR / "unixsockets.py", work] + \
        ([] if direct else ["--own-netns"])


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "via-files"])
def test_unix_sockets_of_every_kind(tmp_path, direct, cold):
    work = tmp_path / "run"
    work.mkdir()
    argv = unix_argv(work, direct)
    log = tmp_path / "out.log"
    src = start_workload(argv, log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 300, pid=src.pid)
        r = migrate(src.pid, cold=cold, direct=direct, work_dir=str(tmp_path / "images"),
                    policy=POLICY)
        host = r["restored_host_pid"]
        cleanup.add(r["namespace_init_pid"], host)
        src.wait(10)
        it = last_iteration(log)
        # REQ_STREAM is 20: 500 turns make 25 new connections to the restored listeners
        wait_for_iteration(log, it + 500, timeout=60, pid=host)
        assert "BAD" not in open(log).read()
        assert sorted(os.listdir(work)) == ["client.sock", "dgram.sock", "leftover.sock",
                                            "stream.sock"]
        ref = tmp_path / "ref"
        ref.mkdir()
        assert compare_with_reference(log, unix_argv(ref, direct)) >= (it + 500) // 100
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)
