"""Dirty-page tracking of another process without soft-dirty.

A userfaultfd is created *inside* the target by an injected syscall and pulled out with
pidfd_getfd; the target's own copy is closed again, so it never sees it. In UFFD_FEATURE_WP_ASYNC
mode a write to a write-protected page is resolved by the kernel on the spot (the target never
blocks) and leaves the page marked written; PAGEMAP_SCAN with PM_SCAN_WP_MATCHING returns those
pages and write-protects them again in the same walk, so each scan is one atomic round.

The tracker must outlive the call that created it (the uffd context dies with its last fd), so it
lives in whatever process drives the rounds: the migrate command, or a tracker daemon for
separate `predump` invocations."""
from __future__ import annotations

import errno
import os

from ..errors import KernelCallError, UnsupportedState
from . import native, procfs
from ..faults import maybe_pause
from .native import lib
from .tracee import RemoteSyscalls, Tracee, runner_area

DIRTY_FLAGS = native.PM_SCAN_WP_MATCHING | native.PM_SCAN_CHECK_WPASYNC


class DirtyTracker:
    """Tracks written pages of one process (mode "uffd-wp")."""

    mode = "uffd-wp"

    def __init__(self, pid: int):
        self.pid = pid
        self.uffd = -1
        self.pagemap_fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._create_uffd()
            want = native.UFFD_FEATURE_WP_ASYNC | native.UFFD_FEATURE_WP_UNPOPULATED
            got = native.uffd_api(self.uffd, want)
            if not got & native.UFFD_FEATURE_WP_ASYNC:
                raise UnsupportedState("this kernel's userfaultfd lacks WP_ASYNC (Linux >= 6.7 "
                                       "is needed for dirty tracking)")
        except BaseException:
            self.close()
            raise

    def _create_uffd(self) -> None:
        # unprivileged userfaultfd is off on these hosts: a non-root target may only create a
        # user-mode-only one (which still reports kernel-mode writes as written under WP_ASYNC)
        uid = int(procfs.status(self.pid)["Uid"].split()[1])
        flags = lib.O_CLOEXEC | lib.O_NONBLOCK | (native.UFFD_USER_MODE_ONLY if uid else 0)
        area = runner_area(self.pid, procfs.maps(self.pid))
        # parked (see kernel/tracee.py): if we die at any instant, the target is left running
        # as it was or stopped with its own registers within reach of `prerestore recover`
        with Tracee(self.pid, park=True) as t:
            remote = RemoteSyscalls(t, area)
            remote_fd = remote.call(lib.SYS_userfaultfd, flags)
            maybe_pause("tracker")
            try:
                pidfd = native.pidfd_open(self.pid)
                try:
                    self.uffd = native.pidfd_getfd(pidfd, remote_fd, self.pid)
                finally:
                    os.close(pidfd)
            finally:
                try:
                    remote.call(lib.SYS_close, remote_fd)
                finally:
                    remote.release()

    def protect(self, ranges: list[tuple[int, int]]) -> int:
        """Start tracking these ranges: register them and write-protect every page.

        The process runs meanwhile: a range it unmapped (or shrank, like a heap given back
        with brk) since its maps were read cannot be registered. That is not an error: if the
        range comes back, the next scan finds it untracked and it is sent whole again.
        Returns how many ranges were skipped so."""
        skipped = 0
        for start, end in ranges:
            try:
                native.uffd_wp_range(self.uffd, start, end - start)
            except KernelCallError as e:
                if e.errno not in (errno.EINVAL, errno.ENOMEM, errno.ENOENT):
                    raise
                skipped += 1
        return skipped

    def scan_written(self, areas: bytes, final: bool = False):
        """Pages written since the last scan in the packed areas, re-protected atomically.
        Returns (ScanResult, indexes of the areas that are not tracked).

        Asking for PAGE_IS_WRITTEN alone matters: it is the kernel's fast path, which only
        looks at PTE bits (about 1 ms per GiB). Asking for more categories makes it look up
        every page (about 16 ms per GiB); classify the few written ranges afterwards instead."""
        return native.scan_ranges(self.pagemap_fd, areas, flags=DIRTY_FLAGS,
                                  mask=native.PAGE_IS_WRITTEN,
                                  return_mask=native.PAGE_IS_WRITTEN, pid=self.pid)

    def classify(self, ranges: bytes) -> tuple[bytes, bytes]:
        """(written pages that hold data: to copy, written pages gone since: to drop)."""
        return native.split_present(self.pagemap_fd, ranges, self.pid)

    def close(self) -> None:
        for fd in (self.uffd, self.pagemap_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.uffd = self.pagemap_fd = -1


def scan_present(pagemap_fd: int, areas: bytes, pid: int, file_pages: bool = False):
    """Pages worth copying in the packed areas: present, private (not the page cache's own
    page; with file_pages, of a shared memory object, those too) and not the shared zero page.
    uffd-wp markers read as SWAPPED: never ask for it. Kernels without PAGEMAP_SCAN (< 6.7)
    are answered from /proc/PID/pagemap."""
    inverted = native.PAGE_IS_PFNZERO | (0 if file_pages else native.PAGE_IS_FILE)
    mask = native.PAGE_IS_PRESENT | native.PAGE_IS_PFNZERO | \
        (0 if file_pages else native.PAGE_IS_FILE)
    try:
        res, _ = native.scan_ranges(pagemap_fd, areas, mask=mask, inverted=inverted,
                                    return_mask=native.PAGE_IS_PRESENT, pid=pid)
        return res
    except KernelCallError as e:
        if e.errno not in (errno.ENOTTY, errno.EINVAL):
            raise
        if file_pages:
            raise UnsupportedState("carrying shared memory needs PAGEMAP_SCAN (Linux >= 6.7)")
        return native.pagemap_present(pagemap_fd, areas, pid)


class HashTracker:
    """The fallback where userfaultfd WP_ASYNC or PAGEMAP_SCAN is missing: every round reads
    every tracked page and compares a 64-bit hash of it with the last round's. It needs no
    help from the kernel, but each round (the final one included) reads all of the memory,
    and a change that leaves both hash lanes equal goes unseen: it is reported as such."""

    mode = "page-hash"
    warning = ("dirty tracking by page hashes: this kernel lacks userfaultfd WP_ASYNC / "
               "PAGEMAP_SCAN (Linux >= 6.7); every round reads all memory, and the final "
               "round resends every page that changed during the migration")

    def __init__(self, pid: int):
        self.pid = pid
        self.pagemap_fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        # sorted (start, end, u64 hash per page, suspect flag per page)
        self.segments: list[tuple[int, int, bytearray, bytearray]] = []

    def _covering(self, start: int, end: int) -> tuple[bytearray, bytearray] | None:
        """The hashes and suspect flags of [start, end) if all of it is tracked."""
        hs, ss, cur = [], [], start
        for s, e, h, sus in self.segments:
            if e <= cur or s >= end:
                continue
            if s > cur:
                return None
            lo, hi = (cur - s) // 4096, (min(e, end) - s) // 4096
            hs.append(h[8 * lo:8 * hi])
            ss.append(sus[lo:hi])
            cur = min(e, end)
        if cur < end:
            return None
        return bytearray(b"".join(hs)), bytearray(b"".join(ss))

    def _store(self, start: int, end: int, hashes: bytearray, suspect: bytearray) -> None:
        keep = []
        for s, e, h, sus in self.segments:
            if e <= start or s >= end:
                keep.append((s, e, h, sus))
                continue
            if s < start:
                n = (start - s) // 4096
                keep.append((s, start, h[:8 * n], sus[:n]))
            if e > end:
                n = (end - s) // 4096
                keep.append((end, e, h[8 * n:], sus[n:]))
        keep.append((start, end, hashes, suspect))
        self.segments = sorted(keep, key=lambda x: x[0])

    def protect(self, ranges: list[tuple[int, int]]) -> int:
        for start, end in ranges:
            n = (end - start) // 4096
            h, sus = bytearray(8 * n), bytearray(n)
            native.hash_scan(self.pid, self.mem_fd, self.pagemap_fd, start, end, h, sus, 0)
            self._store(start, end, h, sus)
        return 0

    def scan_written(self, areas: bytes, final: bool = False):
        chunks, untracked = [], []
        for i, (start, end) in enumerate(native.RANGE.iter_unpack(areas)):
            known = self._covering(start, end)
            if known is None:
                untracked.append(i)
                continue
            h, sus = known
            chunks.append(native.hash_scan(self.pid, self.mem_fd, self.pagemap_fd, start, end,
                                           h, sus, 2 if final else 1).raw)
            self._store(start, end, h, sus)
        return native.ScanResult(b"".join(chunks)), untracked

    def classify(self, ranges: bytes) -> tuple[bytes, bytes]:
        return native.split_present(self.pagemap_fd, ranges, self.pid)

    def close(self) -> None:
        for fd in (self.pagemap_fd, self.mem_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.pagemap_fd = self.mem_fd = -1


def make_tracker(pid: int, mode: str = "auto"):
    """A tracker for pid: "uffd-wp" (exact, fast), "page-hash" (fallback), or "auto": the
    first where the kernel supports it."""
    if mode == "page-hash":
        return HashTracker(pid)
    try:
        return DirtyTracker(pid)
    except (UnsupportedState, KernelCallError) as e:
        if mode == "uffd-wp" or (isinstance(e, KernelCallError) and e.errno not in (
                errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTTY)):
            raise
        return HashTracker(pid)
