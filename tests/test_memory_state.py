"""Exact or refused: the state of memory mappings comes back as it was (tests/workloads/
memstate.c checks it itself, reading its own /proc/self/smaps), by pre-restore and cold
restore, on one host and through image files; --verify (PRERESTORE_VERIFY, set by conftest)
compares every mapping's VmFlags too."""
from __future__ import annotations

import pytest

from migration import move_and_compare, needs_root

pytestmark = needs_root

HOW = [pytest.param(False, True, id="prerestore-direct"),
       pytest.param(True, True, id="cold-direct"),
       pytest.param(False, False, id="prerestore-files"),
       pytest.param(True, False, id="cold-files")]


@pytest.mark.parametrize("cold,direct", HOW)
def test_many_small_areas(cbin, tmp_path, cold, direct):
    """20000 one-page areas that cannot merge (their batches are split to fit the husk's
    scratch area), each with its own content."""
    move_and_compare(tmp_path, [cbin("memstate"), "many", str(tmp_path)], direct=direct, cold=cold,
                     warm_up=100, more=200)


@pytest.mark.parametrize("cold,direct", HOW)
def test_no_vdso(cbin, tmp_path, cold, direct):
    """A program that unmapped its [vdso] and [vvar] comes back without them."""
    move_and_compare(tmp_path, [cbin("memstate"), "novdso"], direct=direct, cold=cold,
                     warm_up=100, more=200)
