"""Unix sockets as the kernel describes them (NETLINK_SOCK_DIAG, what `ss -x` reads): type,
state, bound name, the inode of the peer, queue lengths. /proc/net/unix has no peers.

Only the caller's network namespace is seen: the tree's sockets must live in it."""
from __future__ import annotations

import socket
import struct
from typing import NamedTuple

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
UDIAG_SHOW_NAME, UDIAG_SHOW_PEER, UDIAG_SHOW_RQLEN = 0x1, 0x4, 0x10
UNIX_DIAG_NAME, UNIX_DIAG_PEER, UNIX_DIAG_RQLEN, UNIX_DIAG_SHUTDOWN = 0, 2, 4, 6
NLMSGHDR = struct.Struct("=IHHII")
UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
UNIX_DIAG_MSG = struct.Struct("=BBBBIII")
RTATTR = struct.Struct("=HH")
TCP_ESTABLISHED, TCP_LISTEN = 1, 10


class UnixSocket(NamedTuple):
    ino: int
    type: int             # socket.SOCK_STREAM / SOCK_DGRAM / SOCK_SEQPACKET
    state: int            # TCP_ESTABLISHED (1) when connected, TCP_LISTEN (10), TCP_CLOSE (7)
    name: bytes           # b"" if not bound; abstract names start with b"\0"
    peer: int             # the peer's inode, 0 if none
    rqueue: int           # bytes (stream) or datagrams waiting to be read; listening: backlog
    shutdown: int         # RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2


def unix_sockets() -> dict[int, UnixSocket]:
    """Every unix socket of this network namespace, by inode."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    try:
        req = UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0,
                                 UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN
                                 | 0x20,   # UDIAG_SHOW_SHUTDOWN
                                 0xFFFFFFFF, 0xFFFFFFFF)
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
    name, peer, rqueue, shutdown = b"", 0, 0, 0
    off = UNIX_DIAG_MSG.size
    while off + RTATTR.size <= len(msg):
        length, attr = RTATTR.unpack_from(msg, off)
        if length < RTATTR.size:
            break
        value = msg[off + RTATTR.size:off + length]
        if attr == UNIX_DIAG_NAME:
            name = value
        elif attr == UNIX_DIAG_PEER:
            peer = struct.unpack_from("=I", value)[0]
        elif attr == UNIX_DIAG_RQLEN:
            rqueue = struct.unpack_from("=I", value)[0]
        elif attr == UNIX_DIAG_SHUTDOWN:
            shutdown = value[0]
        off += (length + 3) & ~3
    out[ino] = UnixSocket(ino, kind, state, name, peer, rqueue, shutdown)
