"""Multi-threaded processes: every thread frozen, carried and recreated with its exact tid
(glibc caches tids), mutexes, condition variables and barriers (futexes) working after resume,
and each thread's own state (registers, TLS base, signal mask, rseq, robust list) intact."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from migration import Cleanup, helper_processes, needs_root, ns_pids, wait_for_line
from workloads import (compare_with_reference, last_iteration, start_workload,
                       wait_for_iteration)

from prerestore.migrate import migrate
from prerestore.policy import ConvergencePolicy

pytestmark = needs_root
HERE = os.path.dirname(__file__)
POLICY = ConvergencePolicy(min_rounds=3, max_rounds=4)


@pytest.fixture(scope="module")
def threads_bin(tmp_path_factory):
    out = tmp_path_factory.mktemp("threads") / "threads"
    subprocess.run(["cc", "-O2", "-pthread", "-o", str(out),
                    os.path.join(HERE, "workloads", "threads.c")], check=True)
    return out


def ns_tid(pid: int, task: str) -> int | None:
    """The tid a thread of the restored process sees, or None if it has exited meanwhile
    (with CHURN, helper threads come and go after the resume too)."""
    try:
        return ns_pids(f"{pid}/task/{task}")[-1]
    except (FileNotFoundError, ProcessLookupError):
        return None


def run(argv, tmp_path, cold: bool, env=None):
    log = tmp_path / "out.log"
    src = start_workload(argv, log, env=env)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 200, pid=src.pid)
        tids = sorted(int(t) for t in os.listdir(f"/proc/{src.pid}/task"))
        r = migrate(src.pid, cold=cold, policy=POLICY, work_dir=str(tmp_path / "images"))
        host = r["restored_host_pid"]
        cleanup.add(r["namespace_init_pid"], host)
        src.wait(10)
        restored = sorted(tid for tid in (ns_tid(host, t) for t in os.listdir(f"/proc/{host}/task"))
                          if tid is not None)
        if env is None:
            assert restored == tids                  # every thread, with its own tid
        else:
            assert set(tids) - set(restored) <= set(tids[1:]) and len(restored) >= 9
        it = last_iteration(log)
        wait_for_iteration(log, it + 300, timeout=60, pid=host)
        os.kill(host, signal.SIGUSR1)
        assert wait_for_line(log, "SIGUSR1 count=1")
        assert "tids=BAD" not in open(log).read()
        assert compare_with_reference(log, argv, env=env) >= (it + 300) // 100
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)
        assert not helper_processes(src.pid)


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
@pytest.mark.parametrize("mode", ["sleep", "busy"])
def test_pthreads(threads_bin, tmp_path, mode, cold):
    run([threads_bin, mode], tmp_path, cold)


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
@pytest.mark.parametrize("mode", ["sleep", "busy"])
def test_python_threads_with_queues(tmp_path, mode, cold):
    run([sys.executable, os.path.join(HERE, "workloads", "pythreads.py"), mode], tmp_path, cold)


@pytest.mark.parametrize("mode", ["sleep", "busy"])
def test_threads_come_and_go_during_the_rounds(threads_bin, tmp_path, mode):
    """A helper thread is born and joined every 50 rounds: the staged husk creates and ends
    threads as the rounds show them; finalize fixes up the rest."""
    run([threads_bin, mode], tmp_path, False, env={"CHURN": "1"})
