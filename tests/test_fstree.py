"""Exact or refused: the file system view and the fd table. zdtm-like: each workload sets
one kind of state up, checks it itself every iteration (printing BAD and exiting if it
changed), and its output is compared with an unmigrated run's; by pre-restore and cold
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
def test_more_fds_than_one_scm_rights_message(cbin, tmp_path, cold, direct):
    """1200 pipe and socket fds (500 pipes, 100 socketpairs, each with a byte queued, under a
    raised RLIMIT_NOFILE): more than the 253 one SCM_RIGHTS message carries to the husk."""
    move_and_compare(tmp_path, [cbin("manyfds")], direct=direct, cold=cold, warm_up=200,
                     more=300)
