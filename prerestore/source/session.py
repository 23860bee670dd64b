"""The source side of a migration: rounds of memory while the process runs, then the final
image with the process frozen.

A SourceSession lives as long as the migration: it owns the dirty tracker, remembers the layout
it last sent, and, once frozen, holds the process stopped under ptrace until told to kill it
(the destination runs) or to resume it (rollback)."""
from __future__ import annotations

import os
import platform
import socket
import struct
import time
import threading
import uuid
from dataclasses import dataclass

from ..errors import KernelCallError, ProcessGone, UnsupportedState
from ..image import schema
from ..kernel import native, procfs
from ..kernel.native import lib
from ..kernel.tracee import ALL_SIGNALS, KSIGACTION, STACK_T, RemoteSyscalls, Tracee
from ..kernel.tracker import make_tracker, scan_present
from ..model import (AddressSpaceRound, FileDescriptor, ProcessState, Round, SigAction, ThreadState,
                     Vma, diff_layout, free_area, memory_vmas, pack_ranges, ranges_bytes)



RLIMITS = 16          # RLIM_NLIMITS


@dataclass
class MemoryScan:
    """What one round carries, as packed ranges."""
    fresh: bytes
    copy: bytes
    zap: bytes
    lost: int
    scan_ms: float
    present_scan_ms: float


def find_unsupported(pid: int, same_host: bool = False) -> list[str]:
    """Everything about the process this version cannot migrate, in words. On the same host
    (same_host) fds of other kinds are handed over as they are (see Husk.hand_over_fds)."""
    problems = []
    st = procfs.status(pid)
    if st.get("State", "").startswith(("Z", "X")):
        problems.append(f"process {pid} is a zombie")
    if st.get("Seccomp", "0") != "0":
        problems.append("seccomp filters (not carried yet: the restored process would run "
                        "without them)")
    creds = procfs.credentials(st)
    for tid in procfs.threads(pid)[1:]:
        try:
            if procfs.credentials(procfs.status(f"{pid}/task/{tid}")) != creds:
                problems.append(f"thread {tid} has credentials of its own")
        except ProcessGone:
            pass
    kids = procfs.children(pid)
    if kids:
        problems.append(f"child processes {kids} (process trees are not supported yet)")
    for fd in procfs.fd_numbers(pid):
        what, desc = procfs.describe_fd(pid, fd)
        if desc is None and not (same_host and procfs.can_hand_over(pid, fd, what)):
            problems.append(f"fd {fd}: {what} (unsupported file kind"
                            f"{'' if same_host else ' between hosts'})")
    for v in procfs.maps(pid):
        if v.shared and not v.is_file:
            problems.append(f"shared memory mapping {v.start:#x}-{v.end:#x} {v.path or '(anon)'}")
        elif v.path.startswith("/") and v.path.endswith(" (deleted)"):
            problems.append(f"mapping of a deleted file {v.path}")
    return problems


def check_supported(pid: int, same_host: bool = False) -> None:
    problems = find_unsupported(pid, same_host)
    if problems:
        raise UnsupportedState(f"cannot migrate pid {pid}: " + "; ".join(problems))


class SourceSession:
    """Produces the rounds of one process (pid)."""

    def __init__(self, pid: int, *, track: bool = True, direct: bool = False,
                 tracking: str = "auto"):
        check_supported(pid, direct)
        self.pid = pid
        self.direct = direct      # rounds name the pages; the destination reads them from us
        self.tracker = make_tracker(pid, tracking) if track else None
        self.pagemap_fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        self.last_layout: list[Vma] | None = None
        self.last_round: tuple[str, Round] | None = None
        self.frozen: list[Tracee] = []     # every thread, the main one first, while frozen
        self._maps_raw, self._maps_parsed = b"", []
        self.source_info = {
            "host": socket.gethostname(), "kernel": platform.release(), "pid": pid,
            "boot_id": procfs.boot_id(), "starttime": int(procfs.stat_fields(pid)[22]),
            "tracking": self.tracker.mode if self.tracker else None}

    # ---- rounds -----------------------------------------------------------------------------

    def predump(self, directory: str) -> Round:
        """One pre-copy round while the process runs."""
        check_supported(self.pid, self.direct)
        return self._write_round(directory, "predump", state=None)

    def last_cpu(self) -> int:
        """The CPU the process last ran on."""
        return int(procfs.stat_fields(self.pid)[39])

    def dump(self, directory: str, *, write: bool = True, cpu: int | None = None) -> Round:
        """Freeze the process and make the final image (written to directory unless
        write=False: the caller hands it over in-band and writes it after the switch).
        The process stays frozen (self.frozen) until kill_frozen() or resume().

        cpu: run on that CPU meanwhile. Every injected batch is a round trip to the
        process; waking a task on another CPU costs an IPI, which in a VM can take longer
        than the work itself, so the whole final step runs on one CPU."""
        check_supported(self.pid, self.direct)      # refuse before freezing
        if cpu is not None:
            mask = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {cpu})
            try:
                return self.dump(directory, write=write)
            finally:
                os.sched_setaffinity(0, mask)
        t0 = time.monotonic()          # the clock the destination reports resumption in
        try:
            self._freeze_all_threads()
            t_frozen = time.monotonic()
            status = procfs.status(self.pid)          # it may have changed since the check
            if procfs.children(self.pid):
                raise UnsupportedState(f"pid {self.pid} started a child process while being "
                                       "frozen")
            layout = self._layout()
            # The last dirty scan is kernel time in one native call (no GIL held, no ptrace):
            # it runs in a thread on another CPU while this one, the tracer, collects the
            # state. The thread does nothing but that call, so it never holds the GIL for long.
            # (Measured: about 0.5 ms off the downtime at 4 GiB, noise at 1 GiB.)
            inside = self._query_inside(layout, status)
            scanned: dict = {}
            worker = None
            _, kept = self._split_layout(layout)
            if self.tracker and kept:
                worker = threading.Thread(target=self._scan_in_thread,
                                          args=(pack_ranges(kept), scanned))
                worker.start()
            state = self._collect_state(layout, status, inside)
            t_state = time.monotonic()
            if worker:
                worker.join()
                if "error" in scanned:
                    raise scanned["error"]
            t_scanned = time.monotonic()
            scan = self._scan_memory(layout, final=True, written=scanned.get("result"))
            r = self._write_round(directory, "dump", state=state, write=False, layout=layout,
                                  scan=scan)
            t_pages = time.monotonic()
            r.stats["phases_ms"] = {"freeze": (t_frozen - t0) * 1e3,
                                    "collect_state": (t_state - t_frozen) * 1e3,
                                    "last_pages": (t_pages - t_state) * 1e3}
            r.stats["scan_wait_ms"] = (t_scanned - t_state) * 1e3
            orig_rax = state.threads[0].regs["orig_rax"]
            r.stats["stopped_in"] = f"syscall {orig_rax}" if orig_rax < 2 ** 63 else "user code"
            r.stats["frozen_at"] = t0          # CLOCK_MONOTONIC: comparable on this boot only
            if write:
                schema.write_round(directory, r)
                r.stats["phases_ms"]["write_image"] = (time.monotonic() - t_pages) * 1e3
            return r
        except BaseException:
            self.resume()
            raise

    def _freeze_all_threads(self) -> None:
        """Stop every thread. Threads can appear while we stop the others: list again until
        every listed thread is ours and stopped (a stopped thread creates none)."""
        held: dict[int, Tracee] = {}
        while True:
            tids = procfs.threads(self.pid)
            new = [tid for tid in tids if tid not in held]
            if not new:
                break
            for tid in new:
                t = Tracee(tid)
                held[tid] = t
                self.frozen.append(t)
            Tracee.stop_all([held[tid] for tid in new])
        self.frozen.sort(key=lambda t: t.pid != self.pid)     # the main thread first

    def _scan_in_thread(self, areas: bytes, out: dict) -> None:
        try:
            mine = os.sched_getaffinity(0)
            others = set(range(os.cpu_count() or 1)) - mine
            if len(mine) == 1 and others:
                os.sched_setaffinity(0, others)     # this thread only: off the tracer's CPU
            out["result"] = self.tracker.scan_written(areas, final=True)
        except BaseException as e:
            out["error"] = e

    def _layout(self) -> list[Vma]:
        """The current maps; parsed only when they changed since the last look (parsing is
        the expensive part, and on the downtime path the maps rarely changed)."""
        raw = procfs.maps_raw(self.pid)
        if raw != self._maps_raw:
            self._maps_raw, self._maps_parsed = raw, procfs.parse_maps(raw)
        return self._maps_parsed

    def _split_layout(self, layout: list[Vma]) -> tuple[list, list]:
        """(fresh, kept): areas new since the last round, to be sent whole, and the areas
        whose written pages are enough."""
        mem = memory_vmas(layout)
        if self.last_layout is None:
            return [(v.start, v.end) for v in mem], []
        d = diff_layout(memory_vmas(self.last_layout), mem)
        fresh = [(v.start, v.end) for v in d.fresh]
        return fresh, _subtract_all([(v.start, v.end) for v in mem], fresh)

    def _scan_memory(self, layout: list[Vma], final: bool = False, written=None) -> MemoryScan:
        """Which ranges this round carries: areas new since the last round (or whose
        tracking was lost) whole, elsewhere the pages written since the last scan.
        `written`: the result of scan_written on the kept areas, if already done."""
        t0 = time.perf_counter()
        fresh, kept = self._split_layout(layout)
        copy, zap, lost = [], [], 0
        if self.tracker and kept:
            res, untracked = written or self.tracker.scan_written(pack_ranges(kept))
            # an area whose tracking is gone (unmapped and mapped again alike): resend it whole
            fresh += [kept[i] for i in untracked]
            lost = len(untracked)
            pages = res.raw and pack_ranges((s, e) for s, e, _ in res.triples())
            for s, e, cat in (self.tracker.classify(pages).triples() if pages else ()):
                if cat & native.PAGE_IS_PRESENT and not cat & native.PAGE_IS_PFNZERO:
                    copy.append((s, e))
                else:
                    zap.append((s, e))
        fresh.sort()
        if self.tracker and fresh and not final:     # after the final round nothing is tracked
            self.tracker.protect(fresh)
        t1 = time.perf_counter()
        if fresh:
            copy += [(s, e) for s, e, _ in
                     scan_present(self.pagemap_fd, pack_ranges(fresh), self.pid).triples()]
        copy.sort()
        t2 = time.perf_counter()
        return MemoryScan(pack_ranges(fresh), pack_ranges(copy), pack_ranges(zap), lost,
                          (t2 - t0) * 1e3, (t2 - t1) * 1e3)

    def _write_round(self, directory: str, kind: str, state, write: bool = True,
                     layout: list[Vma] | None = None, scan: MemoryScan | None = None) -> Round:
        os.makedirs(directory, exist_ok=True)
        layout = layout if layout is not None else self._layout()
        if scan is None:
            scan = self._scan_memory(layout)
        t0 = time.perf_counter()
        if self.direct:
            nbytes = ranges_bytes(scan.copy)
        else:
            with open(os.path.join(directory, schema.PAGES_FILE), "wb") as f:
                nbytes = native.dump_pages(self.pid, self.mem_fd, scan.copy, f.fileno())
        t_copy = time.perf_counter()
        parent = self.last_round
        r = Round(
            id=uuid.uuid4().hex, index=parent[1].index + 1 if parent else 0,
            parent_id=parent[1].id if parent else None,
            parent_path=os.path.relpath(parent[0], directory) if parent else None,
            kind=kind, source=dict(self.source_info, time=time.time()),
            tasks=[AddressSpaceRound(self.pid, layout, scan.fresh, scan.copy, scan.zap, 0,
                                     "pid" if self.direct else "file",
                                     [t.pid for t in self.frozen] if self.frozen
                                     else procfs.threads(self.pid))],
            state=state,
            stats={"pages": nbytes // 4096, "bytes": nbytes, "fresh_ranges": len(scan.fresh) // 16,
                   "zap_ranges": len(scan.zap) // 16, "lost_tracking": scan.lost,
                   "scan_ms": scan.scan_ms, "present_scan_ms": scan.present_scan_ms,
                   "copy_ms": (t_copy - t0) * 1e3})
        if write:
            schema.write_round(directory, r)
        self.last_layout = layout
        self.last_round = (os.path.abspath(directory), r)
        return r

    # ---- state ------------------------------------------------------------------------------

    def _query_inside(self, layout: list[Vma], status: dict[str, str]) -> dict:
        """What only the process can tell, in one injected batch per thread: brk and the
        actions of the signals it catches or ignores (process-wide, asked in the main
        thread), clear_child_tid and sigaltstack (each thread's own). It maps and unmaps a
        scratch area (an mmap_lock writer), so it runs before the last dirty scan starts."""
        handled = int(status.get("SigCgt", "0"), 16) | int(status.get("SigIgn", "0"), 16)
        signals = [sig for sig in range(1, 65) if handled >> (sig - 1) & 1]
        vdso = next(v for v in layout if v.path == "[vdso]")
        main = RemoteSyscalls(self.frozen[0], (vdso.start, vdso.end))
        saved = [(t, t.regs(), t.sigmask()) for t in self.frozen]
        for t in self.frozen:
            t.set_sigmask(ALL_SIGNALS)     # nothing gets delivered while we run calls in it
        main.map_scratch(free_area([layout], RemoteSyscalls.SCRATCH_SIZE))
        out: dict = {"threads": {}}
        try:
            for t, regs, mask in saved:
                remote = main if t is self.frozen[0] else main.sharing(t)
                b = remote.batch()
                tid_addr = b.put(b"\0" * 8)
                ss_addr = b.put(b"\0" * STACK_T.size)
                sa_addr = b.put(b"\0" * KSIGACTION.size * 65)
                b.call(lib.SYS_prctl, lib.PR_GET_TID_ADDRESS, tid_addr)
                b.call(lib.SYS_sigaltstack, 0, ss_addr)
                if t is self.frozen[0]:
                    b.call(lib.SYS_brk, 0)
                    b.call(lib.SYS_prctl, lib.PR_GET_DUMPABLE)
                    # from inside: reading another user's limits from outside needs
                    # CAP_SYS_RESOURCE, which root lacks on these hosts
                    rl_addr = b.put(b"\0" * 16 * RLIMITS)
                    for res in range(RLIMITS):
                        b.call(lib.SYS_prlimit64, 0, res, 0, rl_addr + 16 * res)
                    for sig in signals:
                        b.call(lib.SYS_rt_sigaction, sig, 0, sa_addr + KSIGACTION.size * sig, 8)
                results = remote.run(b)
                data = remote.read(tid_addr, len(b.data) - (tid_addr - main.scratch.data_addr))
                rel = lambda addr: addr - tid_addr  # noqa: E731  (offsets in what we read)
                out["threads"][t.pid] = {
                    "regs": regs, "sigmask": mask,
                    "clear_child_tid": struct.unpack_from("=Q", data, rel(tid_addr))[0],
                    "sigaltstack": STACK_T.unpack_from(data, rel(ss_addr))}
                if t is self.frozen[0]:
                    out["brk"], out["dumpable"] = results[2], results[3]
                    out["rlimits"] = {res: struct.unpack_from("=QQ", data, rel(rl_addr + 16 * res))
                                      for res in range(RLIMITS)}
                    out["sigactions"] = {
                        sig: SigAction(*KSIGACTION.unpack_from(
                            data, rel(sa_addr + KSIGACTION.size * sig))) for sig in signals}
        finally:
            main.unmap_scratch()
            for t, regs, mask in saved:
                t.set_sigmask(mask)
                t.set_regs(regs)
        return out

    def _collect_state(self, layout: list[Vma], status: dict[str, str],
                       inside: dict) -> ProcessState:
        """All but memory, with the process frozen: what _query_inside found, ptrace and
        /proc for the rest."""
        pid = self.pid
        threads = []
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
                pending=native.peek_siginfo(t.pid, shared=False)))
        fds = []
        for fd in procfs.fd_numbers(pid):
            what, desc = procfs.describe_fd(pid, fd)
            if desc is None:
                if not (self.direct and procfs.can_hand_over(pid, fd, what)):
                    raise UnsupportedState(f"fd {fd}: {what} (unsupported file kind)")
                flags = int(procfs.fdinfo(pid, fd).get("flags", "0"), 8)
                desc = FileDescriptor(fd, "handover", what, flags, 0)
            fds.append(desc)
        return ProcessState(
            pid=pid, comm=procfs.comm(pid), exe=procfs.readlink(pid, "exe"),
            cwd=procfs.readlink(pid, "cwd"), umask=int(status.get("Umask", "0022"), 8),
            mm=procfs.mm_fields(procfs.stat_fields(pid), inside["brk"]), auxv=procfs.auxv(pid),
            rlimits=inside["rlimits"], sigactions=inside["sigactions"], fds=fds,
            threads=threads,
            shared_pending=native.peek_siginfo(pid, shared=True),
            cpus=sorted(os.sched_getaffinity(pid)), creds=procfs.credentials(status),
            dumpable=inside["dumpable"])

    # ---- the end of the source --------------------------------------------------------------

    def kill_frozen(self) -> None:
        """The destination runs: the source goes away (still frozen, so it never runs again)."""
        os.kill(self.pid, 9)
        for t in self.frozen[1:]:     # we trace them: their exits are ours to collect
            try:
                os.waitpid(t.pid, 0x40000000)     # __WALL
            except ChildProcessError:
                pass
        for t in self.frozen:
            t.attached = False
        self.frozen = []
        self.close()

    def resume(self) -> None:
        """Roll back: the source continues as if nothing happened."""
        for t in self.frozen:
            try:
                t.detach()
            except KernelCallError:
                pass
        self.frozen = []

    def leave_stopped(self) -> None:
        """Detach but keep the process stopped (SIGSTOP), for `dump --leave-stopped`."""
        if self.frozen:
            self.frozen[0].detach(19)         # a group stop: every thread stops
            for t in self.frozen[1:]:
                t.detach()
            self.frozen = []

    def close(self) -> None:
        if self.tracker:
            self.tracker.close()
            self.tracker = None
        for fd in (self.pagemap_fd, self.mem_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.pagemap_fd = self.mem_fd = -1


def _subtract_all(spans: list[tuple[int, int]], holes: list[tuple[int, int]]):
    from ..model import _subtract
    out = []
    for s in spans:
        out += _subtract(s, holes)
    return out
