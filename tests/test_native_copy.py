"""The page copy between processes, at the edge that matters during pre-copy: the running
source unmaps part of a range after it was listed. Every page it still has must arrive; only
the missing ones are zero-filled (the next round's layout unmaps them on the destination)."""
from __future__ import annotations

import subprocess
import time

import pytest

from migration import needs_root

from prerestore.kernel import native, procfs
from prerestore.kernel.native import lib
from prerestore.kernel.tracee import RemoteSyscalls, Tracee
from prerestore.model import pack_ranges

pytestmark = needs_root
PAGE = 4096
BASE = 0x300000000000


@pytest.fixture
def two_processes():
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    time.sleep(0.05)
    tracees = []
    try:
        for p in procs:
            t = Tracee(p.pid)
            t.stop()
            vdso = next(v for v in procfs.maps(p.pid) if v.path == "[vdso]")
            tracees.append((t, RemoteSyscalls(t, (vdso.start, vdso.end))))
        yield tracees
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.parametrize("pages", [3, 4096])       # below and above the pipelined size
def test_pages_next_to_an_unmapped_one_still_arrive(two_processes, pages):
    (src, src_remote), (dst, dst_remote) = two_processes
    flags = lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_FIXED
    for remote in (src_remote, dst_remote):
        assert remote.call(lib.SYS_mmap, BASE, pages * PAGE, 3, flags, -1, 0) == BASE
    for i in range(pages):
        native.write_mem(src.pid, BASE + i * PAGE, bytes([i % 250 + 1]) * PAGE)
    hole = pages // 2
    src_remote.call(lib.SYS_munmap, BASE + hole * PAGE, PAGE)    # gone after it was listed
    with open(f"/proc/{src.pid}/mem", "rb", buffering=0) as sm, \
            open(f"/proc/{dst.pid}/mem", "r+b", buffering=0) as dm:
        copied, _, skipped = native.copy_pages(src.pid, sm.fileno(), dst.pid, dm.fileno(),
                                               pack_ranges([(BASE, BASE + pages * PAGE)]))
    assert skipped == PAGE and copied == pages * PAGE
    for i in range(pages):
        got = native.read_mem(dst.pid, BASE + i * PAGE, PAGE)
        assert got == (b"\0" * PAGE if i == hole else bytes([i % 250 + 1]) * PAGE), i
