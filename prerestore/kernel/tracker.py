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

import os

from ..errors import KernelCallError, UnsupportedState
from . import native, procfs
from .native import lib
from .tracee import RemoteSyscalls, Tracee

DIRTY_FLAGS = native.PM_SCAN_WP_MATCHING | native.PM_SCAN_CHECK_WPASYNC
PAGE_CATEGORIES = native.PAGE_IS_PRESENT | native.PAGE_IS_FILE | native.PAGE_IS_PFNZERO


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
        vdso = next(v for v in procfs.maps(self.pid) if v.path == "[vdso]")
        with Tracee(self.pid) as t:
            saved = t.regs()
            try:
                remote = RemoteSyscalls(t, (vdso.start, vdso.end))
                remote_fd = remote.call(lib.SYS_userfaultfd, flags)
                pidfd = native.pidfd_open(self.pid)
                try:
                    self.uffd = native.pidfd_getfd(pidfd, remote_fd, self.pid)
                finally:
                    os.close(pidfd)
                remote.call(lib.SYS_close, remote_fd)
            finally:
                t.set_regs(saved)

    def protect(self, ranges: list[tuple[int, int]]) -> None:
        """Start tracking these ranges: register them and write-protect every page."""
        for start, end in ranges:
            native.uffd_wp_range(self.uffd, start, end - start)

    def scan_written(self, areas: bytes):
        """Pages written since the last scan in the packed areas, re-protected atomically.
        Returns (ScanResult, indexes of the areas that are not tracked).

        Asking for PAGE_IS_WRITTEN alone matters: it is the kernel's fast path, which only
        looks at PTE bits (about 1 ms per GiB). Asking for more categories makes it look up
        every page (about 16 ms per GiB); classify the few written ranges afterwards instead."""
        return native.scan_ranges(self.pagemap_fd, areas, flags=DIRTY_FLAGS,
                                  mask=native.PAGE_IS_WRITTEN,
                                  return_mask=native.PAGE_IS_WRITTEN, pid=self.pid)

    def classify(self, ranges: bytes):
        """Split ranges into regions by PRESENT and PFNZERO (no write-protection change)."""
        res, _ = native.scan_ranges(self.pagemap_fd, ranges,
                                    return_mask=native.PAGE_IS_PRESENT | native.PAGE_IS_PFNZERO,
                                    pid=self.pid)
        return res

    def close(self) -> None:
        for fd in (self.uffd, self.pagemap_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.uffd = self.pagemap_fd = -1


def scan_present(pagemap_fd: int, areas: bytes, pid: int):
    """Pages worth copying in the packed areas: present, private (not the page cache's own
    page) and not the shared zero page. uffd-wp markers read as SWAPPED: never ask for it."""
    res, _ = native.scan_ranges(pagemap_fd, areas, mask=PAGE_CATEGORIES,
                                inverted=native.PAGE_IS_FILE | native.PAGE_IS_PFNZERO,
                                return_mask=native.PAGE_IS_PRESENT, pid=pid)
    return res
