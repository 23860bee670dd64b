"""Exact or refused: the state of memory mappings comes back as it was (tests/workloads/
memstate.c checks it itself, reading its own /proc/self/smaps), by pre-restore and cold
restore, on one host and through image files; --verify (PRERESTORE_VERIFY, set by conftest)
compares every mapping's VmFlags too."""
from __future__ import annotations

import pytest

from migration import move_and_compare, needs_root

HOW = [pytest.param(False, True, id="prerestore-direct"),
       pytest.param(True, True, id="cold-direct"),
       pytest.param(False, False, id="prerestore-files"),
       pytest.param(True, False, id="cold-files")]


@needs_root
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


@needs_root
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cold,direct", HOW)
def test_mapping_flags(cbin, tmp_path, mode, cold, direct):
    """Each mode's VmFlags come back on the same areas (the workload checks its own smaps,
    and what the flags do; --verify compares every area's VmFlags)."""
    move_and_compare(tmp_path, [cbin("memstate"), mode, str(tmp_path)], direct=direct,
                     cold=cold, warm_up=100, more=200)


@needs_root
@pytest.mark.parametrize("cold", [False, True], ids=["prerestore", "cold"])
def test_mappings_of_a_deleted_file_on_one_host(cbin, tmp_path, cold):
    """A file deleted while mapped (privately, and shared): on one host the husk maps the very
    file (it has no name left to open)."""
    move_and_compare(tmp_path, [cbin("memstate"), "deleted", str(tmp_path)], direct=True,
                     cold=cold, warm_up=100, more=200)


@needs_root
def test_mappings_of_a_deleted_file_are_refused_between_hosts(cbin, tmp_path):
    """Through image files the deleted file's content is not carried yet: refused by name,
    the source untouched."""
    _refused_and_untouched(tmp_path, [cbin("memstate"), "deleted", str(tmp_path)],
                           r"pid \d+: mapping 0x[0-9a-f]+-0x[0-9a-f]+ of a deleted file "
                           r".*memstate-deleted.bin \(deleted\) \(carried on one host only\)",
                           direct=False)


@needs_root
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


# ---- the parts alone ------------------------------------------------------------------------

SMAPS = b"""\
00400000-00401000 r--p 00000000 08:01 12 /bin/x
Size:                  4 kB
VmFlags: rd mr mw me ac
00401000-00402000 rw-p 00000000 00:00 0
Size:                  4 kB
VmFlags: rd wr mr mw me ac dd lo
00402000-00403000 rw-p 00000000 00:00 0
VmFlags: rd wr mr mw me nr
00403000-00404000 r--s 00000000 08:01 13 /data/shared file
VmFlags: rd mr mw me ms
00404000-00405000 rw-p 00000000 00:00 0
VmFlags: rd wr mr mw me ac
"""


def test_vmflags_read_from_smaps_are_those_a_plain_mapping_lacks():
    from prerestore.kernel import procfs, vmflags
    from prerestore.model import VMFLAG_BITS as B
    layout = procfs.parse_maps(b"\n".join(line for line in SMAPS.splitlines()
                                          if line[:1].isdigit()))
    got = vmflags.carried(layout, vmflags.parse(SMAPS))
    # RELRO-like read-only area still charged; madvised and locked; MAP_NORESERVE; a shared
    # read-only mapping whose file is open for writing; the plain one: nothing to carry
    assert got == [(0x400000, 0x401000, B["ac"] | B["mw"]),
                   (0x401000, 0x402000, B["ac"] | B["mw"] | B["dd"] | B["lo"]),
                   (0x402000, 0x403000, B["mw"] | B["nr"]),
                   (0x403000, 0x404000, B["mw"])]


def test_vmflags_in_an_image_are_validated():
    from prerestore.image import schema
    from prerestore.model import AddressSpaceRound, Round
    task = AddressSpaceRound(pid=5, layout=[], vmflags=[(0x1000, 0x2000, 64)])
    r = Round(id="x", index=0, parent_id=None, parent_path=None, kind="predump", source={},
              tasks=[task], states=[], zombies=[], stats={})
    data = schema.encode_image(r)
    assert schema.decode_image(data, "test").tasks[0].vmflags == [(0x1000, 0x2000, 64)]
    for bad, why in (([0x1000, 0x1800, 64], "page-aligned"), ([0x1000, 0x2000, 1 << 12], "int"),
                     ([0x2000, 0x1000, 0], "page-aligned")):
        task.vmflags = [tuple(bad)]
        with pytest.raises(Exception, match=why):
            schema.decode_image(schema.encode_image(r), "test")


def test_vmflags_of_a_changed_layout_are_inherited_or_read_again():
    """The final step does not read smaps for areas that grew or were cut (they keep the flags
    of what they came from); a new area makes it read them."""
    from prerestore.kernel import procfs, vmflags
    from prerestore.model import VMFLAG_BITS as B
    old_maps = (b"00400000-00402000 rw-p 00000000 00:00 0\n"       # MAP_NORESERVE, 2 pages
                b"00500000-00501000 r--p 00000000 08:01 12 /bin/x\n"
                b"00600000-00601000 rw-p 00000000 00:00 0 [heap]\n")
    old = [(0x400000, 0x402000, B["mw"] | B["nr"]), (0x500000, 0x501000, B["mw"] | B["ac"])]
    # the NORESERVE area cut by mprotect, the heap grown: nothing new
    new_maps = (b"00400000-00401000 r--p 00000000 00:00 0\n"
                b"00401000-00402000 rw-p 00000000 00:00 0\n"
                b"00500000-00501000 r--p 00000000 08:01 12 /bin/x\n"
                b"00600000-00640000 rw-p 00000000 00:00 0 [heap]\n")
    got = vmflags.inherited(procfs.parse_maps(old_maps), old, procfs.parse_maps(new_maps))
    assert got == [(0x400000, 0x401000, B["mw"] | B["nr"]),
                   (0x401000, 0x402000, B["mw"] | B["nr"]),
                   (0x500000, 0x501000, B["mw"] | B["ac"])]
    # a new mapping: only smaps can tell its flags
    assert vmflags.inherited(procfs.parse_maps(old_maps), old, procfs.parse_maps(
        new_maps + b"00700000-00701000 rw-p 00000000 00:00 0\n")) is None
