"""The VmFlags of a process's mappings (/proc/PID/smaps) that a restore carries, and the calls
that set them again (x86_64 UAPI numbers, defined here: the system headers are older than the
kernel).

/proc/PID/maps does not show them; smaps does, at a price: it walks every page table of the
process (measured here: 12 ms for a 64 MiB process, 13 ms for 1 GiB, against 0.2 ms for maps),
so it is read in the rounds and, in the final step, only where they are in use or the layout
changed (ProcessSource.vm_flags)."""
from __future__ import annotations

import bisect

from ..model import PROT_WRITE, VMFLAG_BITS, Vma, vmflags_default
from . import procfs

SYS_MINCORE, SYS_MLOCK, SYS_MLOCKALL, SYS_MLOCK2 = 27, 149, 151, 325
MADV_DONTNEED = 4
MLOCK_ONFAULT = 1
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4

# VmFlags made again with madvise: flag -> advice
ADVICE = {"dd": 16,       # MADV_DONTDUMP
          "dc": 10,       # MADV_DONTFORK
          "wf": 18,       # MADV_WIPEONFORK
          "hg": 14,       # MADV_HUGEPAGE
          "nh": 15,       # MADV_NOHUGEPAGE
          "mg": 12}       # MADV_MERGEABLE
ADVICE_NAMES = {"dd": "MADV_DONTDUMP", "dc": "MADV_DONTFORK", "wf": "MADV_WIPEONFORK",
                "hg": "MADV_HUGEPAGE", "nh": "MADV_NOHUGEPAGE", "mg": "MADV_MERGEABLE"}
MAP_DROPPABLE = 0x08      # Linux 6.11+


def parse(data: bytes) -> dict[tuple[int, int], int]:
    """(start, end) of each mapping -> its carried VmFlags, as VMFLAG bits."""
    out: dict[tuple[int, int], int] = {}
    where = None
    bits = VMFLAG_BITS
    for line in data.split(b"\n"):
        if line.startswith(b"VmFlags:"):
            if where is not None:
                out[where] = sum(bits.get(n, 0) for n in line[8:].decode().split())
                where = None
            continue
        head = line.split(b" ", 1)[0]
        if b"-" in head and b":" not in head:
            start, _, end = head.partition(b"-")
            where = (int(start, 16), int(end, 16))
    return out


def read(pid: int) -> dict[tuple[int, int], int]:
    return parse(procfs._read(pid, "smaps"))


def carried(layout: list[Vma], flags: dict[tuple[int, int], int]) -> list[tuple[int, int, int]]:
    """The memory VMAs of layout whose carried flags differ from what a plain mmap gives:
    (start, end, bits). A VMA smaps did not list (the layout is older) is left out."""
    out = []
    for v in layout:
        if v.is_special:
            continue
        got = flags.get((v.start, v.end))
        if got is not None and got != vmflags_default(v, got):
            out.append((v.start, v.end, got))
    return out



def inherited(old_layout: list[Vma], old: list[tuple[int, int, int]], layout: list[Vma]
              ) -> list[tuple[int, int, int]] | None:
    """carried() for layout, from what was read with old_layout (old: its carried flags),
    without reading smaps: each VMA takes the flags of the old one it grew from or was cut
    from (same backing, overlapping), plus VM_ACCOUNT if it became writable (mprotect
    charges it then). None if a VMA is new (overlaps no old one of its kind): then only smaps
    tells. An madvise or lock of part of an old area is not seen (see ProcessSource.vm_flags)."""
    old_bits = {(s, e): b for s, e, b in old}
    olds = [v for v in old_layout if not v.is_special]
    starts = [v.start for v in olds]
    ac, nr = VMFLAG_BITS["ac"], VMFLAG_BITS["nr"]
    out = []
    for v in layout:
        if v.is_special:
            continue
        i = max(bisect.bisect_right(starts, v.start) - 1, 0)
        bits = None
        while i < len(olds) and olds[i].start < v.end:
            o = olds[i]
            if o.end > v.start and o.backing() == v.backing():
                bits = old_bits.get((o.start, o.end), vmflags_default(o, 0))
                break
            i += 1
        if bits is None:
            return None
        if not v.shared and v.prot & PROT_WRITE and not bits & nr:
            bits |= ac
        if bits != vmflags_default(v, bits):
            out.append((v.start, v.end, bits))
    return out
