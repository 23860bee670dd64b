"""One process of the tree on the source side: its dirty tracker, the layout it last sent, its
threads while frozen, and what it takes to read its state.

The tree-level work (which processes, freezing them all, writing the round) is SourceSession's
(session.py); this class knows one address space and one thread group. What of one process
cannot be migrated is source/refusals.py's (find_unsupported), what of the tree
source/checks.py's."""
from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass

from ..errors import KernelCallError, ProcessGone, UnsupportedState
from ..kernel import native, procfs, seccomp, tcp, vmflags
from ..kernel.native import lib
from ..kernel.tracee import KSIGACTION, STACK_T, Batch, RemoteSyscalls, Tracee, runner_area
from ..kernel.tracker import make_tracker, scan_present
from ..model import (VMFLAG_MAPPING, Credentials, FileDescriptor, PosixTimer, ProcessState,
                     SeccompFilter, SigAction, ThreadState, Vma, diff_layout, free_area,
                     intersect_ranges, memory_vmas, merge_ranges, pack_ranges, ranges_bytes,
                     subtract_ranges, unpack_ranges)
from .checks import SHARED_KINDS
from .refusals import lock_problem, securebits_problem

RLIMITS = 16          # RLIM_NLIMITS
# PR_GET_SPECULATION_CTRL's kinds: PR_SPEC_STORE_BYPASS, _INDIRECT_BRANCH, _L1D_FLUSH
SPEC_KINDS = (0, 1, 2)


TIMEVALS = struct.Struct("=qqqq")         # itimerval / itimerspec: interval, then value
F_GETSIG, F_GETOWN_EX = 11, 16
O_PATH = 0o10000000


def _is_opath(fdinfo_text: str) -> bool:
    """From an fdinfo's "flags:" line alone (this runs for every fd inside the downtime)."""
    at = fdinfo_text.find("flags:")
    if at < 0:
        return False
    end = fdinfo_text.find("\n", at)
    return bool(int(fdinfo_text[at + 6:end if end >= 0 else None], 8) & O_PATH)


@dataclass
class MemoryScan:
    """What one round carries for one process, as packed ranges."""
    fresh: bytes
    copy: bytes
    zap: bytes
    lost: int
    scan_ms: float
    present_scan_ms: float
    inherited: int = 0          # bytes left to what a fork of the parent husk holds


def closed_target(pid: int, efd: int, tfd: int, fds: list[FileDescriptor],
                  epoll_pid: int | None = None, refuse: bool = True) -> int | None:
    """The fd of pid that holds the file registered as tfd in the epoll efd (of epoll_pid,
    default pid), where tfd itself was closed since (kcmp KCMP_EPOLL_TFD); if pid holds it
    under no fd: refused, or None."""
    for f in fds:
        if f.fd != tfd and native.is_epoll_target(pid, f.fd, epoll_pid or pid, efd, tfd):
            return f.fd
    if not refuse:
        return None
    raise UnsupportedState(
        f"pid {epoll_pid or pid} epoll fd {efd}: the file registered as fd {tfd} was closed "
        "since, and no fd of the process holds it any more (another process does, or only "
        "the epoll's registration keeps it): not carried")


def deleted_dirs(pid: int, cwd: str, root: str) -> dict[str, tuple[int, int, int]]:
    """The working directory or root, if deleted (the link reads " (deleted)", and, since a
    directory may be named so, no name is left to it): (mode, uid, gid) by "cwd"/"root"."""
    out = {}
    for name, link in (("cwd", cwd), ("root", root)):
        if link.endswith(" (deleted)"):
            st = procfs.stat_file(pid, name)
            if st.st_nlink == 0:
                out[name] = (st.st_mode & 0o7777, st.st_uid, st.st_gid)
    return out


_FAIR = (0, 3, 5)                   # SCHED_OTHER, SCHED_BATCH, SCHED_IDLE


def default_slice() -> int:
    """The time slice a fair thread gets unless it asked for one (sched_runtime): ours."""
    global _DEFAULT_SLICE
    if _DEFAULT_SLICE is None:
        _DEFAULT_SLICE = native.sched_get(0)[4]
    return _DEFAULT_SLICE


_DEFAULT_SLICE: int | None = None


def thread_creds(pid: int, tid: int, process: Credentials,
                 status: dict[str, str] | None = None) -> Credentials | None:
    """A thread's credentials where they differ from its process's (a thread may change its
    own with the raw system calls), else None. status: its /proc status, if read already."""
    mine = procfs.credentials(status or procfs.status(f"{pid}/task/{tid}"))
    return None if mine == process else mine


def thread_sched(tid: int) -> tuple[int, ...]:
    """A thread's scheduling, with a fair policy's slice 0 where it is the kernel's default
    (sched_getattr reports the slice in use either way; setting it would make it custom)."""
    policy, flags, nice, prio, runtime, deadline, period = native.sched_get(tid)
    if policy in _FAIR and runtime == default_slice():
        runtime = 0
    return policy, flags, nice, prio, runtime, deadline, period


class ProcessSource:
    """The source side of one process (pid) of the tree."""

    def __init__(self, task: procfs.TreeTask, *, track: bool, tracking: str, direct: bool):
        self.pid = task.pid
        # Shared memory objects: a destination on this host maps the very same object
        # (/proc/PID/map_files), elsewhere they are recreated and their pages carried.
        self.shmem = not direct
        self.task = task                  # its place in the tree when last looked at
        self.tracker = None
        self.pagemap_fd = self.mem_fd = -1
        try:
            self.tracker = make_tracker(task.pid, tracking) if track else None
            self.pagemap_fd = procfs.open_file(task.pid, "pagemap", os.O_RDONLY)
            self.mem_fd = procfs.open_file(task.pid, "mem", os.O_RDONLY)
        except BaseException as e:
            self.close()
            if self.gone(e):
                raise ProcessGone(3, f"follow pid {task.pid} ({e})", task.pid) from None
            raise
        self.last_layout: list[Vma] | None = None
        self.first = True                  # the next round is its first at the destination
        # Ranges it inherited from its parent's husk at its first round, and that the next
        # round checks once more against what the parent wrote meanwhile (see scan_memory).
        self.inherited: list[tuple[int, int]] = []
        self.frozen: list[Tracee] = []     # every thread, the main one first, while frozen
        self.remotes: dict = {}            # tid -> RemoteSyscalls of a thread we injected into
        self.scratch_remote = None         # the one whose scratch area query_inside left mapped
        # each thread's seccomp filters (oldest first) as last read: read during the rounds,
        # again at the final step only for a thread whose count changed (filters are only
        # ever added, so an unchanged count is an unchanged list)
        self.seccomp: dict[int, list[SeccompFilter]] = {}
        self._maps_raw, self._maps_parsed = b"", []
        # the VmFlags carried (vm_flags) as last read, and the layout they were read with
        self._flags: list[tuple[int, int, int]] = []
        self._flags_layout: list[Vma] | None = None

    def gone(self, error: BaseException | None = None) -> bool:
        """Has the process exited, or is it exiting (`error`: ESRCH from a call on it), or
        has its pid gone to another one since we saw it?"""
        if getattr(error, "errno", None) == 3:               # ESRCH
            return True
        try:
            fields = procfs.stat_fields(self.pid)
        except ProcessGone:
            return True
        return int(fields[22]) != self.task.starttime or fields[3] in ("Z", "X") or \
            bool(int(fields[9]) & 0x4)                      # PF_EXITING: on its way out

    # ---- memory -----------------------------------------------------------------------------

    def layout(self) -> list[Vma]:
        """The current maps; parsed only when they changed since the last look (parsing is
        the expensive part, and on the downtime path the maps rarely changed)."""
        raw = procfs.maps_raw(self.pid)
        if raw != self._maps_raw:
            self._maps_raw, self._maps_parsed = raw, procfs.parse_maps(raw)
        return self._maps_parsed

    def vm_flags(self, layout: list[Vma], final: bool = False) -> list[tuple[int, int, int]]:
        """The carried VmFlags of layout's VMAs (kernel/vmflags.py), read from smaps in every
        round. smaps walks every page table (12 ms for 64 MiB): the final step reads it again
        only if a round saw madvise or lock flags in use, or a VMA is new since the last round
        (a heap that grew, an area cut in two by mprotect keep the flags of what they came
        from, vmflags.inherited); the mapping flags (MAP_NORESERVE, VM_ACCOUNT...) change
        only with the layout. Not seen then: an madvise or mlock of an existing area, in a
        process that had none, between the last round and the freeze."""
        if final and self._flags_layout is not None and \
                not any(bits & ~VMFLAG_MAPPING for _, _, bits in self._flags):
            if layout is self._flags_layout:
                return self._flags
            kept = vmflags.inherited(self._flags_layout, self._flags, layout)
            if kept is not None:
                return kept
        self._flags = vmflags.carried(layout, vmflags.read(self.pid))
        self._flags_layout = layout
        return self._flags

    def split_layout(self, layout: list[Vma], base: list[Vma] | None = None
                     ) -> tuple[list, list]:
        """(fresh, kept): areas new since `base` (the layout last sent, or for a first round
        the parent's), to be sent whole, and the areas where changes are enough."""
        mem = memory_vmas(layout, self.shmem)
        base = base if base is not None else self.last_layout
        if base is None:
            return [(v.start, v.end) for v in mem], []
        d = diff_layout(memory_vmas(base, self.shmem), mem)
        fresh = [(v.start, v.end) for v in d.fresh]
        return fresh, subtract_ranges([(v.start, v.end) for v in mem], fresh)

    def scan_memory(self, layout: list[Vma], *, final: bool = False, written=None,
                    parent: "ProcessSource | None" = None,
                    parent_layout: list[Vma] | None = None,
                    parent_copy: bytes = b"",
                    always: list[tuple[int, int]] | None = None) -> MemoryScan:
        """Which ranges this round carries.

        A later round: areas new since the last round (or whose tracking was lost) whole,
        elsewhere the pages written since the last scan (`written`: the result of
        scan_written on the kept areas, if already done).

        A first round of a child: the destination forks it from its parent's husk, so the
        areas it shares with its parent's layout start out as the parent's pages. Pages the
        two still share (copy-on-write, same physical page) are left to that; the child's own
        pages are carried and the pages it lacks are dropped (`zap`). The parent's husk gets
        its pages after the parent's scan, so a page the parent writes in between reaches the
        child's husk too: the next round of the child carries again whatever the parent
        wrote (`parent_copy`) inside what it inherited."""
        t0 = time.perf_counter()
        inherit = self.first and parent is not None
        fresh, kept = self.split_layout(layout, parent_layout if inherit else None)
        copy: list[bytes] = []      # packed parts; per-range work stays in native code
        zap: list[bytes] = []
        lost = inherited = 0
        if inherit:
            if self.tracker and not final:       # track from now on, then look
                self.tracker.protect([(v.start, v.end)
                                      for v in memory_vmas(layout, self.shmem)])
            if kept:
                c, d = native.pagemap_vs_parent(self.pagemap_fd, parent.pagemap_fd,
                                                pack_ranges(kept), self.pid)
                copy.append(c)
                zap.append(d)
                inherited = sum(e - s for s, e in kept) - ranges_bytes(c) - ranges_bytes(d)
            self.inherited = kept
        elif self.tracker and kept:
            res, untracked = written or self.tracker.scan_written(pack_ranges(kept))
            # an area whose tracking is gone (unmapped and mapped again alike): resend it whole
            fresh += [kept[i] for i in untracked]
            lost = len(untracked)
            pages, _ = res.split()
            if pages:
                c, d = self.tracker.classify(pages)
                copy.append(c)
                zap.append(d)
        if always and kept:
            # pages carried whatever the scan says (the final round: each thread's rseq area,
            # see SourceSession.dump)
            again = intersect_ranges(merge_ranges(sorted(always)), kept)
            if again:
                joined = [r for part in copy for r in unpack_ranges(part)]
                copy = [pack_ranges(merge_ranges(sorted(joined + again)))]
                zap = [pack_ranges(subtract_ranges(
                    [r for part in zap for r in unpack_ranges(part)], again))]
        if self.inherited and not inherit:
            again = intersect_ranges(unpack_ranges(parent_copy) if parent_copy else [],
                                     intersect_ranges(self.inherited, kept))
            if again:
                joined = [r for part in copy for r in unpack_ranges(part)]
                copy = [pack_ranges(merge_ranges(joined + again))]
                zap = [pack_ranges(subtract_ranges(
                    [r for part in zap for r in unpack_ranges(part)], again))]
            self.inherited = []
        fresh.sort()
        if self.tracker and fresh and not final and not inherit:
            self.tracker.protect(fresh)            # after the final round nothing is tracked
        t1 = time.perf_counter()
        if fresh:
            shm = [(v.start, v.end) for v in layout if v.is_shmem] if self.shmem else []
            private, shared = subtract_ranges(fresh, shm), intersect_ranges(fresh, shm)
            for areas, file_pages in ((private, False), (shared, True)):
                if areas:
                    copy.append(scan_present(self.pagemap_fd, pack_ranges(areas), self.pid,
                                             file_pages).split()[0])
        t2 = time.perf_counter()
        return MemoryScan(pack_ranges(fresh), _sorted(copy), _sorted(zap), lost,
                          (t2 - t0) * 1e3, (t2 - t1) * 1e3, inherited)

    # ---- seccomp ----------------------------------------------------------------------------

    def follow_seccomp(self, status: dict[str, str]) -> None:
        """During the rounds: read the seccomp filters of threads that have some we have not
        read (reading needs the thread in a ptrace stop: it is interrupted for as long as
        that takes, then goes on). Every thread is looked at (status: the main thread's):
        each has filters of its own, and the final step suspends them in a process with
        some (query_inside) from what is known by then."""
        stopped = None
        for tid in procfs.threads(self.pid):
            try:
                st = status if tid == self.pid else procfs.status(f"{self.pid}/task/{tid}")
            except ProcessGone:
                continue
            count = seccomp.filter_count(st)
            if count == len(self.seccomp.get(tid, ())):
                continue
            if stopped is None:
                stopped = procfs.stat_fields(self.pid)[3] in ("T", "t")
            if stopped:
                # stopped by someone else: read at the final step (frozen); known to have
                # filters meanwhile
                self.seccomp.setdefault(tid, [])
                continue
            try:
                # interrupted, not parked: nothing of it is changed, and should we die now
                # it must run on (a parked task would stay stopped)
                with Tracee(tid) as t:
                    count = seccomp.filter_count(procfs.status(f"{self.pid}/task/{tid}"))
                    self.seccomp[tid] = seccomp.read_filters(t.pid, count)
            except (ProcessGone, KernelCallError):
                self.seccomp[tid] = []     # gone, or not ours to stop now: read when frozen
        live = set(procfs.threads(self.pid))
        for tid in [t for t in self.seccomp if t not in live]:
            del self.seccomp[tid]

    def suspend_seccomp(self) -> None:
        """Frozen: the calls we inject must not be seen by its seccomp filters (or strict
        mode), which could deny them, or kill it (PTRACE_O_SUSPEND_SECCOMP: until we let it
        go). Set once every thread is stopped: a task running under it would make its own
        calls unfiltered."""
        for t in self.frozen:
            try:
                native.set_options(t.pid, lib.PTRACE_O_SUSPEND_SECCOMP)
            except KernelCallError as e:
                raise UnsupportedState(f"pid {self.pid} thread {t.pid}: has seccomp filters, "
                                       "and calls cannot be made in it past them "
                                       f"(PTRACE_O_SUSPEND_SECCOMP needs CAP_SYS_ADMIN and "
                                       f"no seccomp of our own): {e}") from None

    def seccomp_chain(self, tid: int, status: dict[str, str],
                      table: dict[SeccompFilter, int]) -> list[int]:
        """At the final step (the thread frozen): its filters as indices in `table` (the
        process's distinct filters, added to). Read again only if the count changed."""
        problem = seccomp.strict_problem(tid, status)
        if problem:
            raise UnsupportedState(f"pid {self.pid} {problem}")
        count = seccomp.filter_count(status)
        if not count:
            return []
        if len(self.seccomp.get(tid, ())) != count:
            self.seccomp[tid] = seccomp.read_filters(tid, count)
        return [table.setdefault(f, len(table)) for f in self.seccomp[tid]]

    # ---- state ------------------------------------------------------------------------------

    def query_inside(self, layout: list[Vma], status: dict[str, str]) -> dict:
        """What only the process can tell, in one injected batch per thread: brk and the
        actions of the signals it catches or ignores (process-wide, asked in the main
        thread), clear_child_tid and sigaltstack (each thread's own). It maps a scratch area
        (an mmap_lock writer), so it runs before the last dirty scan starts, and leaves it
        mapped (see the end)."""
        if status.get("Seccomp", "0") != "0" or self.seccomp:
            self.suspend_seccomp()
        handled = int(status.get("SigCgt", "0"), 16) | int(status.get("SigIgn", "0"), 16)
        timers = procfs.timers(self.pid)
        signals = [sig for sig in range(1, 65) if handled >> (sig - 1) & 1]
        main = RemoteSyscalls(self.frozen[0], runner_area(self.pid, layout))
        # Parked tasks (kernel/tracee.py): each thread's batch saves its own registers and mask
        # on its stack and leaves it held (it stops itself if we die, never runs on as
        # someone else); SourceSession.resume() gives them back, a kill needs nothing.
        main.own_state()                   # before its first call changes anything
        main.map_scratch(free_area([layout], RemoteSyscalls.SCRATCH_SIZE))
        self.remotes = {t.pid: main if t is self.frozen[0] else main.sharing(t)
                        for t in self.frozen}
        saved = [(t, *self.remotes[t.pid].own_state()) for t in self.frozen]
        out: dict = {"threads": {}}
        try:
            for t, regs, mask in saved:
                remote = self.remotes[t.pid]
                b = remote.batch()
                tid_addr = b.put(b"\0" * 8)
                ss_addr = b.put(b"\0" * STACK_T.size)
                sa_addr = b.put(b"\0" * KSIGACTION.size * 65)
                name_addr = b.put(b"\0" * 16)
                b.call(lib.SYS_prctl, lib.PR_GET_TID_ADDRESS, tid_addr)
                b.call(lib.SYS_sigaltstack, 0, ss_addr)
                b.call(lib.SYS_prctl, lib.PR_GET_NAME, name_addr)
                slack = b.call(lib.SYS_prctl, lib.PR_GET_TIMERSLACK)
                tsc_addr = b.put(b"\0" * 8)
                b.call(lib.SYS_prctl, lib.PR_GET_TSC, tsc_addr)
                spec = [b.call(lib.SYS_prctl, lib.PR_GET_SPECULATION_CTRL, which, 0, 0, 0)
                        for which in SPEC_KINDS]
                mce = b.call(lib.SYS_prctl, lib.PR_MCE_KILL_GET, 0, 0, 0, 0)
                if t is self.frozen[0]:
                    pdeath_addr = b.put(b"\0" * 8)
                    brk = b.call(lib.SYS_brk, 0)
                    dumpable = b.call(lib.SYS_prctl, lib.PR_GET_DUMPABLE)
                    b.call(lib.SYS_prctl, lib.PR_GET_PDEATHSIG, pdeath_addr)
                    b.call(lib.SYS_prctl, lib.PR_GET_CHILD_SUBREAPER, pdeath_addr + 4)
                    # from inside: reading another user's limits from outside needs
                    # CAP_SYS_RESOURCE, which root lacks on these hosts
                    rl_addr = b.put(b"\0" * 16 * RLIMITS)
                    for res in range(RLIMITS):
                        b.call(lib.SYS_prlimit64, 0, res, 0, rl_addr + 16 * res)
                    for sig in signals:
                        b.call(lib.SYS_rt_sigaction, sig, 0, sa_addr + KSIGACTION.size * sig, 8)
                    it_addr = b.put(b"\0" * 32 * 3)
                    for which in range(3):
                        b.call(lib.SYS_getitimer, which, it_addr + 32 * which)
                    # each fd's owner and signal for signal-driven I/O (F_GETOWN_EX,
                    # F_GETSIG): /proc does not show them. Not of an O_PATH fd, where
                    # fcntl refuses them (EBADF) and they cannot be set either.
                    out["fdinfo"] = fdinfo = {fd: procfs.fdinfo_text(self.pid, fd)
                                              for fd in procfs.fd_numbers(self.pid)}
                    asked = [fd for fd, text in fdinfo.items() if not _is_opath(text)]
                    own_addr = b.put(b"\0" * 8 * len(asked))
                    owner_calls = []
                    for i, fd in enumerate(asked):
                        b.call(lib.SYS_fcntl, fd, F_GETOWN_EX, own_addr + 8 * i,
                               label=f"fcntl(fd {fd}, F_GETOWN_EX)")
                        owner_calls.append(b.call(lib.SYS_fcntl, fd, F_GETSIG,
                                                  label=f"fcntl(fd {fd}, F_GETSIG)"))
                    tm_addr = b.put(b"\0" * 32 * len(timers))
                    overruns = []
                    for i, tm in enumerate(timers):
                        b.call(lib.SYS_timer_gettime, tm.id, tm_addr + 32 * i)
                        overruns.append(b.call(lib.SYS_timer_getoverrun, tm.id))
                    securebits = b.call(lib.SYS_prctl, lib.PR_GET_SECUREBITS, 0, 0, 0, 0)
                    # mlockall(MCL_FUTURE) is in no /proc file: the scratch area, mapped by
                    # the process just now, is locked if it is set, and then populated
                    # unless with MCL_ONFAULT. Its last page is one we never touch:
                    # resident (mincore) and refused MADV_DONTNEED (EINVAL: locked) tell.
                    probe = main.scratch.addr + main.scratch.size - 4096
                    core_addr = b.put(b"\0" * 8)
                    b.call(vmflags.SYS_MINCORE, probe, 4096, core_addr)
                    lock_probe = b.call(
                        lib.SYS_madvise, probe, 4096, vmflags.MADV_DONTNEED,
                        label="madvise(MADV_DONTNEED) of the scratch area (a lock probe)")
                    # last, as they may fail on an older kernel (EINVAL: unknown there); the
                    # lock probe fails (EINVAL) where MCL_FUTURE holds
                    optional = {
                        lock_probe: "lock_probe",
                        b.call(lib.SYS_prctl, lib.PR_GET_MDWE_, 0, 0, 0, 0): "mdwe",
                        b.call(lib.SYS_prctl, lib.PR_GET_MEMORY_MERGE_, 0, 0, 0, 0):
                            "memory_merge",
                        b.call(lib.SYS_membarrier, lib.MEMBARRIER_GET_REGISTRATIONS, 0, 0):
                            "membarrier"}
                    results = _run_tolerant(remote, b, optional)
                    for i, name in optional.items():
                        out[name] = results[i] or 0
                    locked = results[lock_probe] is None
                else:
                    results = remote.run(b)
                data = remote.read(tid_addr, len(b.data) - (tid_addr - main.scratch.data_addr))
                rel = lambda addr: addr - tid_addr  # noqa: E731  (offsets in what we read)
                out["threads"][t.pid] = {
                    "regs": regs, "sigmask": mask,
                    "clear_child_tid": struct.unpack_from("=Q", data, rel(tid_addr))[0],
                    "sigaltstack": STACK_T.unpack_from(data, rel(ss_addr)),
                    "name": data[rel(name_addr):rel(name_addr) + 16].split(b"\0")[0].decode(
                        errors="surrogateescape"),
                    "timerslack": results[slack] & 0xFFFFFFFFFFFFFFFF,
                    "tsc": struct.unpack_from("=i", data, rel(tsc_addr))[0],
                    "spec": tuple(results[i] for i in spec), "mce_kill": results[mce]}
                if t is self.frozen[0]:
                    out["brk"], out["dumpable"] = results[brk], results[dumpable]
                    out["securebits"] = results[securebits]
                    out["pdeathsig"], out["child_subreaper"] = struct.unpack_from(
                        "=ii", data, rel(pdeath_addr))
                    out["rlimits"] = {res: struct.unpack_from("=QQ", data, rel(rl_addr + 16 * res))
                                      for res in range(RLIMITS)}
                    out["sigactions"] = {
                        sig: SigAction(*KSIGACTION.unpack_from(
                            data, rel(sa_addr + KSIGACTION.size * sig))) for sig in signals}
                    # itimerval: interval (s, us), then value (s, us)
                    out["itimers"] = [TIMEVALS.unpack_from(data, rel(it_addr + 32 * w))
                                      for w in range(3)]
                    out["owners"] = {}
                    for i, fd in enumerate(asked):
                        kind, owner = struct.unpack_from("=ii", data, rel(own_addr + 8 * i))
                        signal = results[owner_calls[i]]
                        if (kind, owner, signal) != (0, 0, 0):
                            out["owners"][fd] = ((kind, owner), signal)
                    out["mlock_future"] = 0 if not locked else vmflags.MCL_FUTURE | (
                        0 if data[rel(core_addr)] & 1 else vmflags.MCL_ONFAULT)
                    index = {th.pid: i for i, th in enumerate(self.frozen)}
                    out["timers"] = []
                    for i, tm in enumerate(timers):
                        i_s, i_ns, r_s, r_ns = TIMEVALS.unpack_from(data, rel(tm_addr + 32 * i))
                        out["timers"].append(PosixTimer(
                            tm.id, tm.clock, tm.signo, tm.value, tm.notify,
                            index.get(tm.target, 0) if tm.notify & 4 else 0, (i_s, i_ns),
                            (r_s, r_ns), results[overruns[i]]))
        except BaseException:
            main.unmap_scratch()
            raise
        # Left mapped (a round trip less in the downtime): the layout was read before it was
        # mapped, so no round carries it; the source is killed once its copy runs, a
        # rollback unmaps it (SourceSession._unhold), `recover` finds it by its mark.
        self.scratch_remote = main
        return out

    def collect_state(self, layout: list[Vma], status: dict[str, str], inside: dict,
                      direct: bool, external_fds: frozenset[str] = frozenset()
                      ) -> ProcessState:
        """All but memory, with the process frozen: what query_inside found, ptrace and
        /proc for the rest. external_fds: objects the destination is given in their place
        (kind "inherit": the restorer installs the fd it was given for that name)."""
        pid = self.pid
        threads = []
        process_creds = procfs.credentials(status)
        filters: dict[SeccompFilter, int] = {}
        for t in self.frozen:
            if t.pid != pid:
                # checked before the freeze too (sharing_problems): a thread may have
                # unshared since, and its own would be lost
                for kind, _, what in SHARED_KINDS:
                    if native.kcmp(pid, t.pid, kind) != 0:
                        raise UnsupportedState(f"pid {pid} thread {t.pid}: has its own {what}, "
                                               "apart from its process's (unshare): not carried")
            mine = inside["threads"][t.pid]
            tstatus = status if t.pid == pid else procfs.status(f"{pid}/task/{t.pid}")
            ss_sp, ss_flags, _, ss_size = mine["sigaltstack"]
            rseq = None
            try:
                ptr, size, sig, _ = native.get_rseq(t.pid)
                rseq = (ptr, size, sig) if ptr else None
            except KernelCallError:
                pass
            threads.append(ThreadState(
                tid=t.pid, regs=mine["regs"], xstate=t.xstate(), sigmask=mine["sigmask"],
                rseq=rseq, robust_list=native.get_robust_list(t.pid),
                clear_child_tid=mine["clear_child_tid"], sigaltstack=(ss_sp, ss_flags, ss_size),
                pending=native.peek_siginfo(t.pid, shared=False), sched=thread_sched(t.pid),
                cpus=sorted(os.sched_getaffinity(t.pid)),
                creds=None if t.pid == pid else thread_creds(pid, t.pid, process_creds,
                                                             tstatus),
                name=mine["name"], timerslack=mine["timerslack"], tsc=mine["tsc"],
                spec=mine["spec"], mce_kill=mine["mce_kill"],
                seccomp=self.seccomp_chain(t.pid, tstatus, filters)))
        fds = []
        fdinfo = inside.get("fdinfo", {})
        for fd in fdinfo or procfs.fd_numbers(pid):
            what, desc, text = procfs.describe_fd_text(pid, fd, fdinfo.get(fd))
            if what in external_fds:
                desc = FileDescriptor(fd, "inherit", what,
                                      int(procfs.parse_fdinfo(text).get("flags", "0"), 8), 0)
            elif desc is None:
                flags = int(procfs.parse_fdinfo(text).get("flags", "0"), 8)
                protocol = tcp.protocol(pid, fd) if not direct and what.startswith("socket:") \
                    else None
                if not direct and what.startswith("pipe:"):
                    desc = FileDescriptor(fd, "pipe", what, flags, 0,
                                          (0, int(what[6:-1])))
                elif not direct and what in procfs.CARRIED_ANON:
                    desc = procfs.describe_anon(pid, fd, what, text)
                elif not direct and what.startswith("directory "):
                    # its position: where a readdir in progress goes on (a cookie of the
                    # file system's, valid for the same directory on the same file system)
                    desc = FileDescriptor(fd, "dir", what[len("directory "):], flags,
                                          int(procfs.parse_fdinfo(text).get("pos", "0")))
                elif not direct and what == procfs.INOTIFY:
                    desc = procfs.describe_inotify(pid, fd, flags, text)
                elif not direct and what.startswith("fifo "):
                    desc = procfs.describe_fifo(pid, fd, what[len("fifo "):], flags)
                elif not direct and what.startswith("deleted file "):
                    desc = procfs.describe_deleted(pid, fd, what[len("deleted file "):],
                                                   flags, text)
                elif protocol in ("TCP", "TCPv6", "UDP", "UDPv6"):
                    # its state is read from a copy of it (capture.capture_sockets)
                    kind = "tcp" if protocol.startswith("TCP") else "udp"
                    desc = FileDescriptor(fd, kind, what, flags, 0, (0, int(what[8:-1])))
                elif not direct and what.startswith("socket:"):
                    # a unix socket (checked before): its state is read on the frozen
                    # tree (unixsock.capture); dev_inode (0, its inode)
                    desc = FileDescriptor(fd, "unix", what, flags, 0, (0, int(what[8:-1])))
                elif not (direct and procfs.can_hand_over(pid, fd, what)):
                    raise UnsupportedState(f"pid {pid} fd {fd}: {what} (unsupported file kind)")
                else:
                    desc = FileDescriptor(fd, "handover", what, flags, 0)
                    if what == "anon_inode:[eventpoll]":
                        # its registrations: those of signalfds are made again in the husk
                        desc.data = procfs.describe_anon(pid, fd, what, text).data
            if "lock:" in text:
                problem = lock_problem(fd, what, text, direct, desc.kind)
                if problem:
                    raise UnsupportedState(f"pid {pid} {problem}")
                if direct and desc.kind != "handover":
                    # its flock, OFD lock or lease is the open file's: hand over that file
                    desc = FileDescriptor(fd, "handover", what, desc.flags, 0)
            if fd in inside.get("owners", {}):
                desc.owner, desc.signal = inside["owners"][fd]
            fds.append(desc)
        problem = securebits_problem(pid, inside["securebits"], process_creds)
        if problem:
            raise UnsupportedState(problem)
        numbers = {f.fd for f in fds}
        for f in fds:
            if f.path == "anon_inode:[eventpoll]" and f.kind == "handover":
                # handed over, it keeps its registrations, but a signalfd's is made again
                # from the husk (Husk._register_epoll): one made under a number closed
                # since is made again from the fd that holds its file now. (An image's
                # epoll: see capture.place_epoll_registrations.)
                for tfd, _, _ in procfs.EPOLL_ITEM.iter_unpack(f.data):
                    if tfd not in numbers:
                        held = closed_target(pid, f.fd, tfd, fds, refuse=False)
                        if held is not None:
                            f.closed_targets[tfd] = held
                        # else: held by another process, kept as it is (see
                        # capture.check_handed_epolls)
        cwd, root = procfs.readlink(pid, "cwd"), procfs.readlink(pid, "root")
        return ProcessState(
            pid=pid, comm=procfs.comm(pid), exe=procfs.readlink(pid, "exe"),
            cwd=cwd, root=root, deleted_dirs=deleted_dirs(pid, cwd, root),
            umask=int(status.get("Umask", "0022"), 8),
            mm=procfs.mm_fields(procfs.stat_fields(pid), inside["brk"]), auxv=procfs.auxv(pid),
            rlimits=inside["rlimits"], sigactions=inside["sigactions"], fds=fds,
            threads=threads,
            shared_pending=native.peek_siginfo(pid, shared=True),
            cpus=sorted(os.sched_getaffinity(pid)), creds=procfs.credentials(status),
            dumpable=inside["dumpable"], pdeathsig=inside["pdeathsig"],
            child_subreaper=bool(inside["child_subreaper"]),
            timers=inside["timers"],
            itimers=list(inside["itimers"]) if any(map(any, inside["itimers"])) else [],
            oom_score_adj=procfs.oom_score_adj(pid), personality=procfs.personality(pid),
            thp_disable=status.get("THP_enabled", "1").strip() == "0",
            securebits=inside["securebits"], mdwe=inside["mdwe"],
            memory_merge=bool(inside["memory_merge"]), membarrier=inside["membarrier"],
            loginuid=procfs.loginuid(pid), seccomp_filters=list(filters),
            mlock_future=inside.get("mlock_future", 0))

    def close(self) -> None:
        if self.tracker:
            self.tracker.close()
            self.tracker = None
        for fd in (self.pagemap_fd, self.mem_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.pagemap_fd = self.mem_fd = -1


def _run_tolerant(remote: RemoteSyscalls, b, optional: dict[int, str]) -> list:
    """Run a batch whose calls at the indexes in `optional` may fail (a query an older kernel
    lacks): such a call's result is None, and the calls after it run in a further batch (a
    batch stops at its first error). Any other failure raises as run() does."""
    results: list = remote.run(b, check=False)
    while results and -4096 < results[-1] < 0:
        failed = len(results) - 1
        if failed not in optional:
            raise KernelCallError(-results[failed], f"injected {b.labels[failed]}",
                                  remote.tracee.pid,
                                  "args " + ", ".join(hex(a) for a in b.calls[failed][1]))
        results[failed] = None
        if failed + 1 == len(b.calls):
            break
        # the data is in place already, outputs of the calls that ran included: not again
        rest = Batch(b.scratch, b.calls[failed + 1:], b.labels[failed + 1:], bytearray())
        more = remote.run(rest, check=False)
        results += more
        if not more:
            break
    return results


def _sorted(parts: list[bytes]) -> bytes:
    """Packed parts as one sorted packed list (the common case, one part, as it is)."""
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return parts[0] if parts else b""
    return pack_ranges(sorted(r for part in parts for r in unpack_ranges(part)))
