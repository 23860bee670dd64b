"""The makers of a restored tree's objects that are not memory: what the husks are given in
place of the source's open files before apply_state.

Each make_* takes the states of the final image (and `made`, the fds made so far by (pid, fd),
which apply_state hands over to the husks) and makes its kind of object once per shared open
file description: FIFOs and their queued data (make_fifos), inotify instances and watches
(make_inotify), pty pairs (make_ptys), deleted files and directories (make_deleted_files,
make_deleted_dirs), fds the destination is given (--inherit-fd: make_inherited), TCP sockets
(make_tcp), eventfd/timerfd/signalfd/epoll (make_anon) and pipes (make_pipes). fd_data reads
and validates the data an image carries for one fd; check_same_files, that the regular files
the tree has open are here the very files the source had open. StagedTree (restore/staged.py)
calls them at finalize, for pre-restore and cold restore alike."""
from __future__ import annotations

import fcntl
import os
import socket
import stat
import tempfile
import time

import msgpack

from ..errors import ImageError, RestoreError
from ..kernel import native, procfs, tcp, tty
from ..model import FILE_IDENTITY, FileDescriptor, ProcessState


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
