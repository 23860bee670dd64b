"""A process tree being pre-restored: husks that follow the rounds of one image chain.

stage(dir) applies a round (the first one spawns the root's husk, and each process is forked
from its parent's husk in the round where it first appears); finalize(dir) applies the final
image, recreates zombies and process groups, and resumes the whole tree. Cold restore is the same
object given the whole chain at once. Any error kills every husk: there is never a half-restored
tree.

The objects made for the husks in place of the source's open files (FIFOs, ptys, pipes, TCP
sockets...) are restore/makers.py's."""
from __future__ import annotations

import os
import resource
import signal
import socket
import time

from .. import netaddr
from ..errors import ImageError, PrerestoreError, ProcessGone, RestoreError
from ..image import schema
from ..faults import maybe_pause, tamper
from ..kernel import cgroup, procfs, tcp, tty, visible
from ..model import AddressSpaceRound, Round, VisibleState
from . import verify as verify_mod
from .husk import SIGCHLD, Husk
from .makers import (_make_live, _to_make, check_same_files, make_anon, make_deleted_dirs,
                     make_deleted_files, make_fifos, make_inherited, make_inotify, make_pipes,
                     make_ptys, make_tcp, missing_inherited, remove_dirs)
from .sysvipc import IpcPlace
from .unixsock import UnixSockets


def _source_vanished(task: AddressSpaceRound) -> bool:
    """Has the live source process a round reads its pages from (same host) exited since
    the round was made (gone, a zombie, exiting, or its pid taken by another process)?"""
    if task.pages_from != "pid":
        return False
    try:
        fields = procfs.stat_fields(task.source_pid or task.pid)
    except ProcessGone:
        return True
    return int(fields[22]) != task.starttime or fields[3] in ("Z", "X") or \
        bool(int(fields[9]) & 0x4)                       # PF_EXITING


class StagedTree:
    """The husks of one image chain's process tree, by the pid they stand for, parents first."""

    def __init__(self, *, pidns: bool = False, cgroup_root: str | None = None):
        """cgroup_root: the cgroup v2 directory that stands here for the source's cgroup root
        (--cgroup-root; default: the cgroup2 mount): each restored process goes into its
        source's cgroup under it (kernel/cgroup.py place)."""
        self.pidns = pidns
        self.cgroup_root_given = cgroup_root
        self.cgroup_root: str | None = None
        self.cgroups: dict[int, tuple[str, str]] = {}   # pid -> (source's cgroup, directory)
        self.cgroups_made: list[str] = []               # made by us: removed if we fail
        self.gate_noted: dict[int, str] = {}            # what the gate says (note_destinations)
        self.husks: dict[int, Husk] = {}
        # pty pairs made for session leaders' controlling terminals, by the source's pty
        # number: (our master fd, the new pair's number); their state is given at finalize
        self.ptys: dict[int, tuple[int, int]] = {}
        self.applied: list[tuple[str, Round]] = []     # rounds applied so far, oldest first
        # the cgroup its husks are born in and the tree let go through (kernel/cgroup.py)
        self.gate_path = cgroup.gate_path()
        self.gate: cgroup.Gate | None = None
        self.ipc = IpcPlace()           # its System V IPC: namespace and objects made

    @property
    def husk(self) -> Husk | None:
        """The root's husk."""
        return next(iter(self.husks.values()), None)

    @property
    def last_id(self) -> str | None:
        return self.applied[-1][1].id if self.applied else None

    def _pending_rounds(self, directory: str, r: Round | None = None
                        ) -> list[tuple[str, Round]]:
        """The rounds of `directory`'s chain (ending with r if given) that are not applied
        yet, checked for order. The usual next round is read alone, not its whole chain."""
        if r is None:
            r = schema.read_round(directory)
        if self.applied and r.parent_id == self.last_id:
            return [(directory, r)]
        chain = []
        if r.parent_id:
            chain = schema.read_chain(schema.parent_dir(directory, r))
            if chain[-1][1].id != r.parent_id:
                raise ImageError(f"{directory}: parent image {chain[-1][0]} has id "
                                 f"{chain[-1][1].id}, expected {r.parent_id} (mismatched parent)")
        chain.append((directory, r))
        if not self.applied:
            return chain
        ids = [r.id for _, r in chain]
        if self.last_id not in ids:
            raise ImageError(f"{directory}: this image does not descend from the round staged "
                             f"last ({self.applied[-1][0]}, id {self.last_id}): mismatched parent")
        return chain[ids.index(self.last_id) + 1:]

    def _check_source(self, directory: str, r: Round) -> None:
        if not any(t.pages_from == "pid" for t in r.tasks):
            return
        try:
            same = r.source.get("boot_id") == procfs.boot_id() and \
                procfs.stat_fields(r.source["pid"])[22] == str(r.source.get("starttime"))
        except (ProcessGone, KeyError):
            same = False
        if not same:
            raise ImageError(f"{directory}: this round reads its pages from the live source "
                             f"process {r.source.get('pid')}, which is not on this host (or is "
                             "gone)")

    def _apply(self, directory: str, r: Round) -> dict:
        """Make the staged tree follow one round: husks for the processes it lists (forked from
        their parent's husk, after that one's memory), none for those it lacks."""
        self._check_source(directory, r)
        stats = []
        created_ms = 0.0
        wanted = {t.pid for t in r.tasks}
        for pid in [p for p in self.husks if p not in wanted]:
            if pid in self.husks:                # not removed with its parent already
                self._remove(pid)
        vanished: set[int] = set()
        for task in r.tasks:
            if task.parent in vanished:          # gone with its parent (reparented out)
                vanished.add(task.pid)
                continue
            try:
                applied, create_ms = self._apply_task(directory, task, r)
                stats.append(applied)
                created_ms += create_ms
            except (PrerestoreError, OSError):
                # A process of a running tree may exit between its round and this staging
                # (a short-lived child): its pages cannot be read any more. The source drops
                # such a process from its next round; so does the staged tree now, with its
                # children. The root, the final step, or a source that still runs: a failure.
                if r.is_final or not task.parent or not _source_vanished(task):
                    raise
                vanished.add(task.pid)
                if task.pid in self.husks:
                    self._remove(task.pid)
        where = self._leave_to()
        if self.gate is not None and where and where != self.gate_noted:
            try:       # for whoever settles the gate should we die after the commit
                self.gate.note_destinations(where)
                self.gate_noted = where
            except OSError as e:
                raise RestoreError(f"{self.gate.path}: cannot note where the tree goes ({e})"
                                   ) from None
        out = _sum_stats(stats)
        out["processes"] = len(self.husks)
        out["vanished"] = len(vanished)
        out["create_ms"] = created_ms          # spawning the root, forking the others
        return out

    def _apply_task(self, directory: str, task: AddressSpaceRound,
                    r: Round | None = None) -> tuple[dict, float]:
        """One process of a round: its husk made (or made anew) if need be, then its memory.
        Returns the round's stats and the milliseconds making the husk took."""
        create_ms = 0.0
        husk = self.husks.get(task.pid)
        if husk is not None and task.first:
            self._remove(task.pid)               # a new process with a reused pid
            husk = None
        if husk is None:
            if not task.first:
                raise ImageError(f"{directory}: process {task.pid} continues from a round "
                                 "that was not staged")
            t0 = time.perf_counter()
            husk = self._create(task)
            if not task.parent:
                # before it maps anything: the IPC namespace its segments are attached in
                self.ipc.enter(husk, r.ipc if r else None, task.source_pid or task.pid)
            create_ms = (time.perf_counter() - t0) * 1e3
        elif task.sid == task.pid and not husk.leads_session:
            # it called setsid() since its husk was made: so does the husk, before any
            # child of this round is forked from it (they are in the new session)
            husk.lead_session()
        if not task.parent and r is not None:
            self.ipc.update(r.ipc, r.is_final)   # the segments its husks attach, made first
        if task.cgroup and self.cgroups.get(task.pid, ("",))[0] != task.cgroup:
            self._place(task)
        return husk.apply_round(task, directory), create_ms

    def _place(self, task: AddressSpaceRound) -> None:
        """Where the process goes when it leaves the gate: its source's cgroup, under our
        cgroup root, made now if missing (outside the downtime, in pre-restore's rounds), or
        refused by name (cgroup.place)."""
        if self.cgroup_root is None:
            self.cgroup_root = cgroup.root_dir(self.cgroup_root_given)
            if self.cgroup_root is None:
                if task.cgroup == "/":
                    return
                raise RestoreError(f"process {task.pid}: its cgroup {task.cgroup} cannot be "
                                   "given here: no cgroup v2 is mounted (mount one, or say "
                                   "where with --cgroup-root DIR)")
        self.cgroups[task.pid] = (task.cgroup, cgroup.place(task.pid, task.cgroup,
                                                            self.cgroup_root, self.cgroups_made))

    def _leave_to(self) -> dict[int, str]:
        """Each husk's cgroup directory once out of the gate, by host pid."""
        return {self.husks[pid].host_pid: where for pid, (_, where) in self.cgroups.items()
                if pid in self.husks}

    def _cgroups_seen(self) -> dict[int, str]:
        """Each process's cgroup as --verify compares it: the husks wait in the gate; each is
        compared by where it goes when it leaves the gate, relative to the cgroup root here
        (as its source's is to the source's root). A process without a carried cgroup goes
        back to the restorer's."""
        home = os.path.dirname(self.gate.path) if self.gate else cgroup.own_cgroup()
        root = self.cgroup_root or cgroup.root_dir()
        if root is None or home is None:
            return {}
        out = {}
        for pid in self.husks:
            where = self.cgroups.get(pid, ("", home))[1]
            rel = os.path.relpath(where, root)
            out[pid] = "/" if rel == "." else "/" + rel
        return out

    def _create(self, task: AddressSpaceRound) -> Husk:
        if not task.parent:
            if self.husks:
                raise ImageError(f"the tree's root changed to {task.pid} (was "
                                 f"{next(iter(self.husks))})")
            if task.pid == 1 and not self.pidns:
                raise ImageError("the tree's root is the init of its own pid namespace: it can "
                                 "only be restored as one (--pidns)")
            if self.gate is None:
                self.gate = cgroup.Gate.make(self.gate_path)
                if self.gate is not None:
                    self.gate.prepare()
            fd = self.gate.fd() if self.gate else -1
            try:
                husk = Husk.spawn(task.pid, pidns=self.pidns, cgroup_fd=fd)
            finally:
                if fd >= 0:
                    os.close(fd)
            self.husks[task.pid] = husk
            # its namespace's init must outlive us once the tree runs: its parent-death signal
            # goes now (should we die before the tree runs, the husks die with us, traced with
            # EXITKILL, and the init exits with the root husk)
            husk.release_namespace()
            husk.prepare(task.layout)
        else:
            parent = self.husks.get(task.parent)
            if parent is None:
                raise ImageError(f"process {task.pid}: its parent {task.parent} is not staged")
            husk = parent.fork_child(task.pid, task.exit_signal, task.shares)
            self.husks[task.pid] = husk
        if task.sid == task.pid or not task.parent:
            # before it forks anything: they inherit it. The root leads a session even when
            # its source's session was led outside the tree (by a shell, a supervisor): the
            # restored tree must not be in the session of the tool that restored it
            if not husk.leads_session:
                husk.lead_session()
        if task.sid == task.pid:
            if task.ctty >= 0:
                if task.ctty not in self.ptys:
                    self.ptys[task.ctty] = tty.make_pair()
                husk.take_ctty(task.ctty, f"/dev/pts/{self.ptys[task.ctty][1]}")
        return husk

    def _close_ptys(self) -> None:
        for master, _ in self.ptys.values():
            os.close(master)
        self.ptys = {}

    def _descendants(self, pid: int) -> list[int]:
        out, i = [pid], 0
        while i < len(out):
            out += [p for p, h in self.husks.items() if h.parent and h.parent.pid == out[i]]
            i += 1
        return out

    def _remove(self, pid: int) -> None:
        """Kill a husk whose process is gone, with its children (the deepest first), and
        collect it in its parent husk."""
        gone = self.husks[pid]
        for p in reversed(self._descendants(pid)):
            self.husks.pop(p).kill()
        if gone.parent is not None and self.husks.get(gone.parent.pid) is gone.parent:
            gone.parent.reap_child(gone)

    def _set_groups(self, final: Round) -> None:
        """Process groups as the source had them: leaders first, then members (a group must
        exist before others join it). A group inherited from outside the tree is the root's
        own here (the root leads a session of its own)."""
        pids = {t.pid for t in final.tasks} | {z.pid for z in final.zombies}
        order = sorted(final.tasks, key=lambda t: t.pgid != t.pid)
        for t in order:
            if t.pgid in pids and not self.husks[t.pid].leads_session:   # leads its group
                self.husks[t.pid].join_group(0 if t.pgid == t.pid else t.pgid)

    def stage(self, directory: str) -> dict:
        """Apply every round up to `directory` that is not applied yet (not a final image).
        A round that is refused (unreadable, out of order) leaves the staged tree as it
        was; an error while applying one kills it."""
        pending = self._pending_rounds(directory)
        if not pending:
            raise ImageError(f"{directory}: this round is already staged")
        if any(r.is_final for _, r in pending):
            raise ImageError(f"{directory}: is a final image; use finalize")
        try:
            stats = []
            for d, r in pending:
                stats.append(self._apply(d, r))
                if not self.applied:
                    maybe_pause("staging")           # round 0 staged, not yet answered
                self.applied.append((d, r))
            return _sum_stats(stats) | {"rounds": [r.index for _, r in pending],
                                        "processes": len(self.husks)}
        except BaseException:
            self.abort()
            raise

    def finalize(self, directory: str, image: bytes | None = None,
                 claim_ip: "netaddr.Address | None" = None, verify: bool = False,
                 inherit_fds: dict[str, int] | None = None) -> dict:
        """Apply the final image (read from directory, or handed over in-band as the bytes
        of its round.img) and resume. Returns timings (monotonic clock).
        claim_ip: the service's address, claimed here once the tree's sockets are rebuilt
        and live and everything but letting the tree go is done, given back if the restore
        fails before the tree runs. Until then the sockets are bound to it as a foreign
        address, so that no packet for the address arrives here before its socket does (the
        kernel would answer it with a reset), and none is taken in here that the source
        would miss if this restore failed.
        verify: before letting the tree go, check it page by page against a source on this
        host and compare what /proc shows of it with the source (restore/verify.py), from
        the final image's snapshot or, lacking one, the frozen source itself if it is on
        this host; fail (the source resumes) on any difference. Without it, each check runs
        if PRERESTORE_VERIFY asks for it, the /proc one also when the image carries a
        snapshot (its source asked for it).
        inherit_fds: our fds standing for objects outside the source's tree, by the name the
        image gives them ("pipe:[1234]": --inherit-fd fd[N]:NAME); each such fd of the image
        must have one, opened for the same access, or nothing is done."""
        inherit_fds = inherit_fds or {}
        t0 = time.monotonic()
        asked = visible.modes()
        page_ms = proc_ms = 0.0
        checked = False
        gaps: list[str] = []
        claim = netaddr.claiming(claim_ip) if claim_ip else None
        built: list[tuple[socket.socket, dict]] = []
        unix = None
        gate = None
        try:
            final = None
            if image is not None:
                final = schema.decode_image(image, f"final image for {directory}")
                schema.check_pages_file(directory, final)
            pending = self._pending_rounds(directory, final)
            if not pending or not pending[-1][1].is_final:
                raise ImageError(f"{directory}: not a final image (made by `dump`)")
            missing = missing_inherited(pending[-1][1].states, inherit_fds)
            if missing:
                raise RestoreError("; ".join(missing))
            check_same_files(pending[-1][1].states)
            t_read = time.monotonic()
            seen = self._source_seen(pending[-1][1], verify or "proc" in asked, verify)
            read_ms = (time.monotonic() - t_read) * 1e3
            mem = []
            for d, r in pending:
                mem.append(self._apply(d, r))
                self.applied.append((d, r))
            t_mem = time.monotonic()
            final = pending[-1][1]
            self.ipc.attached()
            if verify or "pages" in asked:
                self._verify(final)
                page_ms, checked = (time.monotonic() - t_mem) * 1e3, True
            for z in final.zombies:
                self.husks[z.parent].fork_child(z.pid).become_zombie(z)
            self._set_groups(final)
            direct = any(t.pages_from == "pid" for t in final.tasks)
            tree = {pid: h.host_pid for pid, h in self.husks.items()}
            for t in final.tasks:
                if self.husks[t.pid].ctty != t.ctty:
                    raise RestoreError(f"process {t.pid}: its husk has pty "
                                       f"{self.husks[t.pid].ctty} as controlling terminal, the "
                                       f"final image {t.ctty}")
            # giving a terminal its window size signals its foreground group
            with_tty = {t.pid for t in final.tasks if t.ctty >= 0}
            queued_here = {t.pid: (SIGCHLD, signal.SIGWINCH) if t.sid in with_tty
                           else (SIGCHLD,) for t in final.tasks}
            fs_last = self._settle_sharing(final)
            made = make_pipes(final.states)
            unix = UnixSockets(final.states)
            dirs: dict[tuple[int, str], str] = {}
            try:
                dirs = make_deleted_dirs(final.states)
                made_ptys = make_ptys(final.states, made, self.ptys)
                unix.make()
                for s, f in _to_make(final.states, ("unix",), made):
                    made[(s.pid, f.fd)] = unix.take(f)
                make_anon(final.states, made)
                # with a gate, the connections stay in repair mode until the whole tree is
                # let go, frozen in it: should we die before, they close with the husks
                # holding them, silently (the kernel sends nothing when a socket in repair
                # mode is closed); after, whoever destroys the gate silences them first
                make_tcp(final.states, made, built, foreign_ok=claim is not None,
                         live=self.gate is None)
                make_deleted_files(final.states, made)
                make_inherited(final.states, made, inherit_fds)
                make_fifos(final.states, made)
                make_inotify(final.states, made)
                state_stats = [self.husks[s.pid].apply_state(
                    s, final.task_of(s.pid).source_pid or s.pid if direct else None, tree,
                    made, queued_here[s.pid], dirs, s.pid in fs_last) for s in final.states]
                for master, st in made_ptys:       # once no husk opens a slave any more
                    tty.lock(master, st)
            finally:
                remove_dirs(dirs)               # entered by now: deleted, as they were
                unix.close()
                for fd in set(made.values()):
                    os.close(fd)
                self._close_ptys()              # pairs no longer used (their leader gone)
            t_state = time.monotonic()
            for s in final.states:
                self.husks[s.pid].load_registers(s)
            if seen:
                # the husks as they will run, before any peer may reach them (the claim)
                t_check = time.monotonic()
                self._tamper(final)
                gaps = verify_mod.check(seen, verify_mod.place_cgroups(visible.snapshot_tree(
                    [self.husks[s.pid].host_pid for s in final.states]), self._cgroups_seen()),
                    {(s.pid, f.fd) for s in final.states for f in s.fds if f.kind == "inherit"})
                proc_ms, checked = (time.monotonic() - t_check) * 1e3 + read_ms, True
            for _, where in set(self.cgroups.values()):
                if not os.path.isdir(where):
                    raise RestoreError(f"cgroup {where}, where the tree goes, was removed since "
                                       "it was staged")
            if self.gate is None:               # let go one by one: live before
                _make_live(built, claim)
            maybe_pause("finalize")             # all prepared, nothing let go yet
            root = self.husk
            # Let the tree go all or nothing: the gate it was born in frozen, each process
            # let go into it, then the commit, which thaws it whole (kernel/cgroup.py).
            gate = self.gate
            if gate is not None:
                gate.close()
            for i, s in enumerate(reversed(final.states)):
                self.husks[s.pid].let_go(s.stopped)
                if i == 0:
                    maybe_pause("resuming")     # one process let go (into the gate), not all
            if gate is not None:
                _make_live(built, None)         # the whole tree frozen in its gate, let go
                maybe_pause("live")             # its connections live, not committed yet
                gate.commit()                   # the commit: the whole tree runs from here
                if claim:
                    # only now: once the address is here, the peers' bytes are taken in by
                    # these sockets, and could not be given back to the source (a settler
                    # that finds the gate committed claims it: outcomes.py)
                    _make_live([], claim)
                    for sock, state in built:
                        tcp.settle(sock, state)
                gate.thaw()
            t_resumed = time.monotonic()
        except BaseException:
            if gate is not None:
                try:
                    gate.destroy()              # processes let go but frozen: never ran
                except OSError:
                    pass
            for sock, state in built:       # the source may resume: no FIN, no reset from here
                tcp.silence(sock, state)
            if claim:
                try:
                    claim.undo()          # the address back to the source
                except PrerestoreError:
                    pass
            if unix is not None:
                unix.rollback()           # the source's socket files back where they were
            self.abort()
            raise
        finally:
            for sock, _ in built:
                sock.close()
        maybe_pause("resumed")
        state_sum = _sum_stats(state_stats)
        leave_to = self._leave_to()
        if gate is not None:
            try:
                # each process into its source's cgroup (or back into ours), the gate removed
                gate.leave(where=leave_to)
            except OSError as e:           # it runs all the same: never a reason to fail now
                state_sum["gate_error"] = f"{gate.path}: {e}"
            if gate.misplaced:
                state_sum["cgroup_error"] = "; ".join(gate.misplaced)
        else:
            for host_pid, where in leave_to.items():
                try:
                    cgroup.move(host_pid, where)
                except OSError as e:
                    state_sum["cgroup_error"] = f"{where}: {e}"
        misplaced = self._misplaced(leave_to)
        if misplaced:
            state_sum["cgroup_error"] = misplaced
        if self.cgroups_made:
            state_sum["cgroups_made"] = list(self.cgroups_made)
        unix.commit()
        for h in self.husks.values():
            h.close()
        # the checks' time apart (a verified restore's downtime, phase by phase, is what it
        # would be without them plus verify_ms)
        out = {"verify_ms": page_ms + proc_ms, "verify_pages_ms": page_ms,
               "verify_proc_ms": proc_ms, "verify_gaps": gaps} if checked else {}
        return out | {
            "started_at": t0, "resumed_at": t_resumed,
            "apply_memory_ms": (t_mem - t0) * 1e3 - read_ms,
            "apply_state_ms": (t_state - t_mem) * 1e3 - page_ms,
            "resume_ms": (t_resumed - t_state) * 1e3 - proc_ms + read_ms,
            "finalize_ms": (t_resumed - t0) * 1e3,
            "memory": _sum_stats(mem), "state": state_sum,
            "processes": len(final.states), "zombies": len(final.zombies),
            "ipc_namespace": self.ipc.where,
            "pid": root.pid, "host_pid": root.host_pid, "init_pid": root.init_pid,
            "tree": [[s.pid, self.husks[s.pid].host_pid] for s in final.states]}

    def _settle_sharing(self, final: Round) -> set[int]:
        """Fd tables and fs (CLONE_FILES, CLONE_FS) the husks were forked sharing and that
        the source's processes no longer share (unshare, exec since) are unshared; a
        sharing the husk lacks cannot be, as a sharing begins only at clone. Returns the
        pids that set root, working directory and umask: of those sharing them, the last
        applied (Husk.apply_state)."""
        for t in final.tasks:
            husk = self.husks[t.pid]
            if t.shares & ~husk.shares:
                raise RestoreError(f"process {t.pid} shares {t.shares & ~husk.shares:#x} "
                                   "(CLONE_FILES 0x400, CLONE_FS 0x200) with its parent, "
                                   "which its husk was not forked with")
            if husk.shares & ~t.shares:
                husk.unshare(husk.shares & ~t.shares)
        last: dict[int, int] = {}
        for s in final.states:
            husk = self.husks[s.pid]
            last[id(husk.fs_leader or husk)] = s.pid
        return set(last.values())

    def _misplaced(self, leave_to: dict[int, str]) -> str:
        """After the tree left the gate: a process not in the cgroup it was moved to (one
        line), or "". The tree runs: this is reported, never a reason to fail now."""
        mount = cgroup.root_dir()
        for host_pid, where in leave_to.items():
            try:
                now = procfs.cgroup_v2(host_pid)
            except ProcessGone:
                continue                           # it exited already
            if mount and now is not None and \
                    os.path.join(mount, now.lstrip("/")).rstrip("/") != where.rstrip("/"):
                return f"pid {host_pid} is in cgroup {now}, not {where}"
        return ""

    def _source_seen(self, final: Round, wanted: bool, required: bool
                     ) -> list[VisibleState]:
        """What /proc showed of the frozen source: the final image's snapshot, or if wanted,
        the source itself read now if it is a process of this host (e.g. `dump
        --leave-stopped`); [] if not wanted or (unless required) not to be had."""
        if final.visible:                 # its source asked for the check: it runs
            return final.visible
        if not wanted:
            return []
        pids = [t.source_pid or t.pid for t in final.tasks]
        try:
            here = final.source.get("boot_id") == procfs.boot_id() and \
                procfs.stat_fields(final.source["pid"])[22] == str(final.source.get("starttime"))
            if here:
                return visible.snapshot_tree(pids)
        except (ProcessGone, KeyError):
            pass
        if required:
            raise RestoreError("--verify: the final image carries no snapshot of the source "
                               "(`dump --verify` makes one) and the source is not a process of "
                               "this host to read")
        return []

    def _tamper(self, final: Round) -> None:
        """PRERESTORE_FAULT=verify:rlimit|nice: change a husk as a faulty restore would, so
        that tests see the comparison catch it."""
        how = tamper("verify")
        host_pid = self.husks[final.states[0].pid].host_pid
        if how == "rlimit":
            soft, hard = resource.prlimit(host_pid, resource.RLIMIT_NOFILE)
            resource.prlimit(host_pid, resource.RLIMIT_NOFILE, (soft - 1, hard))
        elif how == "nice":
            os.setpriority(os.PRIO_PROCESS, host_pid, os.getpriority(os.PRIO_PROCESS,
                                                                     host_pid) + 1)

    def _verify(self, final: Round) -> None:
        for task in final.tasks:
            if task.pages_from != "pid":
                return
            diffs = self.husks[task.pid].verify_against(task.source_pid or task.pid, task.layout)
            if diffs:
                raise RestoreError(f"verify: pid {task.pid}: {len(diffs)} pages differ from the "
                                   f"source, first {[f'{a:x} in {w}' for a, w in diffs[:5]]}")

    def pin(self, cpu: int) -> None:
        """Put us and the husks on one CPU for the final step (see SourceSession.dump)."""
        os.sched_setaffinity(0, {cpu})
        for h in self.husks.values():
            h.pin(cpu)

    def abort(self) -> None:
        """Kill every husk not yet running, the deepest first (each exit is ours to collect
        as their tracer; the root's takes its pid namespace with it)."""
        for h in reversed(list(self.husks.values())):
            if not h.resumed:
                h.kill()
        self.husks = {}
        self.ipc.abort()
        if self.gate is not None and self.gate.state() == "closed":
            try:
                self.gate.destroy()          # whatever of the tree is left in it never ran
            except OSError:
                pass
            self.gate = None
        self.applied = []
        self._close_ptys()
        cgroup.unmake(self.cgroups_made)         # what we made for a tree that never ran
        self.cgroups = {}
        self.gate_noted = {}


def _sum_stats(stats: list[dict]) -> dict:
    out: dict = {}
    for s in stats:
        for k, v in s.items():
            if isinstance(v, (int, float)):
                out[k] = out.get(k, 0) + v
    return out


def cold_restore(directory: str, *, pidns: bool = False, claim_ip=None,
                 inherit_fds: dict[str, int] | None = None,
                 cgroup_root: str | None = None) -> dict:
    """Restore from a full image chain in one go: the baseline pre-restore is compared with.
    claim_ip: the service address (netaddr.Address) to take once the sockets are live."""
    if not os.path.isdir(directory):
        raise ImageError(f"{directory}: " + ("not a directory: -D names an image directory"
                                             if os.path.exists(directory) else
                                             "no such image directory"))
    return StagedTree(pidns=pidns, cgroup_root=cgroup_root).finalize(
        directory, claim_ip=claim_ip, inherit_fds=inherit_fds)
