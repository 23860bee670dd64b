"""A process tree being pre-restored: husks that follow the rounds of one image chain.

stage(dir) applies a round (the first one spawns the root's husk, and each process is forked
from its parent's husk in the round where it first appears); finalize(dir) applies the final
image, recreates zombies and process groups, and resumes the whole tree. Cold restore is the same
object given the whole chain at once. Any error kills every husk: there is never a half-restored
tree."""
from __future__ import annotations

import fcntl
import os
import resource
import signal
import socket
import stat
import tempfile
import time

import msgpack

from .. import netaddr
from ..errors import ImageError, PrerestoreError, ProcessGone, RestoreError
from ..image import schema
from ..faults import maybe_pause, tamper
from ..kernel import cgroup, native, procfs, tcp, tty, visible
from ..model import (FILE_IDENTITY, AddressSpaceRound, FileDescriptor, ProcessState, Round,
                     VisibleState)
from . import verify as verify_mod
from .husk import SIGCHLD, Husk
from .sysvipc import IpcPlace
from .unixsock import UnixSockets


MADE_ANON = ("eventfd", "timerfd", "signalfd", "epoll")
O_LARGEFILE = 0o100000           # x86-64 (Python's os.O_LARGEFILE is 0 there)


def _to_make(states: list[ProcessState], kinds: tuple[str, ...], made: dict):
    """The fds of these kinds to make, in tree and fd order, as (state, fd); an fd that
    shares the open file description of one met before gets that one's (already in made)."""
    for s in states:
        for f in sorted(s.fds, key=lambda f: f.fd):
            if f.kind not in kinds:
                continue
            if f.same_as:
                made[(s.pid, f.fd)] = made[f.same_as]
                continue
            yield s, f


def fd_data(f: FileDescriptor, where: str, fields: dict[str, type]) -> dict:
    """The msgpack map an fd of these kinds carries in `data`, checked field by field: a
    corrupt one is an ImageError that names the field."""
    try:
        m = msgpack.unpackb(f.data, raw=False)
    except Exception as e:
        raise ImageError(f"{where}: corrupt {f.kind} state ({e})") from None
    if not isinstance(m, dict):
        raise ImageError(f"{where}: corrupt {f.kind} state (not a map)")
    for name, kind in fields.items():
        if not isinstance(m.get(name), kind):
            raise ImageError(f"{where}: corrupt {f.kind} state: field {name!r} is "
                             f"{type(m.get(name)).__name__}, expected {kind.__name__}")
    return m


FIFO_FIELDS = {"mode": int, "uid": int, "gid": int, "deleted": bool, "queued": bytes}


def check_same_files(states: list[ProcessState]) -> None:
    """The regular files the tree has open must be here the very files the source had open
    (between hosts: on storage both see): each path's size and modification time as the
    source saw them at the freeze (FILE_IDENTITY), else a RestoreError naming the first that
    differs, before anything is let go (the source resumes). Between hosts the device and
    inode differ even for the same file; another copy of it (a stale replica, a local file
    where shared storage was meant) shows another size or mtime. The file is opened to be
    looked at: on NFS an open revalidates the attributes a stat may take from a cache."""
    seen: dict[str, tuple[int, int] | str] = {}
    for s in states:
        for f in s.fds:
            if f.kind != "file" or len(f.data) != FILE_IDENTITY.size:
                continue
            here = seen.get(f.path)
            if here is None:
                try:
                    fd = os.open(f.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                    try:
                        st = os.fstat(fd)
                    finally:
                        os.close(fd)
                    here = seen[f.path] = (st.st_size, st.st_mtime_ns)
                except OSError as e:
                    here = seen[f.path] = e.strerror or str(e)
            there = FILE_IDENTITY.unpack(f.data)
            if isinstance(here, str):
                raise RestoreError(f"pid {s.pid} fd {f.fd}: {f.path}: {here} here (the files "
                                   "the tree has open must be on storage both hosts see)")
            if here != there:
                raise RestoreError(
                    f"pid {s.pid} fd {f.fd}: {f.path} is not the file the source has open: "
                    f"{here[0]} bytes modified at {here[1]} ns here, {there[0]} bytes modified "
                    f"at {there[1]} ns there (the files the tree has open must be on storage "
                    "both hosts see)")


def make_fifos(states: list[ProcessState], made: dict) -> None:
    """Named FIFOs: opened at their path (made with mkfifo, with their mode and owner, where
    missing; a FIFO deleted while open is made beside where it was and unlinked at once), each
    open file description of the tree opened anew in its mode, the queued bytes written in once
    per FIFO. A FIFO that already holds them is left as it is: on the same host it is the very
    FIFO the frozen source still holds open, with its bytes in it."""
    holders: dict[tuple[int, int], int] = {}
    for s, f in _to_make(states, ("fifo",), made):
        where = f"pid {s.pid} fd {f.fd}: FIFO {f.path}"
        holder = holders.get(f.dev_inode)
        if holder is None:
            meta = fd_data(f, where, FIFO_FIELDS)
            holder = holders[f.dev_inode] = _open_fifo(f.path, meta, where)
            made[("fifo", holder)] = holder                 # closed with the rest
            try:
                if f.offset and fcntl.fcntl(holder, fcntl.F_GETPIPE_SZ) != f.offset:
                    fcntl.fcntl(holder, fcntl.F_SETPIPE_SZ, f.offset)
                queued = meta["queued"]
                if queued and not native.pipe_peek(holder, max(f.offset, len(queued))
                                                   ).startswith(queued):
                    if os.write(holder, queued) != len(queued):
                        raise RestoreError(f"{where}: could not queue its {len(queued)} bytes")
            except OSError as e:
                raise RestoreError(f"{where}: cannot give it its {f.offset} bytes of capacity "
                                   f"and {len(meta['queued'])} queued bytes ({e})") from None
        mode = f.flags & (os.O_ACCMODE | os.O_PATH | os.O_APPEND)
        fd = os.open(f"/proc/self/fd/{holder}", mode | os.O_NONBLOCK | os.O_CLOEXEC)
        if not f.flags & os.O_PATH:
            fcntl.fcntl(fd, fcntl.F_SETFL, f.flags & (os.O_NONBLOCK | os.O_APPEND))
        made[(s.pid, f.fd)] = fd


def _open_fifo(path: str, meta: dict, where: str) -> int:
    """Our own read-write fd of the FIFO at path (O_RDWR never waits for a peer), made first
    if missing, or, for a FIFO deleted while open, a new one made beside it and unlinked."""
    if meta["deleted"]:
        where_dir = os.path.dirname(path)
        path = os.path.join(where_dir if os.path.isdir(where_dir) else "/tmp",
                            f".prerestore-fifo-{os.getpid()}-{time.monotonic_ns()}")
    try:
        if meta["deleted"] or not os.path.lexists(path):
            os.mkfifo(path, 0o600)
            os.chown(path, meta["uid"], meta["gid"])
            os.chmod(path, meta["mode"])
        elif not stat.S_ISFIFO(os.lstat(path).st_mode):
            raise RestoreError(f"{where}: {path} is not a FIFO here")
        try:
            return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        finally:
            if meta["deleted"]:
                os.unlink(path)
    except OSError as e:
        raise RestoreError(f"{where}: cannot open or make it ({e})") from None


def make_inotify(states: list[ProcessState], made: dict) -> None:
    """inotify instances with their watches, at the paths the source's watched inodes had and
    with the same wds (see native.make_inotify), nothing queued (events the source had not
    read yet are not carried); added to `made` like pipes."""
    todo = list(_to_make(states, ("inotify",), made))
    if not todo:
        return
    spare = tempfile.mkdtemp(prefix=".prerestore-inotify-")   # takes the wds nobody had
    try:
        for s, f in todo:
            where = f"pid {s.pid} fd {f.fd}: inotify"
            watches = _inotify_watches(f, where)
            try:
                fd = native.make_inotify(os.O_CLOEXEC | (f.flags & os.O_NONBLOCK), spare,
                                         [(wd, mask | procfs.IN_DONT_FOLLOW, path)
                                          for wd, mask, path in watches])
            except OSError as e:
                raise RestoreError(f"{where}: cannot watch again what it watched: {e}") from None
            made[(s.pid, f.fd)] = fd
    finally:
        os.rmdir(spare)


def _inotify_watches(f: FileDescriptor, where: str) -> list[tuple[int, int, str]]:
    try:
        items = msgpack.unpackb(f.data, raw=False, unicode_errors="surrogateescape")
    except Exception as e:
        raise ImageError(f"{where}: corrupt inotify watches ({e})") from None
    last = 0
    if not isinstance(items, list):
        raise ImageError(f"{where}: corrupt inotify watches (not a list)")
    for i, w in enumerate(items):
        if not (isinstance(w, list) and len(w) == 3 and isinstance(w[0], int) and
                isinstance(w[1], int) and isinstance(w[2], str) and w[0] > last and
                0 <= w[1] < 1 << 32):
            raise ImageError(f"{where}: corrupt inotify watch {i} ({w!r}): expected "
                             "[wd, mask, path] with wds ascending")
        last = w[0]
    return [tuple(w) for w in items]


PTY_KINDS = ("pty-master", "pty-slave")


def make_ptys(states: list[ProcessState], made: dict, pairs: dict[int, tuple[int, int]]
              ) -> list[tuple[int, tty.PtyState]]:
    """The tree's pty pairs: the pair made when its session leader's husk was (pairs: by the
    source's pty number, our master fd and the new number), else a new one; the bytes queued
    in it refilled, its settings, window size and modes given; the tree's master fd is that
    master, each open file description of the slave a new open of it. Added to `made` like
    pipes. Returns (master, state) for each, to lock once every husk is done (tty.lock)."""
    ends = [(s, f) for s in states for f in sorted(s.fds, key=lambda f: f.fd)
            if f.kind in PTY_KINDS]
    firsts: dict[int, tuple[ProcessState, FileDescriptor]] = {}
    for s, f in ends:
        if f.kind == "pty-master" and not f.same_as:
            firsts.setdefault(f.dev_inode[1], (s, f))
    made_here: dict[int, tuple[int, int | None, tty.PtyState]] = {}
    for number, (s, f) in firsts.items():
        where = f"pid {s.pid} fd {f.fd}: pty /dev/pts/{number}"
        try:
            st = tty.PtyState.from_map(fd_data(f, where, {}))
        except ValueError as e:
            raise ImageError(f"{where}: corrupt pty state: {e}") from None
        master, _ = pairs.pop(number) if number in pairs else tty.make_pair()
        made[("pty", master)] = master                       # closed with the rest
        slave = None
        try:
            if st.slave != "never":
                slave = tty.open_slave(master, os.O_RDWR | os.O_NONBLOCK)
                made[("pty", slave)] = slave
            tty.refill(master, slave, st)
            tty.settle(master, slave, st)
            if st.owner:
                tty.set_slave_owner(master, st.owner)
        except OSError as e:
            raise RestoreError(f"{where}: cannot give the new pair its state ({e})") from None
        made_here[number] = (master, slave, st)
    for s, f in ends:
        if f.same_as:
            continue
        number = f.dev_inode[1]
        where = f"pid {s.pid} fd {f.fd}: pty /dev/pts/{number}"
        if number not in made_here:
            raise ImageError(f"{where}: the image has no master fd of that pty")
        master, _, _ = made_here[number]
        if f.kind == "pty-master":
            if firsts[number][1] is not f:
                raise RestoreError(f"{where}: a second open file description of a pty master "
                                   "cannot be made (a master is opened once)")
            fd = master
        else:
            try:
                # O_LARGEFILE too: an open() of the slave's path has it (the kernel adds it
                # on 64-bit), TIOCGPTPEER only if asked
                fd = tty.open_slave(master, f.flags & (os.O_ACCMODE | O_LARGEFILE))
            except OSError as e:
                raise RestoreError(f"{where}: cannot open the new pair's slave ({e})") from None
            made[("pty", fd)] = fd
        fcntl.fcntl(fd, fcntl.F_SETFL, f.flags & os.O_NONBLOCK)
        made[(s.pid, f.fd)] = fd
    for s, f in ends:
        if f.same_as:
            made[(s.pid, f.fd)] = made[f.same_as]
    return [(master, st) for master, _, st in made_here.values()]


def make_deleted_files(states: list[ProcessState], made: dict) -> None:
    """Files deleted while open: a new file with the carried content, in the directory the
    old one was in (or /tmp if that is gone), opened as the source had it and unlinked."""
    for s, f in _to_make(states, ("deleted",), made):
        where = os.path.dirname(f.path)
        if not os.path.isdir(where):
            where = "/tmp"
        tmp, name = tempfile.mkstemp(dir=where, prefix=".prerestore-deleted-")
        try:
            os.write(tmp, f.data)
            fd = os.open(name, (f.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC |
                                            os.O_NOCTTY)) | os.O_CLOEXEC)
            os.lseek(fd, f.offset, os.SEEK_SET)
        finally:
            os.close(tmp)
            os.unlink(name)
        made[(s.pid, f.fd)] = fd


# file status flags F_SETFL sets on an open file description
SETFL_FLAGS = os.O_APPEND | os.O_NONBLOCK | 0o20000 | 0o40000 | 0o1000000   # ASYNC DIRECT NOATIME


def parse_inherit_fd(text: str) -> tuple[str, int]:
    """--inherit-fd fd[N]:NAME -> (NAME, N): NAME is the object as the source's
    /proc/PID/fd names it ("pipe:[1234]", "socket:[5678]", "/var/log/app.log"), N an fd
    the restorer holds (inherited from whoever runs it) standing for it here."""
    head, sep, name = text.partition(":")
    if not (sep and head.startswith("fd[") and head.endswith("]") and head[3:-1].isdigit()
            and name):
        raise ValueError(f"--inherit-fd {text!r}: expected fd[N]:NAME, e.g. fd[3]:pipe:[1234]")
    return name, int(head[3:-1])


def missing_inherited(states: list[ProcessState], inherit_fds: dict[str, int]) -> list[str]:
    """The fds of the image that stand for objects outside the source's tree (kind
    "inherit") and that the restorer was given nothing for, or something opened otherwise
    (read vs write), in words."""
    problems = []
    for s in states:
        for f in s.fds:
            if f.kind != "inherit":
                continue
            given = inherit_fds.get(f.path)
            if given is None:
                problems.append(f"pid {s.pid} fd {f.fd}: {f.path} was outside the tree on the "
                                "source: name what it is connected to here with --inherit-fd "
                                f"fd[N]:{f.path}")
                continue
            try:
                mode = fcntl.fcntl(given, fcntl.F_GETFL) & os.O_ACCMODE
            except OSError as e:
                problems.append(f"--inherit-fd fd[{given}]:{f.path}: fd {given} is not open "
                                f"here ({e.strerror})")
                continue
            if mode != f.flags & os.O_ACCMODE:
                names = {os.O_RDONLY: "read-only", os.O_WRONLY: "write-only",
                         os.O_RDWR: "read-write"}
                problems.append(f"pid {s.pid} fd {f.fd}: {f.path} was open "
                                f"{names.get(f.flags & os.O_ACCMODE)}, the fd {given} given for "
                                f"it is {names.get(mode)}")
    return problems


def make_inherited(states: list[ProcessState], made: dict, inherit_fds: dict[str, int]) -> None:
    """Fds standing for objects outside the tree: a dup of what the restorer was given for
    each name (--inherit-fd; checked by missing_inherited), with the source's file status
    flags (O_NONBLOCK, O_APPEND...), which belong to the open file description the caller
    hands over for the restored tree."""
    for s, f in _to_make(states, ("inherit",), made):
        fd = os.dup(inherit_fds[f.path])
        made[(s.pid, f.fd)] = fd
        fcntl.fcntl(fd, fcntl.F_SETFL, f.flags & SETFL_FLAGS)


def make_deleted_dirs(states: list[ProcessState]) -> dict[tuple[int, str], str]:
    """Working directories and roots deleted while in use: a new directory with the
    source's mode and owner beside where the old one was (one for every process that had
    the same one), for the husks to enter; the caller removes them once they have
    (remove_dirs), which leaves them deleted as on the source. Returns their paths by
    (pid, "cwd"/"root")."""
    made: dict[str, str] = {}
    out: dict[tuple[int, str], str] = {}
    try:
        for s in states:
            for name, (mode, uid, gid) in sorted(s.deleted_dirs.items()):
                link = s.cwd if name == "cwd" else s.root
                if link not in made:
                    old = link[:-len(" (deleted)")] if link.endswith(" (deleted)") else link
                    where = os.path.dirname(old)
                    if not os.path.isdir(where):
                        raise RestoreError(f"pid {s.pid}: its deleted {name} {old} was in "
                                           f"{where}, which is not a directory here")
                    path = tempfile.mkdtemp(dir=where, prefix=".prerestore-deleted-")
                    made[link] = path
                    os.chown(path, uid, gid)
                    os.chmod(path, mode)
                out[(s.pid, name)] = made[link]
    except BaseException:
        remove_dirs(out)
        for path in made.values():
            _rmdir(path)
        raise
    return out


def remove_dirs(dirs: dict[tuple[int, str], str]) -> None:
    for path in set(dirs.values()):
        _rmdir(path)


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def make_tcp(states: list[ProcessState], made: dict, built: list[tuple[socket.socket, dict]],
             foreign_ok: bool = False, live: bool = True) -> None:
    """TCP and UDP sockets of an image: listening ones bound again, established ones rebuilt
    through TCP repair and live (live=False: left in repair mode, for the caller to make live
    with tcp.go_live). Their addresses must be local here, unless foreign_ok: then
    they are built before the service's address arrives (tcp.allow_foreign_address), and the
    caller settles them once it has (tcp.settle). Each one built is added to `built` (a socket
    object on it of our own, and its state): if the restore fails, they are silenced before
    the husks holding them die (tcp.silence)."""
    for s, f in _to_make(states, ("tcp", "udp"), made):
        where = f"pid {s.pid} fd {f.fd}"
        state = fd_data(f, where, {})             # its fields: tcp.restore checks them
        try:
            sock = tcp.restore(state, where, foreign_ok, live) if f.kind == "tcp" else \
                tcp.restore_udp(state, where, foreign_ok)
        except OSError as e:
            raise RestoreError(f"{where}: cannot rebuild the {f.kind.upper()} socket "
                               f"{state.get('local')} -> {state.get('peer', 'listening')}: "
                               f"{e}") from None
        fd = sock.detach()
        fcntl.fcntl(fd, fcntl.F_SETFL, f.flags & os.O_NONBLOCK)
        made[(s.pid, f.fd)] = fd
        built.append((socket.socket(fileno=os.dup(fd)), state))


def _make_live(built: list[tuple[socket.socket, dict]], claim) -> None:
    """The rebuilt connections out of repair mode, then the service's address claimed: last,
    when nothing is left that may fail: from here on the peers talk to these sockets, and
    what they take in could not be given back to the source."""
    for sock, state in built:
        if sock.type == socket.SOCK_STREAM:
            tcp.go_live(sock, state)
    if claim:
        claim()
        for sock, state in built:
            tcp.settle(sock, state)


def make_anon(states: list[ProcessState], made: dict) -> None:
    """eventfds (with their counter), timerfds (armed as they were, ticks included),
    signalfds (their mask) and empty epolls (the husk registers its fds in them once they are
    all in place: Husk.apply_state); added to `made` like pipes."""
    for s, f in _to_make(states, MADE_ANON, made):
        flags = os.O_CLOEXEC | (f.flags & os.O_NONBLOCK)
        if f.kind == "eventfd":
            first = min(f.offset, 0xFFFFFFFF)
            fd = os.eventfd(first, flags | (os.EFD_SEMAPHORE if f.data == b"S" else 0))
            if f.offset > first:
                os.eventfd_write(fd, f.offset - first)
        elif f.kind == "signalfd":
            fd = native.make_signalfd(f.offset, flags)
        elif f.kind == "timerfd":
            clock, vs, vns, is_, ins, ticks = procfs.TIMERFD.unpack(f.data)
            fd = native.make_timerfd(clock, flags, (vs, vns), (is_, ins), ticks)
        else:
            fd = native.make_epoll(os.O_CLOEXEC)
        made[(s.pid, f.fd)] = fd


def make_pipes(states: list[ProcessState]) -> dict[tuple[int, int], int]:
    """The pipes of an image, made here (one read and one write open file description each,
    more where the source had more, O_NONBLOCK as it had it), their queued bytes written back;
    the husks are handed them (Husk.apply_state). Returns our fds by (pid, fd)."""
    made: dict[tuple[int, int], int] = {}
    pipes: dict[tuple[int, int], tuple[int, int]] = {}
    try:
        for s in states:
            for f in sorted(s.fds, key=lambda f: f.fd):
                if f.kind != "pipe":
                    continue
                if f.same_as:
                    made[(s.pid, f.fd)] = made[f.same_as]
                    continue
                if f.dev_inode not in pipes:
                    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                    pipes[f.dev_inode] = (r, w)
                    made[("pipe", r)], made[("pipe", w)] = r, w     # closed with the rest
                    if f.offset:
                        try:
                            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, f.offset)
                        except OSError as e:
                            raise RestoreError(f"pid {s.pid} fd {f.fd}: {f.path}: cannot give "
                                               f"the pipe its {f.offset} bytes ({e})") from None
                r, w = pipes[f.dev_inode]
                if f.data:
                    if os.write(w, f.data) != len(f.data):
                        raise RestoreError(f"{f.path}: could not queue its {len(f.data)} bytes")
                end = r if f.flags & 3 == os.O_RDONLY else w
                if f.flags & 3 == os.O_RDWR or any(v == end for k, v in made.items()
                                                  if k[0] != "pipe"):
                    # another open file description of the same pipe
                    end = os.open(f"/proc/self/fd/{end}", (f.flags & 3) | os.O_CLOEXEC |
                                  os.O_NONBLOCK)
                fcntl.fcntl(end, fcntl.F_SETFL, f.flags & os.O_NONBLOCK)
                made[(s.pid, f.fd)] = end
    except BaseException:
        for fd in set(made.values()):
            os.close(fd)
        raise
    return made


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
