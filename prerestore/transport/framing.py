"""Length-prefixed msgpack messages over a stream socket.

Only plain data crosses: maps, lists, strings, numbers, bytes. Nothing received is evaluated or
used to pick code beyond a fixed table of operations, and sizes are bounded before allocation."""
from __future__ import annotations

import socket
import struct

import msgpack

from ..errors import ProtocolError

LENGTH = struct.Struct("!I")
MAX_MESSAGE = 64 << 20


def send_msg(sock: socket.socket, obj) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    sock.sendall(LENGTH.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ProtocolError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket) -> dict:
    (length,) = LENGTH.unpack(_recv_exact(sock, LENGTH.size))
    if length > MAX_MESSAGE:
        raise ProtocolError(f"peer announced a {length}-byte message (limit {MAX_MESSAGE})")
    try:
        obj = msgpack.unpackb(_recv_exact(sock, length), raw=False, strict_map_key=False)
    except Exception as e:   # msgpack raises ValueError, TypeError (unhashable keys), ...
        raise ProtocolError(f"malformed message: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a map, got {type(obj).__name__}")
    return obj
