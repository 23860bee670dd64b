"""Unit tests for prerestore.model: Vma helpers, diff_layout and the packed range helpers."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from prerestore.model import (PROT_EXEC, PROT_READ, PROT_WRITE, RANGE, LayoutDiff, Vma,
                              diff_layout, pack_ranges, ranges_bytes, unpack_ranges)

P = 4096
R, RW, RX = PROT_READ, PROT_READ | PROT_WRITE, PROT_READ | PROT_EXEC
LIB = "/usr/lib/x86_64-linux-gnu/libfoo.so.1"


def anon(start, end, prot=RW, path="", shared=False):
    return Vma(start, end, prot, shared, 0, path)


def filemap(start, end, offset, prot=R, path=LIB, inode=1234, shared=False):
    return Vma(start, end, prot, shared, offset, path, inode, "fd:01")


# ---- Vma ------------------------------------------------------------------------------------

def test_vma_properties():
    f = filemap(0x1000, 0x5000, 0x2000, prot=RX)
    assert f.is_file and not f.is_special and f.size == 0x4000
    assert f.perms() == "r-xp"
    a = anon(0x1000, 0x2000, RW, shared=True)
    assert not a.is_file and a.perms() == "rw-s"
    assert Vma(0, P, 0, False, 0, "").perms() == "---p"
    assert Vma(0, P, RW | PROT_EXEC, False, 0, "").perms() == "rwxp"
    for name in ("[vdso]", "[vvar]", "[vsyscall]", "[vvar_vclock]"):
        assert Vma(0, P, R, False, 0, name).is_special
    for name in ("[heap]", "[stack]", "", LIB):
        assert not Vma(0, P, R, False, 0, name, 5 if name == LIB else 0).is_special
    # a path without an inode (e.g. some pseudo files) is not treated as a file mapping
    assert not Vma(0, P, R, False, 0, "/dev/something", 0).is_file
    # a bracketed name with an inode is not a file either
    assert not Vma(0, P, R, False, 0, "[anon:foo]", 7).is_file


def test_piece_keeps_file_offsets():
    f = filemap(0x10000, 0x20000, 0x3000, prot=RX)
    p = f.piece(0x14000, 0x16000)
    assert p == Vma(0x14000, 0x16000, RX, False, 0x7000, LIB, 1234, "fd:01")
    assert p.backing() == f.backing()
    assert f.piece(f.start, f.end) == f


def test_piece_of_anonymous_keeps_offset_unchanged():
    a = Vma(0x10000, 0x20000, RW, False, 0, "[heap]")
    p = a.piece(0x18000, 0x20000)
    assert p == Vma(0x18000, 0x20000, RW, False, 0, "[heap]")


def test_backing_ignores_prot_and_cut():
    f = filemap(0x10000, 0x20000, 0x3000, prot=RX)
    assert f.backing() == filemap(0x14000, 0x15000, 0x7000, prot=R).backing()
    assert f.backing() != filemap(0x14000, 0x15000, 0x8000, prot=RX).backing()
    assert f.backing() != filemap(0x10000, 0x20000, 0x3000, prot=RX, shared=True).backing()
    assert f.backing() != filemap(0x10000, 0x20000, 0x3000, prot=RX, inode=99).backing()
    assert anon(0, P).backing() == anon(0, P, R).backing()
    assert anon(0, P).backing() != anon(0, P, shared=True).backing()
    assert anon(0, P, path="[stack]").backing() != anon(0, P).backing()


# ---- diff_layout: examples -------------------------------------------------------------------

def layout():
    return [
        filemap(0x400000, 0x401000, 0x0, prot=R, path="/usr/bin/app", inode=10),
        filemap(0x401000, 0x405000, 0x1000, prot=RX, path="/usr/bin/app", inode=10),
        filemap(0x405000, 0x406000, 0x5000, prot=RW, path="/usr/bin/app", inode=10),
        anon(0x600000, 0x621000, RW, "[heap]"),
        anon(0x7f0000000000, 0x7f0000010000, RW),
        filemap(0x7f0000010000, 0x7f0000020000, 0x0, prot=RX),
        filemap(0x7f0000020000, 0x7f0000021000, 0x10000, prot=R),
        anon(0x7ffc00000000, 0x7ffc00021000, RW, "[stack]"),
    ]


def test_unchanged_layout_gives_empty_diff():
    d = diff_layout(layout(), layout())
    assert d == LayoutDiff()
    assert not d
    assert diff_layout([], []) == LayoutDiff()


def test_layoutdiff_bool():
    assert not LayoutDiff()
    assert LayoutDiff(unmap=[(0, P)])
    assert LayoutDiff(fresh=[anon(0, P)])
    assert LayoutDiff(reprotect=[anon(0, P)])


def test_heap_growth_only_extension_is_fresh():
    old = layout()
    new = list(old)
    new[3] = anon(0x600000, 0x642000, RW, "[heap]")
    d = diff_layout(old, new)
    assert d.unmap == [] and d.reprotect == []
    assert d.fresh == [anon(0x621000, 0x642000, RW, "[heap]")]


def test_heap_shrink_unmaps_tail():
    old = layout()
    new = list(old)
    new[3] = anon(0x600000, 0x610000, RW, "[heap]")
    d = diff_layout(old, new)
    assert d.unmap == [(0x610000, 0x621000)]
    assert d.fresh == [] and d.reprotect == []


def test_vma_removed_entirely_is_unmapped():
    old = layout()
    new = [v for v in old if v.path != LIB]
    d = diff_layout(old, new)
    assert d.unmap == [(0x7f0000010000, 0x7f0000020000), (0x7f0000020000, 0x7f0000021000)]
    assert d.fresh == [] and d.reprotect == []


def test_new_vma_is_fresh():
    old = layout()
    extra = anon(0x7f0000100000, 0x7f0000200000, RW)
    d = diff_layout(old, sorted(old + [extra], key=lambda v: v.start))
    assert d.fresh == [extra] and d.unmap == [] and d.reprotect == []


def test_mprotect_of_middle_of_anon_reprotects_that_piece():
    old = [anon(0x10000, 0x20000, RW)]
    new = [anon(0x10000, 0x14000, RW), anon(0x14000, 0x18000, R), anon(0x18000, 0x20000, RW)]
    d = diff_layout(old, new)
    assert d.reprotect == [anon(0x14000, 0x18000, R)]
    assert d.fresh == [] and d.unmap == []


def test_mprotect_of_part_of_file_vma_keeps_offset_and_content():
    old = [filemap(0x10000, 0x20000, 0x4000, prot=RW)]
    new = [filemap(0x10000, 0x18000, 0x4000, prot=RW), filemap(0x18000, 0x20000, 0xC000, prot=R)]
    d = diff_layout(old, new)
    assert d.reprotect == [filemap(0x18000, 0x20000, 0xC000, prot=R)]
    assert d.fresh == [] and d.unmap == []


def test_mprotect_back_and_merge():
    # the kernel merges the pieces again once they agree: one VMA where there were three
    old = [anon(0x10000, 0x14000, RW), anon(0x14000, 0x18000, R), anon(0x18000, 0x20000, RW)]
    new = [anon(0x10000, 0x20000, RW)]
    d = diff_layout(old, new)
    assert d.reprotect == [anon(0x14000, 0x18000, RW)]
    assert d.fresh == [] and d.unmap == []


def test_file_remapped_at_other_offset_is_fresh():
    old = [filemap(0x10000, 0x20000, 0x0)]
    new = [filemap(0x10000, 0x20000, 0x1000)]
    d = diff_layout(old, new)
    assert d.fresh == new and d.unmap == [] and d.reprotect == []


def test_other_file_same_range_is_fresh():
    old = [filemap(0x10000, 0x20000, 0x0)]
    new = [filemap(0x10000, 0x20000, 0x0, path="/other", inode=77)]
    assert diff_layout(old, new) == LayoutDiff(fresh=new)


def test_anon_replaced_by_file_is_fresh_and_back():
    a = [anon(0x10000, 0x20000, R)]
    f = [filemap(0x10000, 0x20000, 0x0, prot=R)]
    assert diff_layout(a, f) == LayoutDiff(fresh=f)
    assert diff_layout(f, a) == LayoutDiff(fresh=a)


def test_private_and_shared_differ():
    old = [anon(0x10000, 0x20000, RW)]
    new = [anon(0x10000, 0x20000, RW, shared=True)]
    assert diff_layout(old, new) == LayoutDiff(fresh=new)


def test_stack_vs_plain_anon_is_fresh():
    old = [anon(0x10000, 0x20000, RW, "[stack]")]
    new = [anon(0x10000, 0x20000, RW)]
    assert diff_layout(old, new) == LayoutDiff(fresh=new)


def test_partial_replacement_of_a_vma():
    # mmap(MAP_FIXED) of a file over the middle of an anonymous area
    old = [anon(0x10000, 0x20000, RW)]
    new = [anon(0x10000, 0x14000, RW), filemap(0x14000, 0x16000, 0x8000, prot=R),
           anon(0x16000, 0x20000, RW)]
    d = diff_layout(old, new)
    assert d.fresh == [filemap(0x14000, 0x16000, 0x8000, prot=R)]
    assert d.unmap == [] and d.reprotect == []


def test_merged_vmas_with_equal_backing_are_not_fresh():
    old = [filemap(0x10000, 0x14000, 0x0, prot=R), filemap(0x14000, 0x20000, 0x4000, prot=R)]
    new = [filemap(0x10000, 0x20000, 0x0, prot=R)]
    assert diff_layout(old, new) == LayoutDiff()
    assert diff_layout(new, old) == LayoutDiff()
    old = [anon(0x10000, 0x14000), anon(0x14000, 0x20000)]
    new = [anon(0x10000, 0x20000)]
    assert diff_layout(old, new) == LayoutDiff()
    assert diff_layout(new, old) == LayoutDiff()


def test_merged_with_growth_and_reprotect():
    old = [anon(0x10000, 0x14000, RW), anon(0x14000, 0x18000, R)]
    new = [anon(0x10000, 0x20000, RW)]
    d = diff_layout(old, new)
    assert d.reprotect == [anon(0x14000, 0x18000, RW)]
    assert d.fresh == [anon(0x18000, 0x20000, RW)]
    assert d.unmap == []


def test_file_vma_grown_by_mremap_fresh_piece_has_right_offset():
    old = [filemap(0x10000, 0x12000, 0x3000)]
    new = [filemap(0x10000, 0x18000, 0x3000)]
    d = diff_layout(old, new)
    assert d.fresh == [filemap(0x12000, 0x18000, 0x5000)]
    assert d.fresh[0].backing() == new[0].backing()
    assert d.unmap == [] and d.reprotect == []


def test_hole_punched_in_the_middle():
    old = [anon(0x10000, 0x20000)]
    new = [anon(0x10000, 0x14000), anon(0x18000, 0x20000)]
    assert diff_layout(old, new) == LayoutDiff(unmap=[(0x14000, 0x18000)])


def test_vma_moved_elsewhere():
    old = [anon(0x10000, 0x20000)]
    new = [anon(0x30000, 0x40000)]
    assert diff_layout(old, new) == LayoutDiff(unmap=[(0x10000, 0x20000)], fresh=new)


# ---- diff_layout: property --------------------------------------------------------------------

# (kind, shared, path, inode, offset delta in pages relative to the start page)
BACKINGS = [
    ("anon", False, "", 0, 0),
    ("anon", True, "", 0, 0),
    ("anon", False, "[heap]", 0, 0),
    ("anon", False, "[stack]", 0, 0),
    ("file", False, "/lib/a.so", 11, 0),
    ("file", False, "/lib/a.so", 11, 3),
    ("file", True, "/lib/a.so", 11, 0),
    ("file", False, "/data/b b", 22, 1),
]

segment = st.tuples(st.integers(1, 4),                       # pages
                    st.booleans(),                           # hole?
                    st.sampled_from([0, R, RW, RX, RW | PROT_EXEC]),
                    st.integers(0, len(BACKINGS) - 1))


def build_layout(segments, first_page) -> list[Vma]:
    out, page = [], first_page
    for npages, hole, prot, b in segments:
        start, end = page * P, (page + npages) * P
        page += npages
        if hole:
            continue
        kind, shared, path, inode, delta = BACKINGS[b]
        if kind == "anon":
            out.append(Vma(start, end, prot, shared, 0, path))
        else:
            out.append(Vma(start, end, prot, shared, (start // P + delta) * P, path, inode,
                           "08:01"))
    return out


layouts = st.builds(build_layout, st.lists(segment, max_size=8), st.integers(0, 3))


def content(v: Vma, a: int) -> tuple:
    """What address `a` of VMA `v` holds, worked out independently of Vma.backing(): for a file,
    the file and the offset in it of that very page (so pieces must carry the right offset)."""
    if v.inode:
        return ("file", v.shared, v.path, v.inode, v.offset + (a - v.start))
    return ("anon", v.shared, v.path == "[stack]")


def per_page(vmas) -> dict[int, tuple[int, tuple]]:
    m = {}
    for v in vmas:
        assert v.start < v.end and v.start % P == 0 and v.end % P == 0
        for a in range(v.start, v.end, P):
            assert a not in m, "overlapping VMAs"
            m[a] = (v.prot, content(v, a))
    return m


@settings(max_examples=150, deadline=None, database=None)
@given(layouts, layouts)
def test_applying_diff_reproduces_new(old, new):
    d = diff_layout(old, new)
    want = per_page(new)
    have = per_page(old)

    unmapped = set()
    for s, e in d.unmap:
        assert s < e
        for a in range(s, e, P):
            assert a in have, "unmap of an address the old layout did not map"
            assert a not in want, "unmap of an address the new layout maps"
            assert a not in unmapped, "address unmapped twice"
            unmapped.add(a)
            del have[a]

    fresh = set()
    for f in d.fresh:
        assert f.start < f.end
        for a in range(f.start, f.end, P):
            assert a not in fresh, "address fresh twice"
            fresh.add(a)
            # fresh only where the content could not be kept
            assert a not in have or have[a][1] != content(f, a), "fresh where content was kept"
            have[a] = (f.prot, content(f, a))

    reprot = set()
    for r in d.reprotect:
        assert r.start < r.end
        for a in range(r.start, r.end, P):
            assert a not in fresh, "reprotect of a fresh address"
            assert a not in reprot, "address reprotected twice"
            reprot.add(a)
            assert a in have and have[a][1] == content(r, a), "reprotect changes content"
            assert have[a][0] != r.prot, "pointless reprotect"
            have[a] = (r.prot, content(r, a))

    assert have == want
    # nothing to do iff the per-address view is unchanged
    assert bool(d) == (per_page(old) != want)


# ---- packed ranges ----------------------------------------------------------------------------

def test_pack_unpack_ranges_round_trip():
    ranges = [(0x1000, 0x3000), (0x7fff00000000, 0x7fff00001000), (0, 2**64 - 1)]
    raw = pack_ranges(ranges)
    assert isinstance(raw, bytes) and len(raw) == RANGE.size * 3 == 48
    assert unpack_ranges(raw) == ranges
    assert ranges_bytes(pack_ranges(ranges[:2])) == 0x2000 + 0x1000


def test_pack_ranges_empty_and_generators():
    assert pack_ranges([]) == b""
    assert unpack_ranges(b"") == []
    assert ranges_bytes(b"") == 0
    assert unpack_ranges(pack_ranges((s, s + P) for s in range(0, 4 * P, P))) == \
        [(0, P), (P, 2 * P), (2 * P, 3 * P), (3 * P, 4 * P)]


@settings(max_examples=50, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, 2**63), st.integers(0, 2**63 - 1)), max_size=20))
def test_pack_ranges_property(pairs):
    ranges = [(s, s + n) for s, n in pairs]
    raw = pack_ranges(ranges)
    assert unpack_ranges(raw) == ranges
    assert ranges_bytes(raw) == sum(n for _, n in pairs)


def test_unpack_ranges_rejects_partial_record():
    import struct
    with pytest.raises(struct.error):
        unpack_ranges(b"\0" * 15)
