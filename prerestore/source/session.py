"""The source side of a migration: rounds of memory while the process tree runs, then the final
image with the whole tree frozen.

A SourceSession lives as long as the migration: it follows the tree under the root pid (one
ProcessSource per process: dirty tracker, last layout sent), and, once frozen, holds every
thread of every process stopped under ptrace until told to kill them (the destination runs) or
to resume them (rollback).

Whether a tree may be migrated at all is source/checks.py's (check_supported, before anything
is frozen); the objects its processes share are
captured by source/capture.py; one process's state by source/process.py."""
from __future__ import annotations

import os
import platform
import queue
import re
import socket
import threading
import time
import uuid
from dataclasses import replace


from ..errors import KernelCallError, ProcessGone, UnsupportedState
from ..faults import maybe_pause
from ..image import schema
from ..kernel import native, procfs, tcp, visible
from ..kernel.tracee import RemoteSyscalls, Tracee, runner_area, wait_exit
from ..model import (AddressSpaceRound, ProcessState, Round, Vma, Zombie, pack_ranges,
                     ranges_bytes)
from . import ptys
from . import sysvipc as sysv
from .capture import (FD_OWNER_KINDS, capture_fifos, capture_pipes, capture_sockets,
                      check_handed_epolls, place_epoll_registrations, share_open_files)
from .checks import (check_supported, external_names, shares_with_parent, sharing_problems,
                     tree_problems)
from .process import ProcessSource
from .refusals import pidfd_problem


_PROC_PID_PATH = re.compile(r"^/proc/(\d+)(/.*)?$")


class SourceSession:
    """Produces the rounds of the process tree under `pid`."""

    def __init__(self, pid: int, *, track: bool = True, direct: bool = False,
                 tracking: str = "auto", stream: bool = False,
                 external_unix: frozenset[bytes] = frozenset(),
                 external_fds=frozenset()):
        """external_unix: names through which unix connections may leave the tree (for an
        image; on one host every socket is handed over as it is). external_fds: objects
        (as /proc/PID/fd names them: "pipe:[1234]", "socket:[5678]", a path) whose fds the
        destination is given in their place (restore --inherit-fd fd[N]:NAME)."""
        self.external_unix = external_names(external_unix)
        self.external_fds = frozenset(external_fds)
        check_supported(pid, direct, self.external_unix, external_fds=self.external_fds)
        self.pid = pid
        self.direct = direct      # rounds name the pages; the destination reads them from us
        # stream: rounds list the pages as for a pages file, but none is written: the caller
        # reads them (stream_pages) and sends them as it goes
        self.stream = stream and not direct
        self.track, self.tracking = track, tracking
        self.procs: dict[int, ProcessSource] = {}
        self.zombies: list[Zombie] = []
        self.last_round: tuple[str, Round] | None = None
        self.held: list[Tracee] = []      # every thread of the tree while frozen
        self.holds: list = []             # (remote, regs, mask) of threads held for the switch
        self.repaired: list[socket.socket] = []   # the source's TCP sockets in repair mode
        self.ptys: list[ptys.CapturedPty] = []     # the tree's ptys, their queues read away
        self.put_back_errors: list[str] = []
        # System V segment id -> offsets of its pages the rounds carried (for an image)
        self.sysv_carried: dict[int, list[tuple[int, int]]] = {}
        # The image names processes as the tree's own pid namespace sees them (the root's
        # innermost one): a container-style tree is restored with its own pids.
        self.depth = len(procfs.ns_pids(pid)) - 1
        self._ns: dict[int, int] = {}
        self._scanner = _Worker()
        try:
            self._follow_seccomp(self._refresh_tree())
        except BaseException:
            self.close()              # the trackers of the processes followed so far
            raise
        root = self.procs[pid]
        self.source_info = {
            "host": socket.gethostname(), "kernel": platform.release(), "pid": pid,
            "boot_id": procfs.boot_id(), "starttime": root.task.starttime,
            "tracking": root.tracker.mode if root.tracker else None}

    @property
    def tracker(self):
        """The root's tracker: what the tree is tracked with."""
        return self.procs[self.pid].tracker

    @property
    def frozen(self) -> list[Tracee]:
        return self.held

    def ns_pid(self, pid: int) -> int:
        """A process's or thread's pid in the tree's namespace (ours: the same)."""
        if not self.depth:
            return pid
        if pid not in self._ns:
            levels = procfs.ns_pids(pid)
            if len(levels) != self.depth + 1:
                raise UnsupportedState(f"pid {pid} lives in a pid namespace nested inside the "
                                       f"tree's (NSpid {levels}): not supported")
            self._ns[pid] = levels[-1]
        return self._ns[pid]

    def _ns_member(self, pid: int, members: set[int]) -> int:
        """A sid or pgid in the tree's namespace; 0 if its leader is outside the tree (in a
        nested namespace it has no pid there)."""
        if not self.depth:
            return pid
        return self.ns_pid(pid) if pid in members else 0

    def _settle_fd_owners(self, states: list[ProcessState],
                          tasks: list[procfs.TreeTask]) -> list[str]:
        """The problems of fds whose SIGIO/SIGURG goes to a task or process group outside
        the tree (F_SETOWN): such an owner cannot be made again, unless the fd is handed over
        on this host, where the open file keeps the very owner it has (its owner is then
        left alone: not set again). Owners are read from inside the processes: pids in the
        tree's namespace, as the restored tree has them."""
        members = {t.pid for t in tasks}
        inside = {"tid": {self.ns_pid(t.tid) for s in states for t in s.threads},
                  "pid": {self.ns_pid(s.pid) for s in states},
                  "pgrp": {self._ns_member(t.pgid, members) for t in tasks} - {0}}
        problems = []
        for s in states:
            for f in s.fds:
                kind, owner = f.owner
                what = FD_OWNER_KINDS.get(kind, "tid")
                if not owner or owner in inside[what]:
                    continue
                if f.kind == "handover":
                    f.owner, f.signal = (0, 0), 0      # the same file: its owner as it is
                else:
                    problems.append(
                        f"pid {self.ns_pid(s.pid)} fd {f.fd}: {f.path} sends its SIGIO/SIGURG "
                        f"(F_SETOWN) to {'process group' if what == 'pgrp' else what} {owner}, "
                        "outside the tree (not carried)")
        return problems

    def _pidfd_problems(self, states: list[ProcessState],
                        tasks: list[procfs.TreeTask]) -> list[str]:
        """The frozen tree's pidfds must refer to its own processes or threads (see
        check_supported): made again in the husks with pidfd_open."""
        members = {t.pid for t in tasks} | {t.tid for s in states for t in s.threads}
        problems = []
        for s in states:
            for f in s.fds:
                if f.kind == "pidfd":
                    problem = pidfd_problem(f.fd, f.target_pid, f.flags, lambda: members)
                    if problem:
                        problems.append(f"pid {self.ns_pid(s.pid)} {problem}")
        return problems

    def _to_ns(self, state: ProcessState) -> ProcessState:
        for f in state.fds:
            # a file of the tree's own /proc (/proc/self/... reads as /proc/PID/...): named
            # by the pid the tree's namespace gives it, as a restored tree in a pid namespace
            # of its own sees its /proc (and as the same pid does elsewhere)
            m = _PROC_PID_PATH.match(f.path) if f.kind in ("file", "dir", "path") else None
            if m and int(m.group(1)) in self.procs:
                f.path = f"/proc/{self.ns_pid(int(m.group(1)))}{m.group(2)}"
        if not self.depth:                   # our own namespace: nothing to translate
            return state
        return replace(
            state, pid=self.ns_pid(state.pid),
            threads=[replace(t, tid=self.ns_pid(t.tid)) for t in state.threads],
            fds=[replace(f, same_as=(self.ns_pid(f.same_as[0]), f.same_as[1])
                         if f.same_as else None,
                         target_pid=self.ns_pid(f.target_pid) if f.target_pid else 0)
                 if f.same_as or f.target_pid else f for f in state.fds])

    def _refresh_tree(self, track_new: bool = True,
                      tasks: list[procfs.TreeTask] | None = None) -> list[ProcessSource]:
        """Look at the tree again: follow processes born (a tracker each, unless the tree is
        frozen: their one round is their last) and gone, and note the zombies. Returns the
        live processes, parents first."""
        tasks = tasks if tasks is not None else procfs.tree(self.pid)
        self._ns = {}
        live = [t for t in tasks if not t.zombie]
        self.zombies = [Zombie(t.pid, t.parent, t.sid, t.pgid, t.exit_code)
                        for t in tasks if t.zombie]
        keep = {}
        for t in live:
            p = self.procs.get(t.pid)
            if p is not None and (p.task.starttime != t.starttime or p.task.parent != t.parent):
                p.close()           # another process with a reused pid, or reparented
                p = None
            parent = keep.get(t.parent)
            if parent is None and t.pid != self.pid:
                continue              # its parent vanished as we looked: it is reparented
            if p is None:
                try:
                    p = ProcessSource(t, track=self.track and track_new,
                                      tracking=self.tracking, direct=self.direct)
                except ProcessGone:
                    continue
            elif parent is not None and parent.first or \
                    t.sid == t.pid and t.tty_nr != p.task.tty_nr:
                # its parent's husk is made anew: so is its own; or it leads a session whose
                # controlling terminal changed: its husk takes its terminal as it is made,
                # and the husks of its session get it as they are forked
                p.first = True
                p.last_layout = None
            p.task = t
            keep[t.pid] = p
        for pid, p in self.procs.items():
            if pid not in keep:
                p.close()
        self.procs = keep
        if self.pid not in keep:
            raise ProcessGone(3, "follow the process tree", self.pid)
        return list(keep.values())

    # ---- rounds -----------------------------------------------------------------------------

    def predump(self, directory: str) -> Round:
        """One pre-copy round while the tree runs."""
        check_supported(self.pid, self.direct, self.external_unix,
                        external_fds=self.external_fds)
        self._follow_seccomp(self._refresh_tree())
        return self._write_round(directory, "predump", states=[])

    def _follow_seccomp(self, procs: list[ProcessSource]) -> None:
        """Read the seccomp filters new since the last look (the final step then only checks
        that their counts did not change), and refuse those that cannot be carried, before
        anything is frozen."""
        for p in procs:
            try:
                p.follow_seccomp(procfs.status(p.pid))
            except ProcessGone:
                pass                     # gone: the next look at the tree tells

    def last_cpu(self) -> int:
        """The CPU the root process last ran on."""
        return int(procfs.stat_fields(self.pid)[39])

    def dump(self, directory: str, *, write: bool = True, cpu: int | None = None,
             frozen_hook=None, verify: bool | None = None) -> Round:
        """Freeze the whole tree and make the final image (written to directory unless
        write=False: the caller hands it over in-band and writes it after the switch).
        The tree stays frozen until kill_frozen() or resume().

        cpu: run on that CPU meanwhile. Every injected batch is a round trip to a traced
        task; waking a task on another CPU costs an IPI, which in a VM can take longer than
        the work itself, so the whole final step runs on one CPU.

        verify: carry in the image what /proc shows of every frozen process (Round.visible),
        for the destination to compare its restored tree with before letting it go
        (default: as PRERESTORE_VERIFY says, see kernel/visible.modes)."""
        if verify is None:
            verify = "proc" in visible.modes()
        if cpu is not None:
            mask = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {cpu})
            try:
                return self.dump(directory, write=write, frozen_hook=frozen_hook, verify=verify)
            finally:
                os.sched_setaffinity(0, mask)
        check_supported(self.pid, self.direct, self.external_unix,    # refuse before freezing
                        external_fds=self.external_fds)
        try:
            procs, tasks = self._freeze_tree()
            # the clock the destination reports resumption in: from the first stop (listing
            # the tree and seizing its threads, before that, leaves it running)
            t0 = self.stopped_at
            if frozen_hook:
                frozen_hook()        # e.g. release the service address: nothing reaches us now
            t_frozen = time.monotonic()
            maybe_pause("frozen")
            # it may have changed since the check (a thread's own table or fs is looked for
            # before freezing only: a per-thread walk here would lengthen the downtime)
            problems = tree_problems(tasks) + sharing_problems(tasks, threads=False)
            if problems:
                raise UnsupportedState(f"cannot migrate pid {self.pid}: " + "; ".join(problems))
            # what the tree shows before anything of ours is injected into it (a held
            # thread's mask is all blocked; a batch maps a scratch area)
            seen = visible.snapshot_tree([p.pid for p in procs]) if verify else []
            t_seen = time.monotonic()
            layouts, statuses, inside = {}, {}, {}
            for p in procs:
                layouts[p.pid] = p.layout()
                statuses[p.pid] = procfs.status(p.pid)
                inside[p.pid] = p.query_inside(layouts[p.pid], statuses[p.pid])
            # System V IPC may have changed since the check (SEM_UNDO used, a segment
            # attached from outside): checked again on the frozen tree, with its layouts
            problems = sysv.problems(tasks, self.direct, layouts)
            if problems:
                raise UnsupportedState(f"cannot migrate pid {self.pid}: " + "; ".join(problems))
            # Held from now on (see hold), before the last dirty scan starts: holding writes
            # each thread's saved registers below its stack pointer, and the final round must
            # carry those pages as the source has them (PRERESTORE_VERIFY compares them).
            self.hold()
            # The last dirty scans are kernel time in native calls (no GIL held, no ptrace):
            # they run in a thread on another CPU while this one, the tracer, collects the
            # state. (Measured: about 0.5 ms off the downtime at 4 GiB, noise at 1 GiB.)
            scanned: dict = {}
            todo = {}
            for p in procs:
                if p.tracker and not p.first:
                    _, kept = p.split_layout(layouts[p.pid])
                    if kept:
                        todo[p.pid] = pack_ranges(kept)
            worker = None
            if todo:
                worker = self._scanner.submit(self._scan_in_thread, todo, scanned,
                                              threading.get_native_id())
            states = [p.collect_state(layouts[p.pid], statuses[p.pid], inside[p.pid],
                                      self.direct, self.external_fds) for p in procs]
            for st in states:
                st.stopped = st.pid in self.stopped_before
            # Each thread's rseq area is carried as the source has it now, whatever the last
            # scan says: the kernel writes the CPU it runs on there as the thread returns to
            # user mode (our injected batches included), and such a write was seen missed by
            # the dirty tracking (the restored thread read the CPU of an earlier round).
            rseq_pages = {st.pid: [(th.rseq[0] & ~4095, -(-(th.rseq[0] + th.rseq[1]) // 4096)
                                    * 4096) for th in st.threads if th.rseq]
                          for st in states}
            share_open_files(states)
            problems = self._settle_fd_owners(states, tasks) + self._pidfd_problems(states, tasks)
            if problems:
                raise UnsupportedState(f"cannot migrate pid {self.pid}: " + "; ".join(problems))
            if not self.direct:           # handed over, an epoll keeps its registrations
                place_epoll_registrations(states)
            else:
                check_handed_epolls(states)
            problems = ptys.pty_problems(tasks, self.direct, ptys.ptys_of_states(states))
            if problems:
                raise UnsupportedState(f"cannot migrate pid {self.pid}: " + "; ".join(problems))
            # a terminal's foreground group, if that group is still there (a job that ended
            # before its shell took the terminal back leaves the number of a group gone)
            by_pid = {t.pid: t for t in tasks}
            members = {t.pid for t in tasks}
            groups = {t.pgid for t in tasks}
            for st in states:
                t = by_pid[st.pid]
                if t.sid == t.pid and t.ctty_pty >= 0 and t.tpgid in groups:
                    st.tty_pgrp = self._ns_member(t.tpgid, members)
            ptys.capture_ptys(states, self.direct, self.ptys)
            capture_pipes(states)
            capture_fifos(states)
            capture_sockets(states, self.repaired, self.external_unix)
            states = [self._to_ns(s) for s in states]
            t_state = time.monotonic()
            if worker:
                worker.wait()
                if "error" in scanned:
                    raise scanned["error"]
            t_scanned = time.monotonic()
            r = self._write_round(directory, "dump", states=states, write=False,
                                  layouts=layouts, written=scanned.get("result", {}),
                                  always=rseq_pages)
            r.visible = seen
            t_pages = time.monotonic()
            r.stats["phases_ms"] = {"freeze": (t_frozen - t0) * 1e3,
                                    "collect_state": (t_state - t_seen) * 1e3,
                                    "last_pages": (t_pages - t_state) * 1e3}
            if verify:
                r.stats["phases_ms"]["verify_snapshot"] = (t_seen - t_frozen) * 1e3
            r.stats["scan_wait_ms"] = (t_scanned - t_state) * 1e3
            orig_rax = states[0].threads[0].regs["orig_rax"]
            r.stats["stopped_in"] = f"syscall {orig_rax}" if orig_rax < 2 ** 63 else "user code"
            r.stats["frozen_at"] = t0          # CLOCK_MONOTONIC: comparable on this boot only
            if write:
                schema.write_round(directory, r)
                r.stats["phases_ms"]["write_image"] = (time.monotonic() - t_pages) * 1e3
            return r
        except BaseException:
            self.resume()
            raise

    def _freeze_tree(self) -> tuple[list[ProcessSource], list[procfs.TreeTask]]:
        """Stop every thread of every process of the tree. Tasks can appear while we stop the
        others: list again until every listed thread is ours and stopped (a stopped thread
        creates none). Zombies are left as they are: nothing runs in them."""
        held: dict[int, Tracee] = {}
        owner: dict[int, int] = {}
        self.held = []
        self.stopped_at = None
        # processes stopped by someone else (SIGSTOP, job control) when we first saw them,
        # before we stopped them ourselves (then /proc shows our tracing stop instead)
        self.stopped_before: set[int] = set()
        seen: set[int] = set()
        while True:
            new = []
            tasks = procfs.tree(self.pid)
            for t in tasks:
                if t.pid not in seen:
                    seen.add(t.pid)
                    if t.state == "T":
                        self.stopped_before.add(t.pid)
            for t in tasks:
                if t.zombie:
                    continue
                try:
                    tids = procfs.threads(t.pid)
                except ProcessGone:
                    continue
                for tid in tids:
                    if tid in held:
                        continue
                    try:
                        held[tid] = Tracee(tid, park=True, tgid=t.pid)
                    except (KernelCallError, ProcessGone):
                        continue          # gone meanwhile: the next listing tells
                    owner[tid] = t.pid
                    self.held.append(held[tid])
                    new.append(held[tid])
            if not new:
                break
            if self.stopped_at is None:
                self.stopped_at = time.monotonic()     # the tree stops from here on
            # a task may exit as we stop it (its parent, frozen, cannot reap it: the next
            # listing shows it as a zombie)
            for t in Tracee.stop_all(new, exiting_ok=True):
                self.held.remove(t)
                del held[t.pid]
        procs = self._refresh_tree(track_new=False, tasks=tasks)   # the listing that was stable
        for p in procs:
            p.frozen = sorted((t for tid, t in held.items() if owner[tid] == p.pid),
                              key=lambda t: t.pid != p.pid)      # the main thread first
        return procs, tasks

    def _scan_in_thread(self, areas: dict[int, bytes], out: dict, tracer: int) -> None:
        try:
            # off the tracer's CPU if it runs on one (dump(cpu=)): this thread only
            mine = os.sched_getaffinity(tracer)
            others = self._scanner.cpus - mine
            os.sched_setaffinity(0, others if len(mine) == 1 and others else self._scanner.cpus)
            out["result"] = {pid: self.procs[pid].tracker.scan_written(a, final=True)
                             for pid, a in areas.items()}
        except BaseException as e:
            out["error"] = e

    def _write_round(self, directory: str, kind: str, states, write: bool = True,
                     layouts: dict[int, list[Vma]] | None = None,
                     written: dict | None = None,
                     always: dict[int, list[tuple[int, int]]] | None = None) -> Round:
        if self.stream:
            write = False
        else:
            os.makedirs(directory, exist_ok=True)
        final = kind == "dump"
        tasks, scans = [], {}
        totals = {"bytes": 0, "fresh_ranges": 0, "zap_ranges": 0, "lost_tracking": 0,
                  "scan_ms": 0.0, "present_scan_ms": 0.0, "inherited_bytes": 0}
        t0 = time.perf_counter()
        pages_file = None if self.direct or self.stream else \
            open(os.path.join(directory, schema.PAGES_FILE), "wb")
        copy_ms = 0.0
        members = set(self.procs) | {z.pid for z in self.zombies}
        skipped: set[int] = set()
        try:
            offset = 0
            for p in list(self.procs.values()):
                parent = self.procs.get(p.task.parent)
                if p.task.parent in skipped:
                    skipped.add(p.pid)
                    continue
                try:
                    layout = layouts[p.pid] if layouts else p.layout()
                    # before the scan: what a round does after its scan lengthens the time in
                    # which the next round's (and the final step's) dirty set builds up, and
                    # smaps walks every page table (~12 ms at 1 GiB)
                    flags = p.vm_flags(layout, final)
                    cg = procfs.cgroup_v2(p.pid) or ""
                    scan = p.scan_memory(
                        layout, final=final, written=(written or {}).get(p.pid),
                        parent=parent, parent_layout=parent and scans[parent.pid][0],
                        parent_copy=scans[parent.pid][1].copy if parent else b"",
                        always=(always or {}).get(p.pid))
                    tids = [t.pid for t in p.frozen] if p.frozen else procfs.threads(p.pid)
                except Exception as e:
                    # a process may exit while the tree runs: it leaves this round (and the
                    # staged tree) with its children, which are reparented out of the tree
                    if final or p.pid == self.pid or not p.gone(e):
                        raise
                    skipped.add(p.pid)
                    continue
                scans[p.pid] = (layout, scan)
                if not self.direct:
                    sysv.note_carried(self.sysv_carried, layout, scan.copy)
                tc = time.perf_counter()
                if self.direct or self.stream:
                    nbytes = ranges_bytes(scan.copy)
                else:
                    nbytes = native.dump_pages(p.pid, p.mem_fd, scan.copy, pages_file.fileno())
                copy_ms += (time.perf_counter() - tc) * 1e3
                t = p.task
                tasks.append(AddressSpaceRound(
                    self.ns_pid(p.pid), layout, scan.fresh, scan.copy, scan.zap, offset,
                    "pid" if self.direct else "file", [self.ns_pid(tid) for tid in tids],
                    parent=self.ns_pid(t.parent) if parent else 0,
                    sid=self._ns_member(t.sid, members), pgid=self._ns_member(t.pgid, members),
                    starttime=t.starttime, first=p.first, exit_signal=t.exit_signal,
                    source_pid=p.pid, ctty=t.ctty_pty if t.sid == t.pid else -1,
                    shares=shares_with_parent(parent.pid, p.pid) if parent else 0,
                    vmflags=flags, cgroup=cg))
                if not self.direct:
                    offset += nbytes
                totals["bytes"] += nbytes
                totals["fresh_ranges"] += len(scan.fresh) // 16
                totals["zap_ranges"] += len(scan.zap) // 16
                totals["lost_tracking"] += scan.lost
                totals["scan_ms"] += scan.scan_ms
                totals["present_scan_ms"] += scan.present_scan_ms
                totals["inherited_bytes"] += scan.inherited
            # the tree's System V IPC objects (read only if it uses any, or has a namespace
            # of its own): frozen in the final round, which also carries their state
            ipc = sysv.capture(self.pid, {pid: scan[0] for pid, scan in scans.items()}, final,
                               self.direct, self.ns_pid, self.sysv_carried)
        finally:
            if pages_file:
                pages_file.close()
        parent_round = self.last_round
        r = Round(
            id=uuid.uuid4().hex, index=parent_round[1].index + 1 if parent_round else 0,
            parent_id=parent_round[1].id if parent_round else None,
            parent_path=os.path.relpath(parent_round[0], directory) if parent_round else None,
            kind=kind, source=dict(self.source_info, time=time.time()), tasks=tasks,
            states=states,
            zombies=[Zombie(self.ns_pid(z.pid), self.ns_pid(z.parent),
                            self._ns_member(z.sid, members), self._ns_member(z.pgid, members),
                            z.exit_code) for z in self.zombies] if final else [],
            stats=dict(totals, pages=totals["bytes"] // 4096, processes=len(tasks),
                       copy_ms=copy_ms, round_ms=(time.perf_counter() - t0) * 1e3), ipc=ipc)
        if write:
            schema.write_round(directory, r)
        for pid in skipped:
            self.procs.pop(pid).close()
        for p in self.procs.values():
            p.last_layout = scans[p.pid][0]
            p.first = False
        self.last_round = (os.path.abspath(directory), r)
        return r

    def stream_pages(self, r: Round):
        """The bytes of a round's pages file, chunk by chunk, read from the processes now (a
        page written since its scan is read newer: its next round carries it again)."""
        for task in r.tasks:
            p = self.procs.get(task.source_pid or task.pid)
            if p is None:
                raise ProcessGone(3, "stream the pages of a round", task.source_pid)
            yield from native.PageReader(p.pid, p.mem_fd, task.pages)

    # ---- the end of the source --------------------------------------------------------------

    def kill_frozen(self) -> None:
        """The destination runs: the source tree goes away (still frozen, so it never runs
        again). Children first: a parent killed first would have them reparented, and they
        are ours to collect as their tracer."""
        for p in reversed(list(self.procs.values())):
            try:
                os.kill(p.pid, 9)
            except ProcessLookupError:
                pass
        # a thread group's leader is reported last: the other threads first; the root's
        # leader is left to its parent if that is us (we reap it as its parent); else we
        # collect it as its tracer, which hands its exit to its parent (until then the parent
        # cannot reap it: `unshare --fork` would wait for its killed namespace init as long as
        # the migrating process lives)
        leaders = {p.pid for p in self.procs.values()}
        ours = self.pid in self.procs and self.procs[self.pid].task.parent == os.getpid()
        # (the root last: a namespace's init ends only once its children are reaped, and
        # as their tracer, we see their ends first)
        for t in sorted(self.held, key=lambda t: (t.pid in leaders, t.pid == self.pid)):
            if t.pid != self.pid or not ours:
                wait_exit(t.pid)
            t.attached = False
        self.held = []
        self.holds = []
        for p in self.procs.values():
            p.frozen = []
            p.remotes = {}
            p.scratch_remote = None
        for s in self.repaired:          # still in repair mode: it closes without a word
            s.close()
        self.repaired = []
        self._release_ptys(put_back=False)
        if self.last_round is not None:
            sysv.release(self.last_round[1].ipc)     # carried away: not left on this host
        self.close()

    def hold(self) -> None:
        """Before the destination may resume: make the frozen tree stay stopped even if we die
        from here on (RemoteSyscalls.hold), so that it never runs beside its restored copy.
        Threads that ran an injected batch (query_inside) are held already; the others cost a
        few microseconds each. Undone by resume(). dump() holds the tree itself."""
        if self.holds:
            return
        for p in self.procs.values():
            for t in p.frozen:
                r = p.remotes.get(t.pid)
                if r is None:
                    r = RemoteSyscalls(t, runner_area(p.pid, p.layout()))
                r.hold()
                self.holds.append(r)

    def _unhold(self) -> None:
        """Every thread we left held gets its own registers and mask back: those hold() held,
        and those an injected query left held before hold() ran (a failure in between)."""
        remotes = {id(r): r for r in self.holds}
        for p in self.procs.values():
            if p.scratch_remote is not None:       # left mapped by query_inside
                try:
                    p.scratch_remote.unmap_scratch()
                except KernelCallError:
                    pass
                p.scratch_remote = None
            remotes |= {id(r): r for r in p.remotes.values()}
            p.remotes = {}
        for r in remotes.values():
            try:
                r.release()
            except KernelCallError:
                pass
        self.holds = []

    def _release_ptys(self, put_back: bool) -> None:
        """Drop our hold on the source's ptys; with put_back, queue the bytes read from them
        again first (the source goes on). A pty that cannot take them back does not keep the
        others or the rollback from going on: what it lost is in self.put_back_errors."""
        for p in self.ptys:
            try:
                if put_back:
                    p.put_back()
            except OSError as e:
                self.put_back_errors.append(f"/dev/pts/{p.number}: the bytes waiting in it "
                                            f"could not be queued again ({e})")
            finally:
                p.close()
        self.ptys = []

    def resume(self) -> None:
        """Roll back: the source tree continues as if nothing happened."""
        self._unhold()
        for s in self.repaired:
            tcp.repair_off(s)
            s.close()
        self.repaired = []
        self._release_ptys(put_back=True)
        for t in self.held:
            try:
                t.detach()
            except KernelCallError:
                pass
        self.held = []
        for p in self.procs.values():
            p.frozen = []

    def leave_stopped(self) -> None:
        """Detach but keep the tree stopped (SIGSTOP), for `dump --leave-stopped`. Its TCP
        sockets stay in repair mode (silent): the tree may already run elsewhere."""
        for s in self.repaired:
            s.close()
        self.repaired = []
        self._release_ptys(put_back=True)      # it may be resumed by hand
        self._unhold()
        for p in self.procs.values():
            if p.frozen:
                p.frozen[0].detach(19)         # a group stop: every thread stops
        for t in self.held:
            t.detach()
        self.held = []
        for p in self.procs.values():
            p.frozen = []

    def close(self) -> None:
        self._scanner.close()
        for p in self.procs.values():
            p.close()


class _Worker:
    """A thread that runs one job at a time, made before it is needed: dump's last dirty scan
    runs in it beside the state collection, and making a thread there (clone, then waiting
    for it to start) cost ~0.1 ms of downtime, several times that on a loaded host."""

    def __init__(self):
        self.cpus = os.sched_getaffinity(0)       # where it may run (the caller's own CPUs)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="prerestore-scan", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, done = job
            try:
                fn(*args)
            finally:
                done.set()

    def submit(self, fn, *args) -> threading.Event:
        """Run fn(*args) in the thread; the event is set when it returns (fn reports its
        own errors)."""
        done = threading.Event()
        self._jobs.put((fn, args, done))
        return done

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

