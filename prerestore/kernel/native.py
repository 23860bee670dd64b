"""1:1 typed wrappers over the cffi module. The only place that touches ffi/lib.

Every wrapper turns a negative return into KernelCallError (ProcessGone for ESRCH) naming the
call and the pid; callers above never see raw errnos, cdata or the ffi object."""
from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from .. import _native
from ..errors import KernelCallError, ProcessGone

ffi, lib = _native.ffi, _native.lib

PAGE_SIZE = 4096
PAGE_IS_WRITTEN = lib.PR_PAGE_IS_WRITTEN
PAGE_IS_FILE = lib.PR_PAGE_IS_FILE
PAGE_IS_PRESENT = lib.PR_PAGE_IS_PRESENT
PAGE_IS_PFNZERO = lib.PR_PAGE_IS_PFNZERO
PM_SCAN_WP_MATCHING = lib.PR_PM_SCAN_WP_MATCHING
PM_SCAN_CHECK_WPASYNC = lib.PR_PM_SCAN_CHECK_WPASYNC
UFFD_FEATURE_WP_ASYNC = lib.PR_UFFD_FEATURE_WP_ASYNC
UFFD_FEATURE_WP_UNPOPULATED = lib.PR_UFFD_FEATURE_WP_UNPOPULATED
UFFD_USER_MODE_ONLY = lib.PR_UFFD_USER_MODE_ONLY

REG_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
             "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
             "gs_base", "ds", "es", "fs", "gs")
RANGE = struct.Struct("=QQ")   # struct pr_range, the packed form ranges travel in


def check(ret: int, call: str, pid: int | None = None, detail: str = "") -> int:
    if ret < 0:
        cls = ProcessGone if -ret == errno.ESRCH else KernelCallError
        raise cls(-ret, call, pid, detail)
    return ret


# ---- ptrace -----------------------------------------------------------------------------------

def seize(pid: int, options: int = 0) -> None:
    check(lib.pr_seize(pid, options), "ptrace(SEIZE)", pid)


def interrupt(pid: int) -> None:
    check(lib.pr_interrupt(pid), "ptrace(INTERRUPT)", pid)


def wait_stop(pid: int) -> int:
    status = ffi.new("int *")
    check(lib.pr_wait_stop(pid, status), "waitpid(ptrace stop)", pid, f"status {status[0]:#x}")
    return status[0]


def detach(pid: int, sig: int = 0) -> None:
    check(lib.pr_detach(pid, sig), "ptrace(DETACH)", pid)


def get_regs(pid: int) -> dict[str, int]:
    regs = ffi.new("struct pr_regs *")
    check(lib.pr_get_regs(pid, regs), "ptrace(GETREGS)", pid)
    return {name: getattr(regs, name) for name in REG_NAMES}


def set_regs(pid: int, values: dict[str, int]) -> None:
    regs = ffi.new("struct pr_regs *")
    for name in REG_NAMES:
        setattr(regs, name, values[name] & 0xFFFFFFFFFFFFFFFF)
    check(lib.pr_set_regs(pid, regs), "ptrace(SETREGS)", pid)


def get_xstate(pid: int) -> bytes:
    buf = ffi.new("char[]", 16384)
    n = check(lib.pr_get_xstate(pid, buf, 16384), "ptrace(GETREGSET, NT_X86_XSTATE)", pid)
    return ffi.buffer(buf, n)[:]


def set_xstate(pid: int, data: bytes) -> None:
    check(lib.pr_set_xstate(pid, data, len(data)), "ptrace(SETREGSET, NT_X86_XSTATE)", pid)


def get_sigmask(pid: int) -> int:
    mask = ffi.new("uint64_t *")
    check(lib.pr_get_sigmask(pid, mask), "ptrace(GETSIGMASK)", pid)
    return mask[0]


def set_sigmask(pid: int, mask: int) -> None:
    check(lib.pr_set_sigmask(pid, mask), "ptrace(SETSIGMASK)", pid)


def get_rseq(pid: int) -> tuple[int, int, int, int]:
    conf = ffi.new("struct pr_rseq_conf *")
    check(lib.pr_get_rseq(pid, conf), "ptrace(GET_RSEQ_CONFIGURATION)", pid)
    return conf.rseq_abi_pointer, conf.rseq_abi_size, conf.signature, conf.flags


SECCOMP_MAX_INSNS = lib.PR_SECCOMP_MAX_INSNS


def seccomp_filter(tid: int, index: int) -> bytes:
    """A stopped tracee's seccomp filter number `index` (0: its oldest), as installed: struct
    sock_filter instructions, 8 bytes each."""
    buf = ffi.new("char[]", 8 * SECCOMP_MAX_INSNS)
    n = check(lib.pr_seccomp_filter(tid, index, buf), "ptrace(SECCOMP_GET_FILTER)", tid,
              f"filter {index}")
    return ffi.buffer(buf, 8 * n)[:]


def seccomp_flags(tid: int, index: int) -> int:
    """The flags that filter was installed with, as the kernel keeps them (FLAG_LOG)."""
    flags = ffi.new("uint64_t *")
    check(lib.pr_seccomp_flags(tid, index, flags), "ptrace(SECCOMP_GET_METADATA)", tid,
          f"filter {index}")
    return flags[0]


def get_robust_list(pid: int) -> tuple[int, int]:
    head, length = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    check(lib.pr_get_robust_list(pid, head, length), "get_robust_list", pid)
    return head[0], length[0]


def peek_siginfo(pid: int, shared: bool) -> list[bytes]:
    """Queued siginfo records (128 bytes each), not dequeued."""
    buf = ffi.new("char[]", 128 * 256)
    n = check(lib.pr_peek_siginfo(pid, int(shared), buf, 256), "ptrace(PEEKSIGINFO)", pid)
    raw = ffi.buffer(buf, 128 * n)[:]
    return [raw[i * 128:(i + 1) * 128] for i in range(n)]


# ---- injection --------------------------------------------------------------------------------

def find_syscall_insn(pid: int, start: int, end: int) -> int:
    addr = ffi.new("uint64_t *")
    check(lib.pr_find_syscall_insn(pid, start, end, addr), "find syscall instruction in [vdso]", pid)
    return addr[0]


def inject_syscall(pid: int, insn: int, nr: int, *args: int) -> int:
    argv = ffi.new("uint64_t[6]", [a & 0xFFFFFFFFFFFFFFFF for a in (list(args) + [0] * 6)[:6]])
    ret = ffi.new("int64_t *")
    check(lib.pr_inject_syscall(pid, insn, nr, argv, ret), f"inject syscall {nr}", pid)
    return ret[0]


def inject_syscall_quiet(pid: int, insn: int, nr: int, *args: int) -> int:
    """inject_syscall without a trap (see pr_inject_syscall_quiet): leaves SIGTRAP's action
    as it is."""
    argv = ffi.new("uint64_t[6]", [a & 0xFFFFFFFFFFFFFFFF for a in (list(args) + [0] * 6)[:6]])
    ret = ffi.new("int64_t *")
    check(lib.pr_inject_syscall_quiet(pid, insn, nr, argv, ret), f"inject syscall {nr}", pid)
    return ret[0]


def thread_starter_code() -> bytes:
    code = ffi.new("void **")
    n = lib.pr_thread_starter(code)
    return ffi.buffer(code[0], n)[:]


def clone_thread(pid: int, starter: int, args: int, args_size: int) -> int:
    """Make the stopped tracee create a thread (see pr_clone_thread); returns its tid here."""
    child = ffi.new("int *")
    check(lib.pr_clone_thread(pid, starter, args, args_size, child), "injected clone3(thread)",
          pid)
    return child[0]


def set_options(pid: int, options: int) -> None:
    check(lib.pr_set_options(pid, options), "ptrace(SETOPTIONS)", pid)


def batch_runner_code() -> bytes:
    code = ffi.new("void **")
    n = lib.pr_batch_runner(code)
    return ffi.buffer(code[0], n)[:]


def _call_table(calls):
    table_c = ffi.new("struct pr_call[]", len(calls))
    for i, (nr, args) in enumerate(calls):
        table_c[i].nr = nr
        for k, a in enumerate(args):
            table_c[i].args[k] = a & 0xFFFFFFFFFFFFFFFF
    return table_c


def run_batch(pid: int, runner: int, table: int, calls: list[tuple[int, tuple[int, ...]]],
              data: bytes, data_addr: int, saved: bytes | None = None, saved_addr: int = 0
              ) -> tuple[list[int], int, int]:
    """Run calls [(nr, args)] through the runner; returns (results, how many ran, SIGSTOPs
    sent by others meanwhile). saved (a struct pr_saved) makes it a parked batch in a source
    task, which ends held (see pr_start_batch)."""
    table_c = _call_table(calls)
    done, foreign = ffi.new("long *"), ffi.new("long *")
    saved_c = ffi.cast("struct pr_saved *", ffi.from_buffer(saved)) if saved else ffi.NULL
    check(lib.pr_run_batch(pid, runner, table, table_c, len(calls), data, len(data), data_addr,
                           int(saved is not None), saved_addr, saved_c, done, foreign),
          "run injected batch", pid)
    return [table_c[i].ret for i in range(len(calls))], done[0], foreign[0]


class StartedBatch:
    """A batch running in the tracee while we do something else; finish() waits for it."""

    def __init__(self, pid: int, runner: int, table: int, calls, data: bytes, data_addr: int):
        self.pid, self.runner, self.table, self.n, self.park = pid, runner, table, len(calls), False
        self.table_c = _call_table(calls)
        check(lib.pr_start_batch(pid, runner, table, self.table_c, self.n, data, len(data),
                                 data_addr, 0, 0, ffi.NULL), "start injected batch", pid)

    def finish(self) -> tuple[list[int], int]:
        done, foreign = ffi.new("long *"), ffi.new("long *")
        check(lib.pr_finish_batch(self.pid, self.runner, self.table, self.table_c, self.n,
                                  int(self.park), done, foreign),
              "wait for injected batch", self.pid)
        return [self.table_c[i].ret for i in range(self.n)], done[0]


def first_bad_range(packed: bytes) -> int:
    """Index of the first packed (start, end) range that is not page-aligned with start < end,
    or -1 (len(packed) must be a whole number of ranges)."""
    n = len(packed) // 16
    return lib.pr_check_ranges(ffi.cast("struct pr_range *", ffi.from_buffer(packed)), n) \
        if n else -1


def park(pid: int, tgid: int) -> None:
    """Send the seized task `pid` of thread group `tgid` the SIGSTOP it will be parked in."""
    check(lib.pr_park(pid, tgid), "tgkill(SIGSTOP)", pid)


def wait_parked(pid: int) -> None:
    check(lib.pr_wait_parked(pid), "wait for the SIGSTOP stop", pid)


RUNNER_PARKED_OFFSET = lib.pr_runner_parked_offset()
SAVED_SIZE = lib.PR_SAVED_SIZE
SAVED_MAGIC = lib.PR_SAVED_MAGIC


# ---- memory -----------------------------------------------------------------------------------

def read_mem(pid: int, addr: int, length: int) -> bytes:
    buf = ffi.new("char[]", length)
    n = check(lib.pr_read_mem(pid, addr, buf, length), "process_vm_readv", pid, hex(addr))
    return ffi.buffer(buf, n)[:]


def write_mem(pid: int, addr: int, data: bytes) -> None:
    n = check(lib.pr_write_mem(pid, addr, data, len(data)), "process_vm_writev", pid, hex(addr))
    if n != len(data):
        raise KernelCallError(errno.EFAULT, "process_vm_writev", pid, f"short write at {addr:#x}")


def dump_pages(pid: int, mem_fd: int, ranges: bytes, out_fd: int) -> int:
    """Append the bytes of packed ranges to out_fd; returns the byte count."""
    nbytes = ffi.new("uint64_t *")
    rng = ffi.from_buffer("struct pr_range[]", ranges)
    check(lib.pr_dump_pages(pid, mem_fd, rng, len(ranges) // 16, out_fd, nbytes),
          "read pages (process_vm_readv)", pid)
    return nbytes[0]


class PageReader:
    """The bytes of packed ranges of pid, chunk by chunk (at most CHUNK bytes each): for a
    sender that frames and authenticates what it streams."""
    CHUNK = lib.PR_CHUNK

    def __init__(self, pid: int, mem_fd: int, ranges: bytes):
        self.pid, self.mem_fd = pid, mem_fd
        self.ranges = ranges
        self._c = ffi.from_buffer("struct pr_range[]", ranges)
        self._n = len(ranges) // 16
        self._i, self._off = ffi.new("long *"), ffi.new("uint64_t *")
        self._buf = ffi.new("char[]", self.CHUNK)

    def __iter__(self):
        while True:
            got = check(lib.pr_read_pages(self.pid, self.mem_fd, self._c, self._n, self._i,
                                          self._off, self._buf),
                        "read pages (process_vm_readv)", self.pid)
            if not got:
                return
            # a view of the one buffer (valid until the next chunk): no copy, no page faults
            yield memoryview(ffi.buffer(self._buf, got))


def load_pages(pid: int, mem_fd: int, in_fd: int, offset: int, ranges: bytes) -> tuple[int, int]:
    """Write packed ranges into pid from in_fd at offset; returns (bytes, bytes forced via mem)."""
    nbytes, forced = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    rng = ffi.from_buffer("struct pr_range[]", ranges)
    check(lib.pr_load_pages(pid, mem_fd, in_fd, offset, rng, len(ranges) // 16, nbytes, forced),
          "write pages (process_vm_writev)", pid)
    return nbytes[0], forced[0]


def copy_pages(src_pid: int, src_mem_fd: int, dst_pid: int, dst_mem_fd: int,
               ranges: bytes) -> tuple[int, int, int]:
    """Copy packed ranges from src_pid into dst_pid; pages src_pid no longer maps are zeroed;
    returns (bytes copied, bytes forced via /proc/PID/mem, bytes skipped)."""
    nbytes, forced, skipped = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
    rng = ffi.from_buffer("struct pr_range[]", ranges)
    check(lib.pr_copy_pages(src_pid, src_mem_fd, dst_pid, dst_mem_fd, rng, len(ranges) // 16,
                            nbytes, forced, skipped), "copy pages between processes", dst_pid)
    return nbytes[0], forced[0], skipped[0]


# ---- PAGEMAP_SCAN / userfaultfd ---------------------------------------------------------------

@dataclass
class ScanResult:
    """Regions as packed (start, end, categories) triples."""
    raw: bytes

    def __len__(self) -> int:
        return len(self.raw) // 24

    def triples(self):
        return struct.iter_unpack("=QQQ", self.raw)

    def split(self, mask: int = 0, value: int = 0) -> tuple[bytes, bytes]:
        """(packed ranges whose categories & mask == value, packed ranges of the others),
        neighbours merged; split() alone: every region as a range."""
        n = len(self)
        if not n:
            return b"", b""
        regions = ffi.from_buffer("struct pr_page_region[]", self.raw)
        yes, no = ffi.new("struct pr_range[]", n), ffi.new("struct pr_range[]", n)
        n_yes, n_no = ffi.new("long *"), ffi.new("long *")
        lib.pr_split_regions(regions, n, mask, value, yes, n_yes, no, n_no)
        return ffi.buffer(yes, 16 * n_yes[0])[:], ffi.buffer(no, 16 * n_no[0])[:]


def scan_ranges(pagemap_fd: int, areas: bytes, *, flags: int = 0, inverted: int = 0,
                mask: int = 0, anyof: int = 0, return_mask: int = 0, pid: int | None = None
                ) -> tuple[ScanResult, list[int]]:
    """PAGEMAP_SCAN over packed areas. Returns (result, indexes of the areas that failed with
    EPERM: with PM_SCAN_CHECK_WPASYNC, areas not registered for WP tracking). The walk goes on
    past such an area: a scan that re-protects pages is never repeated, so nothing is lost."""
    n_areas = len(areas) // 16
    areas_c = ffi.from_buffer("struct pr_range[]", areas)
    area, addr = ffi.new("long *"), ffi.new("uint64_t *")
    cap = 4096
    out = ffi.new("struct pr_page_region[]", cap)
    chunks, untracked = [], []
    while area[0] < n_areas:
        n = lib.pr_scan_ranges(pagemap_fd, areas_c, n_areas, flags, inverted, mask, anyof,
                               return_mask, out, cap, area, addr)
        if n == -errno.EPERM:
            untracked.append(area[0])
            area[0] += 1
            addr[0] = 0
            continue
        check(n, "ioctl(PAGEMAP_SCAN)", pid)
        chunks.append(ffi.buffer(out, 24 * n)[:])
        if area[0] < n_areas and cap < (1 << 20):
            cap *= 4
            out = ffi.new("struct pr_page_region[]", cap)
    return ScanResult(b"".join(chunks)), untracked


def hash_scan(pid: int, mem_fd: int, pagemap_fd: int, start: int, end: int,
              hashes: bytearray, suspect: bytearray, mode: int) -> ScanResult:
    """Hash every page of [start, end) into `hashes` (u64 per page). mode 0: a new area
    (nothing returned); 1: a pre-copy round; 2: the final round. Returns the pages to send
    (categories: PAGE_IS_PRESENT if present now); see pr_hash_scan for `suspect`."""
    npages = (end - start) // PAGE_SIZE
    assert len(hashes) == 8 * npages and len(suspect) == npages
    cap = npages // 2 + 2 if mode else 1
    out = ffi.new("struct pr_page_region[]", cap)
    n = check(lib.pr_hash_scan(pid, mem_fd, pagemap_fd, start, end,
                               ffi.from_buffer("uint64_t[]", hashes),
                               ffi.from_buffer("uint8_t[]", suspect), mode, out, cap),
              "hash pages (/proc/PID/pagemap, process_vm_readv)", pid)
    return ScanResult(ffi.buffer(out, 24 * n)[:])


def pagemap_present(pagemap_fd: int, areas: bytes, pid: int | None = None) -> ScanResult:
    """Present private pages of the packed areas, read from /proc/PID/pagemap."""
    chunks = []
    for start, end in RANGE.iter_unpack(areas):
        cap = (end - start) // PAGE_SIZE // 2 + 2
        out = ffi.new("struct pr_page_region[]", cap)
        n = check(lib.pr_pagemap_present(pagemap_fd, start, end, out, cap),
                  "read /proc/PID/pagemap", pid)
        chunks.append(ffi.buffer(out, 24 * n)[:])
    return ScanResult(b"".join(chunks))


def pagemap_vs_parent(child_pm_fd: int, parent_pm_fd: int, areas: bytes,
                      pid: int | None = None) -> tuple[bytes, bytes]:
    """(copy, drop) packed ranges of a child's areas against its parent's pages at the same
    addresses: what a fork of the parent lacks (see pr_pagemap_vs_parent)."""
    copy, drop = [], []
    for start, end in RANGE.iter_unpack(areas):
        cap = (end - start) // PAGE_SIZE // 2 + 2
        c = ffi.new("struct pr_range[]", cap)
        d = ffi.new("struct pr_range[]", cap)
        nc, nd = ffi.new("long *"), ffi.new("long *")
        check(lib.pr_pagemap_vs_parent(child_pm_fd, parent_pm_fd, start, end, c, nc, d, nd, cap),
              "read /proc/PID/pagemap (child and parent)", pid)
        copy.append(ffi.buffer(c, 16 * nc[0])[:])
        drop.append(ffi.buffer(d, 16 * nd[0])[:])
    return b"".join(copy), b"".join(drop)


def split_present(pagemap_fd: int, ranges: bytes, pid: int | None = None
                  ) -> tuple[bytes, bytes]:
    """(pages of the packed ranges that hold data, pages that do not), from pagemap."""
    n = len(ranges) // 16
    if not n:
        return b"", b""
    pages = sum(e - s for s, e in RANGE.iter_unpack(ranges)) // PAGE_SIZE
    cap = pages // 2 + n + 2
    yes, no = ffi.new("struct pr_range[]", cap), ffi.new("struct pr_range[]", cap)
    n_yes, n_no = ffi.new("long *"), ffi.new("long *")
    check(lib.pr_split_present(pagemap_fd, ffi.from_buffer("struct pr_range[]", ranges), n,
                               yes, n_yes, no, n_no), "read /proc/PID/pagemap", pid)
    return ffi.buffer(yes, 16 * n_yes[0])[:], ffi.buffer(no, 16 * n_no[0])[:]


def uffd_api(uffd: int, features: int) -> int:
    got = ffi.new("uint64_t *")
    check(lib.pr_uffd_api(uffd, features, got), "ioctl(UFFDIO_API)")
    return got[0]


def uffd_wp_range(uffd: int, start: int, length: int) -> None:
    check(lib.pr_uffd_wp_range(uffd, start, length), "ioctl(UFFDIO_REGISTER/WRITEPROTECT)",
          detail=f"{start:#x}+{length:#x}")


# ---- processes --------------------------------------------------------------------------------

def pipe_peek(pipe_fd: int, cap: int = 1 << 20) -> bytes:
    """What is queued in the pipe (pipe_fd: a non-blocking read end of it), left queued."""
    buf = ffi.new("char[]", cap)
    n = check(lib.pr_pipe_peek(pipe_fd, buf, cap), "tee(pipe)")
    return ffi.buffer(buf, n)[:]


def make_signalfd(mask: int, flags: int) -> int:
    return check(lib.pr_make_signalfd(mask, flags), "signalfd4")


def make_timerfd(clockid: int, flags: int, value: tuple[int, int], interval: tuple[int, int],
                 ticks: int) -> int:
    """A timerfd armed to fire after value (s, ns) then every interval, with ticks already
    counted (TFD_IOC_SET_TICKS)."""
    return check(lib.pr_make_timerfd(clockid, flags, value[0], value[1], interval[0],
                                     interval[1], ticks), "timerfd_create/settime")


def make_epoll(flags: int) -> int:
    return check(lib.pr_make_epoll(flags), "epoll_create1")


def make_inotify(flags: int, spare: str, watches: list[tuple[int, int, str]]) -> int:
    """An inotify instance with these (wd, mask, path) watches at exactly their wds (ascending),
    nothing queued in it (see pr_make_inotify: `spare` is a directory no watch uses)."""
    paths = [ffi.new("char[]", os.fsencode(p)) for _, _, p in watches]
    failed = ffi.new("long *")
    r = lib.pr_make_inotify(flags, os.fsencode(spare), [w for w, _, _ in watches],
                            [m for _, m, _ in watches], paths, len(watches), failed)
    if r < 0 and failed[0] >= 0:
        wd, mask, path = watches[failed[0]]
        what = "another inotify watch of the instance is on the same file" \
            if r == -errno.EEXIST else os.strerror(-r)
        raise KernelCallError(-r, "inotify_add_watch", None,
                              f"wd {wd} on {path} (mask {mask:#x}): {what}")
    return check(r, "inotify_init1/inotify_add_watch")


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
    return check(lib.pr_open_by_handle(mount_fd, handle_type, handle, len(handle), flags),
                 "open_by_handle_at")


def same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """kcmp(KCMP_FILE): the same open file description (shared offset and flags)?"""
    return bool(check(lib.pr_same_file(pid1, fd1, pid2, fd2), "kcmp(KCMP_FILE)", pid1,
                      f"fd {fd1} vs pid {pid2} fd {fd2}"))


KCMP_FILES, KCMP_FS = 2, 3


def kcmp(pid1: int, pid2: int, kind: int) -> int:
    """kcmp of a whole resource (KCMP_FILES: the fd table; KCMP_FS: root, working directory,
    umask) of two processes or threads: 0 the same one; otherwise 1 or 2, an order (sorting
    by it puts the sharers of one side by side), or 3."""
    return check(lib.pr_kcmp(pid1, pid2, kind), "kcmp", pid1, f"vs pid {pid2} (type {kind})")


def is_epoll_target(pid: int, fd: int, epoll_pid: int, efd: int, tfd: int) -> bool:
    """kcmp(KCMP_EPOLL_TFD): is pid's fd the file registered as tfd in epoll_pid's epoll efd?
    (An epoll shared by several processes holds registrations made from any of them, by
    their own fd numbers.)"""
    return bool(check(lib.pr_is_epoll_target(pid, fd, epoll_pid, efd, tfd),
                      "kcmp(KCMP_EPOLL_TFD)", pid, f"fd {fd} vs pid {epoll_pid} epoll {efd}"))


def pidfd_open(pid: int) -> int:
    return check(lib.pr_pidfd_open(pid), "pidfd_open", pid)


def pidfd_getfd(pidfd: int, fd: int, pid: int | None = None) -> int:
    return check(lib.pr_pidfd_getfd(pidfd, fd), "pidfd_getfd", pid)


def setns(fd: int, nstype: int) -> None:
    """setns(2) for the calling thread only (a network namespace is a per-thread attribute)."""
    check(lib.pr_setns(fd, nstype), "setns")


def spawn(path: str, argv: list[str], set_tid: list[int], new_pidns: bool, keep_fd: int,
          cgroup_fd: int = -1) -> int:
    args = [ffi.new("char[]", a.encode()) for a in argv]
    argv_c = ffi.new("char *[]", args + [ffi.NULL])
    tids = ffi.new("int[]", set_tid or [0])
    what = f"clone3(set_tid={set_tid}{', CLONE_NEWPID' if new_pidns else ''})"
    return check(lib.pr_spawn(path.encode(), argv_c, tids, len(set_tid), int(new_pidns), keep_fd,
                              cgroup_fd), what)


SCHED_FIELDS = ("policy", "flags", "nice", "priority", "runtime", "deadline", "period")


def sched_get(tid: int) -> tuple[int, ...]:
    """A thread's scheduling, as SCHED_FIELDS (sched_getattr, from outside)."""
    out = ffi.new("struct pr_sched *")
    check(lib.pr_sched_get(tid, out), "sched_getattr", tid)
    return tuple(getattr(out, f) for f in SCHED_FIELDS)


def sched_set(tid: int, values: tuple[int, ...]) -> None:
    attr = ffi.new("struct pr_sched *")
    for f, v in zip(SCHED_FIELDS, values):
        setattr(attr, f, v)
    check(lib.pr_sched_set(tid, attr), "sched_setattr", tid,
          ", ".join(f"{f}={v}" for f, v in zip(SCHED_FIELDS, values)))


def prlimit(pid: int, resource: int, limits: tuple[int, int] | None) -> tuple[int, int]:
    new = ffi.new("uint64_t[2]", list(limits)) if limits else ffi.NULL
    old = ffi.new("uint64_t[2]")
    check(lib.pr_prlimit(pid, resource, new, old), f"prlimit({resource})", pid)
    return old[0], old[1]


def set_pdeathsig(sig: int, parent: int) -> None:
    """Die (by sig) with our parent; raises ProcessGone if the parent is already gone."""
    check(lib.pr_set_pdeathsig(sig, parent), "prctl(PR_SET_PDEATHSIG)", parent)
