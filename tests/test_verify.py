"""--verify: what /proc shows of the restored tree is compared with the frozen source before
the tree is let go; a difference rolls the migration back, naming the field."""
from __future__ import annotations

import json
import os

import pytest

from migration import helper_processes, needs_root, prerestore

from prerestore.errors import ImageError, RestoreError
from prerestore.image import schema
from prerestore.kernel import visible
from prerestore.migrate import migrate
from prerestore.model import VisibleState
from prerestore.restore import verify



# ---- the comparison alone ------------------------------------------------------------------

def _state(**fields) -> VisibleState:
    base = {"status.SigCgt": "0000000000004000", "limits[Max open files]": "1024 4096",
            "fd[3].link": "pipe:[1234]", "fd[3].ino": "1234",
            "maps[1000-2000].perms": "rw-p", "maps[1000-2000].path": "",
            "maps[1000-2000].offset": "00000001", "maps[1000-2000].vmflags": "rd wr mr mw me ac"}
    return VisibleState(10, base | fields, {11: {"status.SigBlk": "0000000000000000"}})


def test_equal_trees_have_no_difference():
    assert verify.compare([_state()], [_state()]) == []


def test_a_differing_field_is_named_with_both_values():
    diffs = verify.compare([_state()], [_state(**{"limits[Max open files]": "1023 4096"})])
    assert [(d.pid, d.thread, d.field, d.source, d.restored) for d in diffs] == \
        [(10, 0, "limits[Max open files]", "1024 4096", "1023 4096")]
    with pytest.raises(RestoreError, match=r"pid 10 limits\[Max open files\]: source "
                                           r"'1024 4096', restored '1023 4096'"):
        verify.check([_state()], [_state(**{"limits[Max open files]": "1023 4096"})])


def test_thread_fields_and_missing_threads_are_compared():
    src, dst = _state(), _state()
    dst.threads[11]["status.SigBlk"] = "0000000000000001"
    dst.threads[12] = {}
    got = {(d.thread, d.field) for d in verify.compare([src], [dst])}
    assert got == {(11, "status.SigBlk"), (12, "thread")}


def test_legit_differences_are_not_reported():
    # a remade pipe's inode, an anonymous area's page offset, the tracker's uffd-wp flag,
    # a husk waiting in the gate cgroup, a pty made anew with another number
    src = _state(**{"maps[1000-2000].vmflags": "rd wr mr mw me ac uw", "cgroup[0:]": "/a",
                    "fd[4].link": "/dev/pts/3"})
    dst = _state(**{"fd[3].link": "pipe:[99]", "fd[3].ino": "99",
                    "maps[1000-2000].offset": "00000777", "cgroup[0:]": "/a/prerestore-gate-5",
                    "fd[4].link": "/dev/pts/8"})
    assert verify.compare([src], verify.place_cgroups([dst], {10: "/a"})) == []


def test_cgroup_is_compared_where_the_husk_goes():
    # a husk waits in the gate; compared is the cgroup it goes to when it leaves it: another
    # cgroup than its source's is a difference, and so is the gate itself, unplaced
    src = _state(**{"cgroup[0:]": "/a"})
    placed = verify.place_cgroups([_state(**{"cgroup[0:]": "/prerestore-gate-5"})], {10: "/b"})
    assert [str(d) for d in verify.compare([src], placed)] == [
        "pid 10 cgroup[0:]: source '/a', restored '/b'"]
    unplaced = _state(**{"cgroup[0:]": "/a/prerestore-gate-5"})
    assert [d.field for d in verify.compare([src], [unplaced])] == ["cgroup[0:]"]


@pytest.fixture
def nh_gap(monkeypatch):
    """A flag taken as a gap (MADV_NOHUGEPAGE was one until it was carried): the comparison's
    handling of gaps, whichever state is one today."""
    monkeypatch.setitem(verify.KNOWN_GAPS, "maps.vmflag.nh", "madvise(MADV_NOHUGEPAGE)")


def test_known_gaps_are_returned_not_raised(nh_gap):
    src = _state(**{"maps[1000-2000].vmflags": "rd wr mr mw me ac nh"})
    gaps = verify.check([src], [_state()])
    assert gaps == ["pid 10 maps[1000-2000].vmflag.nh: source 'nh', restored (none)"]
    assert all(verify.field_kind(g.split()[2].rstrip(":")) in verify.KNOWN_GAPS for g in gaps)


def test_areas_split_by_a_gap_flag_are_compared_as_merged(nh_gap):
    # the source's area is two VMAs (one half madvised), the husk's one: a gap, not a
    # missing mapping
    src = _state(**{"maps[2000-3000].perms": "rw-p", "maps[2000-3000].path": "",
                    "maps[2000-3000].vmflags": "rd wr mr mw me ac nh"})
    dst = _state()
    dst.fields = {k.replace("1000-2000", "1000-3000"): v for k, v in dst.fields.items()}
    diffs = verify.compare([src], [dst])
    assert [verify.field_kind(d.field) for d in diffs] == ["maps.vmflag.nh"]


def test_a_stack_in_two_parts_is_compared_as_one():
    """A forked process's stack can be two VMAs on the destination (the part inherited from
    its parent's husk and the part made for it have different anon_vmas, so the kernel does
    not merge them): only the part holding the stack's start is named [stack]."""
    flags = "rd wr mr mw me gd ac"
    src = _state(**{"maps[7000-9000].perms": "rw-p", "maps[7000-9000].path": "[stack]",
                    "maps[7000-9000].vmflags": flags})
    dst = _state(**{"maps[7000-8000].perms": "rw-p", "maps[7000-8000].path": "",
                    "maps[7000-8000].vmflags": flags,
                    "maps[8000-9000].perms": "rw-p", "maps[8000-9000].path": "[stack]",
                    "maps[8000-9000].vmflags": flags})
    assert verify.compare([src], [dst]) == []
    dst.fields["maps[7000-8000].perms"] = "r--p"          # not the same memory any more
    assert verify.compare([src], [dst])


def test_snapshot_travels_in_the_image():
    from test_image import make_round
    snap = visible.snapshot_tree([os.getpid()])
    assert snap[0].fields["comm"] and snap[0].threads
    assert any(k.startswith("maps[") for k in snap[0].fields)
    assert "status.SigBlk" in next(iter(snap[0].threads.values()))
    r = make_round(final=True)
    r.visible = snap
    assert schema.decode_image(schema.encode_image(r), "x").visible == snap
    assert schema.decode_image(schema.encode_image(make_round(final=True)), "x").visible == []
    m = schema.encode_round(r)
    m["visible"] = [[snap[0].pid, {"comm": 5}, {}]]
    with pytest.raises(ImageError, match=r"visible\[0\]\[1\]\['comm'\]"):
        schema.decode_round(m)


def test_modes(monkeypatch):
    for value, want in (("", set()), ("0", set()), ("pages", {"pages"}), ("proc", {"proc"}),
                        ("1", {"pages", "proc"})):
        monkeypatch.setenv("PRERESTORE_VERIFY", value)
        assert visible.modes() == want


# ---- a migration that verifies ---------------------------------------------------------------

# the same counters workload, fixture and check as the failure tests (test_failures.py)
from test_failures import POLICY, source  # noqa: E402,F401  (source: a fixture)
from test_failures import assert_source_intact as _intact  # noqa: E402


@needs_root
@pytest.mark.parametrize("what, field", [("rlimit", r"limits\[Max open files\]"),
                                         ("nice", r"thread \d+ stat.nice")])
def test_a_differing_field_rolls_the_migration_back(source, tmp_path, monkeypatch, what,
                                                    field):
    src, log, argv = source
    monkeypatch.setenv("PRERESTORE_VERIFY", "0")        # asked by --verify alone
    monkeypatch.setenv("PRERESTORE_FAULT", f"verify:{what}")    # the stage daemon's husk
    with pytest.raises(RestoreError, match=rf"verify: .*pid {src.pid} {field}: source "):
        migrate(src.pid, policy=POLICY, work_dir=str(tmp_path / "images"), verify=True)
    assert not helper_processes(src.pid)
    _intact(src, log, argv)


@needs_root
def test_verify_reports_its_cost_and_gaps(source, tmp_path, monkeypatch, cleanup):
    src, log, argv = source
    monkeypatch.setenv("PRERESTORE_VERIFY", "0")
    out = tmp_path / "report.json"
    prerestore("migrate", "-t", str(src.pid), "--verify", "--json", str(out))
    report = json.loads(out.read_text())
    cleanup.add(report["restored_host_pid"])
    fin = report["final"]["finalize"]
    assert fin["verify_proc_ms"] > 0 and fin["verify_pages_ms"] > 0
    assert "verify" in report["downtime_phases_ms"]
    assert "verify_snapshot" in report["final"]["source"]["phases_ms"]
    assert all(verify.field_kind(g.split(": ")[0].split()[-1]) in verify.KNOWN_GAPS
               for g in fin["verify_gaps"])


@needs_root
def test_not_asked_no_check(source, tmp_path, monkeypatch, cleanup):
    src, log, argv = source
    monkeypatch.setenv("PRERESTORE_VERIFY", "0")
    monkeypatch.setenv("PRERESTORE_FAULT", "verify:rlimit")     # would be caught if checked
    report = migrate(src.pid, policy=POLICY, work_dir=str(tmp_path / "images"))
    cleanup.add(report["restored_host_pid"])
    fin = report["final"]["finalize"]
    assert "verify_ms" not in fin and "verify" not in report["downtime_phases_ms"]
    assert "verify_snapshot" not in report["final"]["source"]["phases_ms"]
