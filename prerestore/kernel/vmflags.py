"""The VmFlags of a process's mappings (/proc/PID/smaps) that a restore carries, and the calls
that set them again (x86_64 UAPI numbers, defined here: the system headers are older than the
kernel).

/proc/PID/maps does not show them; smaps does, at a price: it walks every page table of the
process (measured here: 12 ms for a 64 MiB process, 13 ms for 1 GiB, against 0.2 ms for maps),
so it is read in the rounds and, in the final step, only where they are in use or the layout
changed (ProcessSource.vm_flags)."""
from __future__ import annotations

from ..model import VMFLAG_BITS, Vma, vmflags_default
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

