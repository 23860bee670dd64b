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
