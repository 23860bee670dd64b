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


MODES = [
    pytest.param("madvise", id="madvise"),      # dd dc wf hg nh mg, MAP_NORESERVE
    pytest.param("mayshare", id="mayshare"),    # a shared mapping of a file open read-write
    pytest.param("mlock", id="mlock"),          # mlock, mlock2(MLOCK_ONFAULT)
    pytest.param("mlockall", id="mlockall"),    # mlockall(MCL_CURRENT | MCL_FUTURE)
    pytest.param("mlockall-onfault", id="mlockall-onfault"),   # ... | MCL_ONFAULT
    pytest.param("droppable", id="droppable"),  # MAP_DROPPABLE
    pytest.param("shmem", id="shmem"),          # MAP_SHARED memfd and /dev/zero
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cold,direct", HOW)
def test_mapping_flags(cbin, tmp_path, mode, cold, direct):
    """Each mode's VmFlags come back on the same areas (the workload checks its own smaps,
    and what the flags do; --verify compares every area's VmFlags)."""
    move_and_compare(tmp_path, [cbin("memstate"), mode, str(tmp_path)], direct=direct,
                     cold=cold, warm_up=100, more=200)


@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
def test_mappings_of_a_deleted_file_on_one_host(cbin, tmp_path, cold):
    """A file deleted while mapped (privately, and shared): on one host the husk maps the very
    file (it has no name left to open)."""
    move_and_compare(tmp_path, [cbin("memstate"), "deleted", str(tmp_path)], direct=True,
                     cold=cold, warm_up=100, more=200)


def test_mappings_of_a_deleted_file_are_refused_between_hosts(cbin, tmp_path):
    """Through image files the deleted file's content is not carried yet: refused by name,
    the source untouched."""
    _refused_and_untouched(tmp_path, [cbin("memstate"), "deleted", str(tmp_path)],
                           r"pid \d+: mapping 0x[0-9a-f]+-0x[0-9a-f]+ of a deleted file "
                           r".*memstate-deleted.bin \(deleted\) \(carried on one host only\)",
                           direct=False)


@pytest.mark.parametrize("cold,direct", HOW)
def test_no_vdso(cbin, tmp_path, cold, direct):
    """A program that unmapped its [vdso] and [vvar] comes back without them (the calls
    injected into the source run from the zero-filled end of its own code instead)."""
    move_and_compare(tmp_path, [cbin("memstate"), "novdso"], direct=direct, cold=cold,
                     warm_up=100, more=200)


def _refused_and_untouched(tmp_path, argv, match, direct):
    import re
    from prerestore.errors import UnsupportedState
    from prerestore.migrate import migrate
    from migration import Cleanup
    from workloads import last_iteration, start_workload, wait_for_iteration
    log = tmp_path / "out.log"
    src = start_workload(argv, log)
    try:
        wait_for_iteration(log, 100, pid=src.pid)
        for cold in (False, True):
            try:
                r = migrate(src.pid, cold=cold, direct=direct,
                            work_dir=str(tmp_path / f"images-{cold}"))
            except UnsupportedState as e:
                assert re.search(match, str(e)), str(e)
                assert str(src.pid) in str(e)
            else:
                cleanup = Cleanup()
                cleanup.add(r["namespace_init_pid"], r["restored_host_pid"])
                cleanup.run()
                pytest.fail(f"not refused: {match}")
        wait_for_iteration(log, last_iteration(log) + 100, pid=src.pid)     # untouched
        assert "BAD" not in log.read_text()
    finally:
        src.kill()
        src.wait(10)
