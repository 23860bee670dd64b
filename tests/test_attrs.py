"""Exact or refused: scheduling and process attributes come back as they were. zdtm-like: each
workload sets one kind of state up, checks it itself every iteration (printing BAD and exiting
if it changed), and its output is compared with an unmigrated run's; by pre-restore and cold
restore, on one host (objects handed over) and through image files."""
from __future__ import annotations

import pytest

from migration import move_and_compare, needs_root

pytestmark = needs_root

HOW = [pytest.param(False, True, id="prerestore-direct"),
       pytest.param(True, True, id="cold-direct"),
       pytest.param(False, False, id="prerestore-files"),
       pytest.param(True, False, id="cold-files")]


@pytest.mark.parametrize("cold,direct", HOW)
def test_scheduling_and_process_attributes(cbin, tmp_path, cold, direct):
    """Each thread's policy (OTHER with reset-on-fork and nice 3, BATCH at nice 7 pinned to
    CPU 0, IDLE, FIFO at priority 3) and CPUs; oom_score_adj, personality, THP disabled."""
    move_and_compare(tmp_path, [cbin("schedattrs")], direct=direct, cold=cold, warm_up=200,
                     more=300)


@pytest.mark.parametrize("cold,direct", HOW)
def test_posix_and_interval_timers(cbin, tmp_path, cold, direct):
    """Timers keep their ids, clocks, signals, values, target thread and intervals, and go
    on firing: ITIMER_REAL, a process-directed and a thread-directed periodic POSIX timer, a
    one-shot one due in an hour and one never armed."""
    move_and_compare(tmp_path, [cbin("timers")], direct=direct, cold=cold, warm_up=200,
                     more=300)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("cold,direct", HOW)
def test_a_stopped_process_comes_back_stopped(cbin, tmp_path, cold, direct):
    """Stopped by SIGSTOP (as job control does) when migrated: the restored process is
    stopped too, and SIGCONT lets it go on as if it had never moved."""
    import os
    import signal
    import time

    from migration import Cleanup
    from prerestore.migrate import migrate
    from prerestore.policy import ConvergencePolicy
    from workloads import (compare_with_reference, last_iteration, start_workload,
                           wait_for_iteration)
    argv = [cbin("schedattrs")]
    log = tmp_path / "out.log"
    src = start_workload(argv, log)
    cleanup = Cleanup()
    try:
        wait_for_iteration(log, 200, pid=src.pid)
        os.kill(src.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while _state(src.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        r = migrate(src.pid, cold=cold, direct=direct, work_dir=str(tmp_path / "images"),
                    policy=ConvergencePolicy(min_rounds=2, max_rounds=3))
        host = r["restored_host_pid"]
        cleanup.add(r["namespace_init_pid"], host)
        src.wait(10)
        it = last_iteration(log)
        time.sleep(0.5)
        assert _state(host) == "T", "the restored process runs: it was stopped"
        assert last_iteration(log) == it
        os.kill(host, signal.SIGCONT)
        wait_for_iteration(log, it + 300, timeout=60, pid=host)
        assert "BAD" not in log.read_text()
        assert compare_with_reference(log, argv) >= 3
    finally:
        cleanup.run()
        src.kill()
        src.wait(10)


@pytest.mark.parametrize("cold,direct", HOW)
def test_threads_with_credentials_of_their_own(cbin, tmp_path, cold, direct):
    """A thread with its own uids and gids, another with only its file system ids changed:
    each comes back with its own (they were refused before)."""
    move_and_compare(tmp_path, [cbin("threadcreds")], direct=direct, cold=cold, warm_up=200,
                     more=300)
