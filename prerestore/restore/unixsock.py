"""The unix sockets of an image, made anew by the restorer and handed to the husks like pipes
(source/unixsock.py says what is carried).

The order follows what the kernel allows:
  1. sockets are made: by socketpair() for a connection that went through no listener of the
     image (its ends lose their names: a socketpair has none) and for an unnamed datagram
     pair, by accept() (step 3) for one accepted from a listener, by socket() otherwise;
  2. names are bound (a stale socket file at a path is moved aside first, and the source's
     mode and owner are given to the new one), listeners listen;
  3. each connection accepted from a listener is made through it, so both ends keep their
     names: its client (or, if its peer is gone, a stand-in) connects, the listener accepts;
     then the connections that were waiting to be accepted connect again, in their order;
  4. queued messages are sent again: on a connection from its other end; a datagram from the
     socket of the image bound to its sender's name, else from a stand-in (bound to the
     sender's abstract name if it is free here, unnamed otherwise: the sender's name is then
     lost). Before datagram sockets connect: a connected one takes only its peer's messages;
  5. datagram sockets connect to their peer's name, declared-external ones to theirs (a new
     connection), the stand-ins for gone peers close (what is queued is read, then end of
     file), shutdowns and socket options are set last (SO_PASSCRED would give an unnamed
     socket a name as it connects).

Messages carry the credentials of the restorer (SCM_CREDENTIALS, SO_PEERCRED), not the
original senders'.

Until the restored tree runs, the source's socket files are only moved aside: rollback() puts
them back (and removes ours), commit() deletes them."""
from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import stat as stat_mod
import struct

from ..errors import RestoreError
from ..kernel.sockdiag import printable
from ..model import FileDescriptor, ProcessState, UnixSocketState

SO_SNDBUFFORCE, SO_RCVBUFFORCE, SO_PEEK_OFF = 32, 33, 42
ACCEPT_TIMEOUT = 5.0
SHUT = {1: socket.SHUT_RD, 2: socket.SHUT_WR, 3: socket.SHUT_RDWR}


@contextlib.contextmanager
def _in_dir(base: str):
    """Run with `base` as our cwd, where a relative socket name resolves (it must be bound
    relative, for getsockname() to say what it said)."""
    if not base:
        yield
        return
    here = os.open(".", os.O_PATH | os.O_CLOEXEC)
    try:
        os.chdir(base)
        yield
    finally:
        os.fchdir(here)
        os.close(here)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class UnixSockets:
    """The unix sockets of one final image, by the inode they had on the source."""

    def __init__(self, states: list[ProcessState]):
        self.recs: dict[int, tuple[str, UnixSocketState]] = {}
        for s in states:
            for f in s.fds:
                if f.kind == "unix" and not f.same_as and f.unix is not None:
                    self.recs[f.dev_inode[1]] = (f"pid {s.pid} fd {f.fd}", f.unix)
        self.socks: dict[int, socket.socket] = {}
        self.other_end: dict[int, socket.socket] = {}   # a connection's other end, by inode
        self.stand_ins: list[socket.socket] = []          # closed once the messages are queued
        self.aside: list[tuple[str, str]] = []            # (path, where its old file went)
        self.files: list[tuple[str, int]] = []            # socket files we made: (path, inode)

    # ---- what is made how -------------------------------------------------------------------

    def _accepted(self, ino: int) -> bool:
        """Made by accept() on a listener of the image (step 3)."""
        u = self.recs[ino][1]
        return bool(u.listener) and u.state in ("connected", "peer-gone") and \
            u.type != socket.SOCK_DGRAM

    def _through(self, ino: int) -> int:
        """The listener of the image a client connects through to be made: the one its peer
        was accepted from, or for a client whose peer is gone, the one bound to the name its
        peer had. 0 if none."""
        u = self.recs[ino][1]
        if u.type == socket.SOCK_DGRAM:
            return 0
        if u.state == "connected" and self._accepted(u.peer):
            return self.recs[u.peer][1].listener
        if u.state == "peer-gone" and not self._accepted(ino) and u.peer_name:
            for lino, (_, lst) in self.recs.items():
                if lst.state == "listening" and lst.name == u.peer_name and lst.type == u.type:
                    return lino
        return 0

    def _pair(self, ino: int) -> int | None:
        """The peer it is made with by socketpair() (step 1), if it is."""
        u = self.recs[ino][1]
        if u.state != "connected" or self._accepted(ino) or self._through(ino):
            return None
        peer = self.recs[u.peer][1]
        if u.type != socket.SOCK_DGRAM:
            return u.peer
        if peer.state == "connected" and peer.peer == ino and not (u.name and peer.name):
            return u.peer
        return None

    def _binds(self, ino: int) -> bool:
        """Bound to its name by us: a named socket not made by accept(), nor as a stream or
        seqpacket socketpair (step 1); one whose socket file the source no longer had keeps
        no name if nothing needs it."""
        u = self.recs[ino][1]
        if not u.name or self._accepted(ino):
            return False
        if u.type != socket.SOCK_DGRAM and u.state in ("connected", "peer-gone") and \
                not self._through(ino):
            return False
        return u.name.startswith(b"\0") or u.file is not None or \
            u.type == socket.SOCK_DGRAM or u.state not in ("connected", "peer-gone")

    # ---- making them --------------------------------------------------------------------------

    def make(self) -> None:
        for ino, (where, u) in self.recs.items():
            if ino in self.socks or self._accepted(ino):
                continue
            pair = self._pair(ino)
            if pair is not None:
                a, b = socket.socketpair(socket.AF_UNIX, u.type | socket.SOCK_CLOEXEC)
                self.socks[ino], self.socks[pair] = a, b
                self.other_end[ino], self.other_end[pair] = b, a
            elif u.state == "peer-gone" and not self._through(ino):
                a, b = socket.socketpair(socket.AF_UNIX, u.type | socket.SOCK_CLOEXEC)
                self.socks[ino], self.other_end[ino] = a, b
                self.stand_ins.append(b)
            else:
                self.socks[ino] = socket.socket(socket.AF_UNIX, u.type | socket.SOCK_CLOEXEC)
        for ino, (where, u) in self.recs.items():
            if self._binds(ino):
                self._bind(where, self.socks[ino], u)
            if u.state == "listening":
                self.socks[ino].listen(u.backlog)
        for ino, (where, u) in self.recs.items():
            if self._accepted(ino):
                self._accept(ino, where, u)
            elif u.state == "peer-gone" and self._through(ino):
                self._accept_stand_in(ino, where, u)
        for ino, (where, u) in self.recs.items():
            for client in u.accept_queue:
                self._connect(self.recs[client][0], self.socks[client], u.name, u.base)
        for ino, (where, u) in self.recs.items():
            if u.queue:
                self._queue(ino, where, u)
        for ino, (where, u) in self.recs.items():
            if u.state == "connected" and u.type == socket.SOCK_DGRAM and \
                    self._pair(ino) is None:
                peer = self.recs[u.peer][1]
                if not peer.name:
                    raise RestoreError(f"{where}: its peer [{u.peer}] has no name to connect to")
                self._connect(where, self.socks[ino], peer.name, peer.base)
            elif u.state == "reconnect":
                self._connect(where, self.socks[ino], u.peer_name, "", external=True)
        for sock in self.stand_ins:
            sock.close()
        self.stand_ins = []
        for ino, (where, u) in self.recs.items():
            self._finish(where, self.socks[ino], u)

    def _bind(self, where: str, sock: socket.socket, u: UnixSocketState) -> None:
        if u.name.startswith(b"\0"):
            try:
                sock.bind(u.name)
            except OSError as e:
                raise RestoreError(f"{where}: cannot bind the abstract name "
                                   f"{printable(u.name)}: {e.strerror} (an abstract name has "
                                   "no file to move aside: on the source's own host, its "
                                   "frozen source still holds it)") from None
            return
        path = os.path.join(u.base, os.fsdecode(u.name))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat_mod.S_ISSOCK(st.st_mode):
                raise RestoreError(f"{where}: {path} exists and is not a socket: not replaced")
            aside = f"{path}.prerestore-{secrets.token_hex(4)}"
            os.rename(path, aside)           # the source's socket file, stale here
            self.aside.append((path, aside))
        mode, uid, gid = u.file or (0o777 & ~_umask(), os.getuid(), os.getgid())
        old_umask = os.umask(~mode & 0o777)       # the file is made with its mode
        try:
            with _in_dir(u.base):
                sock.bind(u.name)
        except OSError as e:
            raise RestoreError(f"{where}: cannot bind {path}: {e.strerror}") from None
        finally:
            os.umask(old_umask)
        # its owner (and mode bits beyond 0777) through the file itself, never through a
        # path that might have been made a symbolic link meanwhile
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISSOCK(st.st_mode):
                raise RestoreError(f"{where}: {path} was replaced as it was bound")
            self.files.append((path, st.st_ino))
            if u.file:
                os.chown(f"/proc/self/fd/{fd}", uid, gid)
                os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def _connect(self, where: str, sock: socket.socket, name: bytes, base: str,
                 external: bool = False) -> None:
        sock.settimeout(ACCEPT_TIMEOUT)     # a full backlog must not hang the restore
        try:
            with _in_dir(base):
                sock.connect(name)
        except OSError as e:
            what = "declared external, " if external else ""
            raise RestoreError(f"{where}: cannot connect to {printable(name)} ({what}"
                               f"{e.strerror or e})") from None

    def _accept(self, ino: int, where: str, u: UnixSocketState) -> None:
        """An accepted connection, made through its listener: its client (or a stand-in for
        a gone one) connects, the listener accepts."""
        if u.state == "connected":
            client = self.socks[u.peer]
        else:
            client = socket.socket(socket.AF_UNIX, u.type | socket.SOCK_CLOEXEC)
            self.stand_ins.append(client)
        conn = self._through_listener(where, client, u.listener)
        self.socks[ino], self.other_end[ino] = conn, client
        if u.state == "connected":
            self.other_end[u.peer] = conn

    def _accept_stand_in(self, ino: int, where: str, u: UnixSocketState) -> None:
        """A client whose peer is gone: it connects through the listener its peer came from,
        which accepts a stand-in for the peer (closed once the queued messages are in)."""
        conn = self._through_listener(where, self.socks[ino], self._through(ino))
        self.other_end[ino] = conn
        self.stand_ins.append(conn)

    def _through_listener(self, where: str, client: socket.socket, lino: int) -> socket.socket:
        """Connect client to the listener lino of the image, and accept that connection. A
        client from elsewhere that connects to the new listener at that moment is accepted
        too (told apart by its credentials): its connection is closed."""
        listener = self.recs[lino][1]
        self._connect(where, client, listener.name, listener.base)
        lsock = self.socks[lino]
        lsock.settimeout(ACCEPT_TIMEOUT)
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError as e:
                raise RestoreError(f"{where}: the listener did not accept its connection "
                                   f"({e})") from None
            pid = struct.unpack("=3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      12))[0]
            if pid == os.getpid():
                return conn
            conn.close()

    def _queue(self, ino: int, where: str, u: UnixSocketState) -> None:
        """Send its queued messages again (see the module's step 4)."""
        end = self.other_end.get(ino)
        senders: dict[bytes, socket.socket] = {}
        try:
            for sender_name, data in u.queue:
                if end is not None and (u.type != socket.SOCK_DGRAM or not sender_name):
                    src = end
                    _room(src, len(data))
                    _send(src, data, None, where)
                    continue
                if not u.name:
                    raise RestoreError(f"{where}: a message from {printable(sender_name)} waits "
                                       "in it, but it has no name to send it to")
                src = senders.get(sender_name) or self._sender(sender_name, senders)
                _room(src, len(data))
                with _in_dir(u.base):
                    _send(src, data, u.name, where)
        finally:
            for s in senders.values():
                if s not in self.socks.values():
                    s.close()

    def _sender(self, name: bytes, senders: dict[bytes, socket.socket]) -> socket.socket:
        """The socket to send a datagram from, so that it arrives from `name` if possible."""
        for ino, (_, u) in self.recs.items():
            if name and u.name == name and u.type == socket.SOCK_DGRAM and ino in self.socks:
                senders[name] = self.socks[ino]
                return senders[name]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if name.startswith(b"\0"):
            try:
                sock.bind(name)
            except OSError:
                pass            # still held by its owner here: the datagram comes unnamed
        senders[name] = sock
        return sock

    def _finish(self, where: str, sock: socket.socket, u: UnixSocketState) -> None:
        """Shutdowns and options, last."""
        try:
            if u.shutdown and u.state in ("connected", "pending", "reconnect"):
                sock.shutdown(SHUT[u.shutdown])
            if u.sndbuf and sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2 != \
                    u.sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, u.sndbuf)
            if u.rcvbuf and sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2 != \
                    u.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, u.rcvbuf)
            if u.peek_off >= 0:
                sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, u.peek_off)
            if u.passcred:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        except OSError as e:
            raise RestoreError(f"{where}: cannot set up the unix socket: {e}") from None

    # ---- handing over, and the socket files ---------------------------------------------------

    def take(self, f: FileDescriptor) -> int:
        """Our fd of the socket for this fd (O_NONBLOCK as the source had it); ours to close."""
        fd = self.socks.pop(f.dev_inode[1]).detach()
        fcntl.fcntl(fd, fcntl.F_SETFL, f.flags & os.O_NONBLOCK)
        return fd

    def close(self) -> None:
        for sock in list(self.socks.values()) + self.stand_ins:
            sock.close()
        self.socks, self.stand_ins = {}, []

    def commit(self) -> None:
        """The restored tree runs: the source's old socket files go."""
        for _, aside in self.aside:
            try:
                os.unlink(aside)
            except OSError:
                pass
        self.aside = []

    def rollback(self) -> None:
        """The restore failed: our socket files go, the source's come back."""
        self.close()
        for path, ino in self.files:
            try:
                if os.lstat(path).st_ino == ino:
                    os.unlink(path)
            except OSError:
                pass
        for path, aside in reversed(self.aside):
            try:
                os.rename(aside, path)
            except OSError:
                pass
        self.files, self.aside = [], []


def _room(sock: socket.socket, size: int) -> None:
    """Let `sock` hold `size` more bytes in flight (what was queued fitted in the source's
    buffers; ours start at the defaults). Its own size is set again at the end."""
    have = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    if have < 2 * size + 65536:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, have + 2 * size + 65536)


def _send(sock: socket.socket, data: bytes, to: bytes | None, where: str) -> None:
    try:
        if sock.type == socket.SOCK_STREAM:
            view = memoryview(data)
            while view:
                view = view[sock.send(view, socket.MSG_DONTWAIT):]
        elif to is None:
            sock.send(data, socket.MSG_DONTWAIT)
        else:
            sock.sendto(data, socket.MSG_DONTWAIT, to)
    except OSError as e:
        raise RestoreError(f"{where}: cannot queue a message of {len(data)} bytes again: "
                           f"{e.strerror or e}") from None
