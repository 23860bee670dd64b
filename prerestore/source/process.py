"""One process of the tree on the source side: its dirty tracker, the layout it last sent, its
threads while frozen, and what it takes to read its state.

The tree-level work (which processes, freezing them all, writing the round) is SourceSession's
(session.py); this class knows one address space and one thread group."""
from __future__ import annotations

import errno
import os
import stat
import struct
import time
from dataclasses import dataclass

from ..errors import KernelCallError, ProcessGone, UnsupportedState
from ..kernel import native, procfs, tcp, vmflags
from ..kernel.native import lib
from ..kernel.tracee import KSIGACTION, STACK_T, RemoteSyscalls, Tracee, runner_area
from ..kernel.tracker import make_tracker, scan_present
from ..model import (VMFLAG_MAPPING, Credentials, FileDescriptor, PosixTimer, ProcessState,
                     SigAction, ThreadState, Vma,
                     diff_layout, free_area, intersect_ranges, memory_vmas, merge_ranges,
                     pack_ranges, ranges_bytes, subtract_ranges, unpack_ranges)

RLIMITS = 16          # RLIM_NLIMITS


TIMEVALS = struct.Struct("=qqqq")         # itimerval / itimerspec: interval, then value


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


def find_unsupported(pid: int, same_host: bool = False) -> list[str]:
    """Everything about one live process this version cannot migrate, in words. On the same
    host (same_host) fds of other kinds are handed over as they are (Husk.hand_over_fds)."""
    problems = []
    st = procfs.status(pid)
    if st.get("Seccomp", "0") != "0":
        problems.append("seccomp filters (not carried yet: the restored process would run "
                        "without them)")
    for fd in procfs.fd_numbers(pid):
        what, desc = procfs.describe_fd(pid, fd)
        if desc is None and what.startswith(("pipe:", "socket:")) and not same_host:
            continue       # carried if it stays inside the tree (see inner_ends)
        if desc is None and what in procfs.CARRIED_ANON and not same_host:
            continue       # made anew by the restorer
        if desc is None and what == procfs.INOTIFY and not same_host:
            try:
                procfs.describe_inotify(pid, fd, 0)     # every watch must have a path
            except UnsupportedState as e:
                problems.append(str(e))
            continue
        if desc is None and what.startswith(("directory ", "deleted file ", "fifo ")) and \
                not same_host:
            continue       # reopened / recreated from the image
        if desc is None and not same_host and _is_terminal(pid, fd):
            problems.append(f"fd {fd}: {what} is a terminal of this host: a terminal cannot "
                            "move")
        elif desc is None and not (same_host and procfs.can_hand_over(pid, fd, what)):
            problems.append(f"fd {fd}: {what} (unsupported file kind"
                            f"{'' if same_host else ' between hosts'})")
    layout = procfs.maps(pid)
    try:
        runner_area(pid, layout)         # a process without [vdso]: somewhere else
    except UnsupportedState as e:
        problems.append(str(e).split(": ", 1)[1])
    for v in layout:
        if v.is_shmem and v.path.startswith("/SYSV"):
            problems.append(f"System V shared memory {v.start:#x}-{v.end:#x} (not carried yet)")
        elif v.shared and not v.is_file and not v.is_special:
            problems.append(f"shared memory mapping {v.start:#x}-{v.end:#x} {v.path or '(anon)'}")
        elif v.path.startswith("/") and v.path.endswith(" (deleted)") and not v.is_shmem \
                and not same_host:
            # on one host the husk maps the very file (/proc/PID/map_files, Husk._map)
            problems.append(f"mapping {v.start:#x}-{v.end:#x} of a deleted file {v.path} "
                            "(carried on one host only)")
    return problems


def _is_terminal(pid: int, fd: int) -> bool:
    """Is the fd a terminal? Asked of a copy of it: opening a terminal anew can have effects
    (a serial line's modem signals)."""
    try:
        if not stat.S_ISCHR(procfs.stat_file(pid, f"fd/{fd}").st_mode):
            return False
        pidfd = native.pidfd_open(pid)
        try:
            mine = native.pidfd_getfd(pidfd, fd, pid)
        finally:
            os.close(pidfd)
    except OSError:
        return False
    try:
        return os.isatty(mine)
    finally:
        os.close(mine)


_FAIR = (0, 3, 5)                   # SCHED_OTHER, SCHED_BATCH, SCHED_IDLE


def default_slice() -> int:
    """The time slice a fair thread gets unless it asked for one (sched_runtime): ours."""
    global _DEFAULT_SLICE
    if _DEFAULT_SLICE is None:
        _DEFAULT_SLICE = native.sched_get(0)[4]
    return _DEFAULT_SLICE


_DEFAULT_SLICE: int | None = None


def thread_creds(pid: int, tid: int, process: Credentials) -> Credentials | None:
    """A thread's credentials where they differ from its process's (a thread may change its
    own with the raw system calls), else None."""
    mine = procfs.credentials(procfs.status(f"{pid}/task/{tid}"))
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
                    parent_copy: bytes = b"") -> MemoryScan:
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

    # ---- state ------------------------------------------------------------------------------

    def query_inside(self, layout: list[Vma], status: dict[str, str]) -> dict:
        """What only the process can tell, in one injected batch per thread: brk and the
        actions of the signals it catches or ignores (process-wide, asked in the main
        thread), clear_child_tid and sigaltstack (each thread's own). It maps and unmaps a
        scratch area (an mmap_lock writer), so it runs before the last dirty scan starts."""
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
                b.call(lib.SYS_prctl, lib.PR_GET_TID_ADDRESS, tid_addr)
                b.call(lib.SYS_sigaltstack, 0, ss_addr)
                if t is self.frozen[0]:
                    pdeath_addr = b.put(b"\0" * 8)
                    b.call(lib.SYS_brk, 0)
                    b.call(lib.SYS_prctl, lib.PR_GET_DUMPABLE)
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
                    tm_addr = b.put(b"\0" * 32 * len(timers))
                    overruns = []
                    for i, tm in enumerate(timers):
                        b.call(lib.SYS_timer_gettime, tm.id, tm_addr + 32 * i)
                        overruns.append(b.call(lib.SYS_timer_getoverrun, tm.id))
                    # mlockall(MCL_FUTURE) is in no /proc file: the scratch area, mapped by
                    # the process just now, is locked if it is set, and then populated
                    # unless with MCL_ONFAULT. Its last page is one we never touch:
                    # resident (mincore) and refused MADV_DONTNEED (EINVAL: locked) tell.
                    probe = main.scratch.addr + main.scratch.size - 4096
                    core_addr = b.put(b"\0" * 8)
                    b.call(vmflags.SYS_MINCORE, probe, 4096, core_addr)
                    b.call(lib.SYS_madvise, probe, 4096, vmflags.MADV_DONTNEED,
                           label="madvise(MADV_DONTNEED) of the scratch area (a lock probe)")
                    results = remote.run(b, check=False)
                    locked = len(results) == len(b) and results[-1] == -errno.EINVAL
                    if locked:
                        results[-1] = 0
                    if len(results) < len(b) or -4096 < results[-1] < 0:
                        _raise_failed(remote, b, results)
                else:
                    results = remote.run(b)
                data = remote.read(tid_addr, len(b.data) - (tid_addr - main.scratch.data_addr))
                rel = lambda addr: addr - tid_addr  # noqa: E731  (offsets in what we read)
                out["threads"][t.pid] = {
                    "regs": regs, "sigmask": mask,
                    "clear_child_tid": struct.unpack_from("=Q", data, rel(tid_addr))[0],
                    "sigaltstack": STACK_T.unpack_from(data, rel(ss_addr))}
                if t is self.frozen[0]:
                    out["brk"], out["dumpable"] = results[2], results[3]
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
        finally:
            main.unmap_scratch()
        return out

    def collect_state(self, layout: list[Vma], status: dict[str, str], inside: dict,
                      direct: bool) -> ProcessState:
        """All but memory, with the process frozen: what query_inside found, ptrace and
        /proc for the rest."""
        pid = self.pid
        threads = []
        process_creds = procfs.credentials(status)
        for t in self.frozen:
            mine = inside["threads"][t.pid]
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
                creds=None if t.pid == pid else thread_creds(pid, t.pid, process_creds)))
        fds = []
        for fd in procfs.fd_numbers(pid):
            what, desc, text = procfs.describe_fd_text(pid, fd)
            if desc is None:
                flags = int(procfs.parse_fdinfo(text).get("flags", "0"), 8)
                protocol = tcp.protocol(pid, fd) if not direct and what.startswith("socket:") \
                    else None
                if not direct and what.startswith("pipe:"):
                    desc = FileDescriptor(fd, "pipe", what, flags, 0,
                                          (0, int(what[6:-1])))
                elif not direct and what in procfs.CARRIED_ANON:
                    desc = procfs.describe_anon(pid, fd, what, text)
                elif not direct and what.startswith("directory "):
                    desc = FileDescriptor(fd, "dir", what[len("directory "):], flags, 0)
                elif not direct and what == procfs.INOTIFY:
                    desc = procfs.describe_inotify(pid, fd, flags, text)
                elif not direct and what.startswith("fifo "):
                    desc = procfs.describe_fifo(pid, fd, what[len("fifo "):], flags)
                elif not direct and what.startswith("deleted file "):
                    desc = procfs.describe_deleted(pid, fd, what[len("deleted file "):],
                                                   flags, text)
                elif protocol in ("TCP", "TCPv6", "UDP", "UDPv6"):
                    # its state is read from a copy of it (session.capture_sockets)
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
            fds.append(desc)
        numbers = {f.fd for f in fds}
        for f in fds:
            if f.kind == "epoll" or f.path == "anon_inode:[eventpoll]":
                for tfd, _, _ in procfs.EPOLL_ITEM.iter_unpack(f.data):
                    if tfd not in numbers:
                        raise UnsupportedState(f"pid {pid} fd {f.fd}: epoll watches fd {tfd}, "
                                               "which is no longer open (not carried)")
        return ProcessState(
            pid=pid, comm=procfs.comm(pid), exe=procfs.readlink(pid, "exe"),
            cwd=procfs.readlink(pid, "cwd"), umask=int(status.get("Umask", "0022"), 8),
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


def _raise_failed(remote: RemoteSyscalls, b, results: list[int]):
    """Raise for the first call of batch b that failed (results: what ran), as run() would."""
    i = len(results) - 1
    raise KernelCallError(-results[i], f"injected {b.labels[i]}", remote.tracee.pid,
                          "args " + ", ".join(hex(a) for a in b.calls[i][1]))


def _sorted(parts: list[bytes]) -> bytes:
    """Packed parts as one sorted packed list (the common case, one part, as it is)."""
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return parts[0] if parts else b""
    return pack_ranges(sorted(r for part in parts for r in unpack_ranges(part)))
