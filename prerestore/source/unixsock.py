"""The unix sockets of a tree, for an image: which can be carried and how (classify, run before
the freeze to refuse early and again on the frozen tree), and their state (capture).

Everything inside the tree is carried: names (path and abstract), listening sockets with the
connections waiting in their accept queues, connections between the tree's processes (made
anew through the same listener, so that they keep their names), datagram sockets connected
to a name, the messages waiting in each socket (a datagram with its sender's name), half-
closed and peer-closed connections. A connection that leaves the tree cannot follow to
another host: it is refused by name (pid, fd, socket, peer and who holds the peer) unless the
name it goes through is declared external (`external`, --external-unix NAME):
  - a connection to a socket outside the tree bound to NAME (a client of an outside server,
    a datagram socket connected to /dev/log) is connected to NAME again on restore: a new
    connection (what was queued on the old one is not carried, for a datagram socket what
    waits in its own queue is);
  - a connection that a client outside the tree made to our listener NAME reads, once
    restored, what was queued in it, then end of file (the client lost it); one still
    waiting in the accept queue is dropped."""
from __future__ import annotations

import os
import socket
import stat as stat_mod
from typing import NamedTuple

from ..errors import ProcessGone, UnsupportedState
from ..kernel import native, procfs, sockdiag
from ..kernel.sockdiag import TCP_ESTABLISHED, TCP_LISTEN, UnixSocket, printable
from ..model import FileDescriptor, ProcessState, UnixSocketState

SO_PEEK_OFF = 42
PEEK_MAX = 1 << 20          # the largest single message carried
RCV_SHUTDOWN = 1


class Placement(NamedTuple):
    """How one socket of the tree is carried: UnixSocketState's state and references."""
    state: str
    peer: int = 0
    listener: int = 0
    peer_name: bytes = b""


def classify(sockets: list[tuple[int, int, int]], table: dict[int, UnixSocket],
             external: frozenset[bytes]) -> tuple[dict[int, Placement], list[str]]:
    """sockets: (pid, fd, inode) of every unix socket fd in the tree. Returns how each inode
    is carried and, in words, what cannot be. Sockets missing from `table` are not unix
    sockets: the caller's to judge."""
    inodes = {ino for _, _, ino in sockets}
    first: dict[int, tuple[int, int]] = {}
    for pid, fd, ino in sockets:
        first.setdefault(ino, (pid, fd))
    waiting_on = {c: lst.ino for lst in table.values() if lst.state == TCP_LISTEN
                  for c in lst.icons}
    listeners = {(lst.name, lst.type): lst.ino for lst in table.values()
                 if lst.state == TCP_LISTEN and lst.name and lst.ino in inodes}
    out: dict[int, Placement] = {}
    problems: list[str] = []
    for ino, (pid, fd) in first.items():
        u = table.get(ino)
        if u is None:
            continue
        where = f"pid {pid} fd {fd}: {u.describe()}"
        if u.type not in sockdiag.TYPE_NAMES:
            problems.append(f"{where}: unknown socket type (not carried)")
            continue
        if u.state == TCP_LISTEN:
            for client in u.icons:
                if client == 0:
                    problems.append(f"{where}: a connection whose client already closed waits "
                                    "in its accept queue: not carried (what was sent on it "
                                    "cannot be read without accepting it)")
                elif client not in inodes and u.name not in external:
                    problems.append(
                        f"{where} has a connection from {_outside(table, client)} waiting in "
                        "its accept queue: that client cannot follow to another host"
                        + _declare_hint(b"", u.name))
            out[ino] = Placement("listening")
        elif u.state == TCP_ESTABLISHED and u.peer in inodes:
            peer = table[u.peer]
            if u.type == socket.SOCK_DGRAM and not peer.name and peer.peer != ino:
                problems.append(f"{where} is connected to the unnamed {peer.describe()}, which "
                                "is not connected back to it: it cannot be connected again")
            listener = listeners.get((u.name, u.type), 0) \
                if u.name and u.type != socket.SOCK_DGRAM else 0
            out[ino] = Placement("connected", u.peer, listener)
        elif u.state == TCP_ESTABLISHED and ino in waiting_on:
            lst = table[waiting_on[ino]]
            if u.wqueue:
                problems.append(f"{where} sent data on its connection to {lst.describe()}, "
                                "which waits to be accepted: not carried (it cannot be read "
                                "without accepting the connection)")
            elif lst.ino in inodes:
                out[ino] = Placement("pending", lst.ino)
            elif lst.name and lst.name in external:
                out[ino] = Placement("reconnect", peer_name=lst.name)
            else:
                problems.append(f"{where} is connected to {_outside(table, lst.ino)} (waiting "
                                "in its accept queue) outside the tree: that peer cannot follow "
                                "to another host" + _declare_hint(lst.name, u.name))
        elif u.state == TCP_ESTABLISHED and u.peer:
            peer = table.get(u.peer)
            if peer is not None and peer.name and peer.name in external:
                out[ino] = Placement("reconnect", peer_name=peer.name)
            elif u.name and u.name in external and u.type != socket.SOCK_DGRAM:
                out[ino] = Placement("peer-gone", listener=listeners.get((u.name, u.type), 0))
            else:
                problems.append(f"{where} is connected to {_outside(table, u.peer)} outside "
                                "the tree: that peer cannot follow to another host"
                                + _declare_hint(peer.name if peer else b"",
                                                u.name if u.type != socket.SOCK_DGRAM else b""))
        elif u.state == TCP_ESTABLISHED and u.type != socket.SOCK_DGRAM:
            out[ino] = Placement("peer-gone", listener=listeners.get((u.name, u.type), 0)
                                 if u.name else 0)
        else:
            # a datagram socket is "established" once another connected to it; with no peer
            # of its own it sends nowhere by default (one whose peer closed gets ENOTCONN
            # once restored, not ECONNREFUSED)
            out[ino] = Placement("unconnected")
    return out, problems


def _declare_hint(peer_name: bytes, own_name: bytes) -> str:
    if peer_name:
        return (f" (declare it with --external-unix {printable(peer_name)} to connect to that "
                "name again on restore)")
    if own_name:
        return (f" (declare --external-unix {printable(own_name)} to let such connections "
                "end at the move)")
    return " (an unnamed peer cannot be declared external)"


def _outside(table: dict[int, UnixSocket], ino: int) -> str:
    u = table.get(ino)
    text = u.describe() if u is not None else f"socket [{ino}]"
    return text + holder(ino)


def holder(ino: int) -> str:
    """ " held by pid N (comm)" for a process that has socket `ino` open, else "" (it may be
    held only by a connection in flight). Scans /proc: for error messages only."""
    want = f"socket:[{ino}]"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in procfs.fd_numbers(int(entry)):
                if procfs.readlink(int(entry), f"fd/{fd}") == want:
                    return f" held by pid {entry} ({procfs.comm(int(entry))}) fd {fd}"
        except (OSError, ProcessGone):
            continue
    return ""


def must_bind(u: UnixSocket, p: Placement) -> bool:
    """Is this a socket the restorer always binds to its path name (so its file must be
    found)? Listening, unconnected, waiting and reconnecting sockets and datagram sockets. A
    connected stream or seqpacket socket keeps its name only when made through a listener:
    its own file is carried if found, else it is made without its name."""
    return bool(u.name) and not u.name.startswith(b"\0") and (
        u.type == socket.SOCK_DGRAM or p.state in ("listening", "unconnected", "pending",
                                                   "reconnect"))


def socket_file(pid: int, u: UnixSocket) -> tuple[str, os.stat_result]:
    """For a socket bound to a path: (the directory a relative name resolves in, "" for an
    absolute one; the socket file's stat), seen from pid. Raises UnsupportedState if the path
    no longer leads to the socket's file (removed, replaced, or relative to a cwd the process
    left): there would be nothing to bind again."""
    path = os.fsdecode(u.name)
    base = "" if path.startswith("/") else procfs.readlink(pid, "cwd")
    full = os.path.join(base, path)
    try:
        st = procfs.stat_file(pid, f"root{full}", follow=False)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    # inodes only: st_dev of btrfs subvolumes and overlayfs is not the superblock's dev_t
    # that sock_diag reports
    if st is None or not stat_mod.S_ISSOCK(st.st_mode) or u.vfs is None or \
            st.st_ino != u.vfs[2]:
        raise UnsupportedState(f"pid {pid}: {u.describe()}: its socket file {full} is gone or "
                               "was replaced since it was bound: not carried")
    return base, st


def file_problems(sockets: list[tuple[int, int, int]], table: dict[int, UnixSocket],
                  placements: dict[int, Placement]) -> list[str]:
    """The sockets that must be bound again whose file cannot be found (see socket_file)."""
    problems = []
    seen: set[int] = set()
    for pid, fd, ino in sockets:
        u = table.get(ino)
        if ino in seen or u is None or ino not in placements or \
                not must_bind(u, placements[ino]):
            continue
        seen.add(ino)
        try:
            socket_file(pid, u)
        except UnsupportedState as e:
            problems.append(f"fd {fd}: {e}")
        except ProcessGone:
            continue
    return problems


def capture(states: list[ProcessState], external: frozenset[bytes]) -> None:
    """On the frozen tree: give the first fd of each unix socket its UnixSocketState (options
    and queued messages read from a dup of it: peeked, so the source loses nothing if it
    resumes). Raises UnsupportedState if something cannot be carried (the tree may have
    changed since the check before the freeze)."""
    fds = [(s.pid, f) for s in states for f in s.fds if f.kind == "unix" and not f.same_as]
    if not fds:
        return
    table = sockdiag.tables([s.pid for s in states])
    sockets = [(pid, f.fd, f.dev_inode[1]) for pid, f in fds]
    problems = [f"pid {pid} fd {fd}: socket:[{ino}] is not a unix socket of the tree's network "
                "namespace (not carried)" for pid, fd, ino in sockets if ino not in table]
    placements, more = classify(sockets, table, external)
    problems += more + file_problems(sockets, table, placements)
    if problems:
        raise UnsupportedState("cannot migrate: " + "; ".join(problems))
    pidfds: dict[int, int] = {}
    try:
        for pid, f in fds:
            if pid not in pidfds:
                pidfds[pid] = native.pidfd_open(pid)
            mine = socket.socket(fileno=native.pidfd_getfd(pidfds[pid], f.fd, pid))
            try:
                ino = f.dev_inode[1]
                f.unix = _state(pid, f, table[ino], placements, mine)
            finally:
                mine.close()           # our own fd on the source's open file description
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)


def _state(pid: int, f: FileDescriptor, u: UnixSocket, placements: dict[int, Placement],
           sock: socket.socket) -> UnixSocketState:
    where = f"pid {pid} fd {f.fd}: {u.describe()}"
    p = placements[u.ino]
    st = UnixSocketState(type=u.type, state=p.state, name=u.name, peer=p.peer,
                         listener=p.listener, peer_name=p.peer_name, shutdown=u.shutdown)
    if p.state == "listening":
        st.backlog = u.wqueue                    # sock_diag reports the backlog there
        # the tree's clients, in queue order (those of outside clients declared external
        # are dropped)
        st.accept_queue = [c for c in u.icons if c in placements and
                           placements[c] == Placement("pending", u.ino)]
    if u.name and not u.name.startswith(b"\0") and not p.listener:
        try:
            st.base, fst = socket_file(pid, u)
            st.file = (stat_mod.S_IMODE(fst.st_mode), fst.st_uid, fst.st_gid)
        except UnsupportedState:
            if must_bind(u, p):
                raise
    if p.state == "peer-gone":
        st.peer_name = _name(sock.getpeername())
    st.sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2
    st.rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    st.passcred = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED))
    st.peek_off = sock.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
    # a stream or seqpacket socket has a queue while connected (reading an unconnected one
    # fails); a connection made again to an outside name starts empty
    if u.type == socket.SOCK_DGRAM or p.state in ("connected", "pending", "peer-gone"):
        st.queue = peek_messages(sock, u, where)
    return st


def _name(addr) -> bytes:
    """A unix address as Python gives it (str for a path, bytes if abstract, None) as bytes."""
    return os.fsencode(addr) if addr else b""


def peek_messages(sock: socket.socket, u: UnixSocket, where: str) -> list[tuple[bytes, bytes]]:
    """The receive queue, peeked message by message through SO_PEEK_OFF (put back as it was):
    (sender's name, bytes) for each datagram or seqpacket record, one message for a stream."""
    out: list[tuple[bytes, bytes]] = []
    old = sock.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
    sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    peeked = 0
    try:
        while True:
            try:
                data, anc, flags, addr = sock.recvmsg(
                    PEEK_MAX, socket.CMSG_SPACE(4 * 253) + socket.CMSG_SPACE(12),
                    socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if any(level == socket.SOL_SOCKET and t == socket.SCM_RIGHTS for level, t, _ in anc):
                raise UnsupportedState(f"{where}: file descriptors in flight in a unix socket "
                                       "(not carried)")
            if flags & socket.MSG_TRUNC:
                raise UnsupportedState(f"{where}: a message of more than {PEEK_MAX} bytes is "
                                       "queued (not carried)")
            if not data and (u.type == socket.SOCK_STREAM or (
                    u.shutdown & RCV_SHUTDOWN and peeked >= u.rqueue)):
                # end of file (the peer shut down): nothing more is queued. (An empty record
                # still queued behind the last bytes of a shut-down seqpacket connection is
                # taken for it: indistinguishable.)
                break
            peeked += len(data)
            out.append((_name(addr), data))
    finally:
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, old)
    if u.type == socket.SOCK_STREAM and out:
        return [(b"", b"".join(data for _, data in out))]
    return out
