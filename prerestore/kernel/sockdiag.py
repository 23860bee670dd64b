"""Unix sockets as the kernel describes them (NETLINK_SOCK_DIAG, what `ss -x` reads): type,
state, bound name and the file it made, the inode of the peer, the clients waiting in a
listener's accept queue, queue lengths. /proc/net/unix has no peers.

A diag socket sees the network namespace it was made in: tables() makes one in each namespace
the given processes live in (a thread of ours enters it for that one call)."""
from __future__ import annotations

import os
import socket
import struct
import threading
from typing import NamedTuple

from . import native

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER, UDIAG_SHOW_ICONS, UDIAG_SHOW_RQLEN = \
    0x1, 0x2, 0x4, 0x8, 0x10
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_ICONS, UNIX_DIAG_RQLEN = 0, 1, 2, 3, 4
UNIX_DIAG_SHUTDOWN = 6                     # always sent
NLMSGHDR = struct.Struct("=IHHII")
UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
UNIX_DIAG_MSG = struct.Struct("=BBBBIII")
RTATTR = struct.Struct("=HH")
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10
CLONE_NEWNET = 0x40000000
TYPE_NAMES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram",
              socket.SOCK_SEQPACKET: "seqpacket"}


class UnixSocket(NamedTuple):
    ino: int
    type: int             # socket.SOCK_STREAM / SOCK_DGRAM / SOCK_SEQPACKET
    state: int            # TCP_ESTABLISHED (1) when connected, TCP_LISTEN (10), TCP_CLOSE (7)
    name: bytes           # b"" if not bound; abstract names start with b"\0"; a path without
                          # its terminating NUL (relative if it was bound relative)
    peer: int             # the peer's inode; 0 if none, if the peer is gone, or if the peer
                          # is a connection still waiting in a listener's accept queue
    rqueue: int           # bytes (stream) or datagrams waiting to be read; listening: how many
                          # connections wait to be accepted
    shutdown: int         # RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2
    wqueue: int = 0       # memory its sent data holds at the receiver; listening: the backlog
    vfs: tuple[int, int, int] | None = None     # a path name's file: (major, minor, inode)
    icons: tuple[int, ...] = ()  # listening: the clients whose connections wait, in queue order

    @property
    def kind(self) -> str:
        return TYPE_NAMES.get(self.type, f"type {self.type}")

    def describe(self) -> str:
        """Its kind, inode and name as people read them ("stream socket [123] @name")."""
        return f"unix {self.kind} socket [{self.ino}]" + \
            (f" {printable(self.name)}" if self.name else "")


def printable(name: bytes) -> str:
    """A socket name as ss(8) shows it: @ for the leading NUL of an abstract name."""
    if name.startswith(b"\0"):
        return "@" + name[1:].decode(errors="backslashreplace").replace("\0", "@")
    return name.decode(errors="surrogateescape")


def parse_name(text: str) -> bytes:
    """The inverse of printable(): "@name" is abstract, anything else a path."""
    return b"\0" + text[1:].encode() if text.startswith("@") else os.fsencode(text)


def unix_sockets() -> dict[int, UnixSocket]:
    """Every unix socket of our own network namespace, by inode."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    return _dump(s)


def tables(pids: list[int]) -> dict[int, UnixSocket]:
    """Every unix socket of the network namespaces these processes live in, by inode (socket
    inodes are unique across namespaces). Processes gone meanwhile are skipped."""
    here = os.stat("/proc/self/ns/net").st_ino
    out: dict[int, UnixSocket] = {}
    done: set[int] = set()
    for pid in pids:
        try:
            ns = os.stat(f"/proc/{pid}/ns/net").st_ino
        except (FileNotFoundError, ProcessLookupError):
            continue
        if ns in done:
            continue
        done.add(ns)
        out.update(unix_sockets() if ns == here else _dump(_diag_socket_in(pid)))
    return out


def _diag_socket_in(pid: int) -> socket.socket:
    """A diag socket made in pid's network namespace, by a thread that enters it and ends."""
    got: dict = {}

    def make():
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                native.setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            got["sock"] = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                        NETLINK_SOCK_DIAG)
        except BaseException as e:
            got["error"] = e

    t = threading.Thread(target=make, name=f"sockdiag-netns-{pid}")
    t.start()
    t.join()
    if "error" in got:
        raise got["error"]
    return got["sock"]


def _dump(s: socket.socket) -> dict[int, UnixSocket]:
    try:
        req = UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0,
                                 UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER |
                                 UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN, 0xFFFFFFFF, 0xFFFFFFFF)
        s.send(NLMSGHDR.pack(NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY,
                             NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req)
        out: dict[int, UnixSocket] = {}
        while True:
            data = s.recv(1 << 16)
            off = 0
            while off + NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = NLMSGHDR.unpack_from(data, off)
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, off + NLMSGHDR.size)[0]
                    raise OSError(err, "sock_diag dump of unix sockets failed")
                _parse(data[off + NLMSGHDR.size:off + length], out)
                off += (length + 3) & ~3
    finally:
        s.close()


def _parse(msg: bytes, out: dict[int, UnixSocket]) -> None:
    _, kind, state, _, ino, _, _ = UNIX_DIAG_MSG.unpack_from(msg)
    name, peer, rqueue, wqueue, shutdown, vfs, icons = b"", 0, 0, 0, 0, None, ()
    off = UNIX_DIAG_MSG.size
    while off + RTATTR.size <= len(msg):
        length, attr = RTATTR.unpack_from(msg, off)
        if length < RTATTR.size:
            break
        value = msg[off + RTATTR.size:off + length]
        if attr == UNIX_DIAG_NAME:
            # a path name is reported with its terminating NUL; an abstract one is exact
            name = value if value.startswith(b"\0") else value.split(b"\0", 1)[0]
        elif attr == UNIX_DIAG_VFS:
            vino, vdev = struct.unpack_from("=II", value)
            vfs = (vdev >> 20, vdev & 0xFFFFF, vino)          # the kernel's own dev_t
        elif attr == UNIX_DIAG_PEER:
            peer = struct.unpack_from("=I", value)[0]
        elif attr == UNIX_DIAG_ICONS:
            icons = struct.unpack_from(f"={len(value) // 4}I", value)
        elif attr == UNIX_DIAG_RQLEN:
            rqueue, wqueue = struct.unpack_from("=II", value)
        elif attr == UNIX_DIAG_SHUTDOWN:
            shutdown = value[0]
        off += (length + 3) & ~3
    out[ino] = UnixSocket(ino, kind, state, name, peer, rqueue, shutdown, wqueue, vfs, icons)
