"""An authenticated stream between two hosts that share a secret: the migration wire.

Handshake (the destination listens; both sides prove they know the secret, neither sends it):

    server -> client   {"hello": PROTOCOL, "nonce": Ns}
    client -> server   {"nonce": Nc, "proof": HMAC(secret, "client" | Ns | Nc)}
    server -> client   {"proof": HMAC(secret, "server" | Nc | Ns)}

Then every frame is   length u32 | kind u8 | body | tag (32 bytes)
with tag = HMAC-SHA256(K, direction | sequence u64 | kind | body), K = HMAC(secret, "session" |
Ns | Nc): a frame that was altered, replayed, reordered or sent by someone without the secret
fails its tag and ends the connection. kind is MESSAGE (a msgpack map, decoded as plain data
only: never evaluated) or DATA (raw page bytes, streamed as they are read). Frames are not
encrypted: this authenticates the peer and the data, it does not hide them (run it over a
private network or a tunnel where that matters).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import socket
import stat
import struct
import time

import msgpack

from ..errors import PrerestoreError, ProtocolError

PROTOCOL = "prerestore-wire/1"
HEADER = struct.Struct("!IB")
TAG = 32
MESSAGE, DATA = 1, 2
MAX_FRAME = 64 << 20
HANDSHAKE_MAX = 4096
HANDSHAKE_TIMEOUT = 10.0      # s for the whole handshake (and the TCP connect, client side)


def parse_address(text: str, default_host: str = "") -> tuple[str, int]:
    """HOST:PORT ([v6]:PORT too) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:      # 0: any free port (serve)
        raise PrerestoreError(f"{text!r}: expected HOST:PORT (port 0..65535)")
    return (host.strip("[]") or default_host), int(port)


class AuthError(ProtocolError):
    """The peer does not know the shared secret (or the stream was tampered with)."""


def load_secret(path: str | None = None) -> bytes:
    """The shared secret: the file named by path (or $PRERESTORE_SECRET_FILE), or
    $PRERESTORE_SECRET. At least 16 bytes; whitespace around it is ignored. Like ssh with a
    private key, a file that anyone but its owner (root or us) may read or write is refused."""
    path = path or os.environ.get("PRERESTORE_SECRET_FILE")
    if path:
        secret = _read_secret_file(path)
    else:
        secret = os.environ.get("PRERESTORE_SECRET", "").strip().encode()
    if len(secret) < 16:
        raise AuthError("a shared secret of at least 16 bytes is needed: --secret-file FILE "
                        "(or PRERESTORE_SECRET_FILE / PRERESTORE_SECRET)")
    return secret


def _read_secret_file(path: str) -> bytes:
    try:                            # O_NONBLOCK: a FIFO planted there must not hang us
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise PrerestoreError(f"secret file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PrerestoreError(f"secret file {path}: not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise PrerestoreError(f"secret file {path} belongs to uid {st.st_uid}: it must "
                                  f"belong to root or to the user running prerestore (uid "
                                  f"{os.geteuid()}): chown {os.geteuid()} {path}")
        if st.st_mode & 0o077:
            raise PrerestoreError(f"secret file {path} has mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}: others than its owner may "
                                  f"read or write it; make it private: chmod 600 {path}")
        return os.read(fd, 1 << 16).strip()
    finally:
        os.close(fd)


def _mac(key: bytes, *parts) -> bytes:
    m = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:             # no joined copy: page data comes in 8 MiB frames
        m.update(part)
    return m.digest()


LINK_TIMEOUT = 20.0


def watch_link(sock: socket.socket, timeout: float) -> None:
    """A link that dies (a cable, a host gone, `ip link set down`) ends the connection within
    about timeout seconds, with an error on either end, instead of the many minutes TCP's own
    retransmissions take: keepalive probes after timeout/4 s of silence, and TCP_USER_TIMEOUT
    for data (or probes) left unanswered. A peer that is merely slow (staging a large round)
    still answers keepalives from its kernel, so it is not cut off."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(timeout / 4)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(timeout / 8)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 8)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(timeout * 1000)))


class Channel:
    """One authenticated connection. Use Channel.accept / Channel.connect."""

    def __init__(self, sock: socket.socket, key: bytes, role: str):
        self.sock = sock
        self.key = key
        self.out_dir, self.in_dir = (b"c>s", b"s>c") if role == "client" else (b"s>c", b"c>s")
        self.sent = self.received = 0
        self.bytes_sent = self.bytes_received = 0
        # one receive buffer, reused: fresh 8 MiB buffers cost a page fault per 4 KiB
        self._buf = bytearray(1 << 20)

    # ---- handshake ------------------------------------------------------------------------------

    @classmethod
    def connect(cls, address: tuple[str, int], secret: bytes,
                timeout: float = HANDSHAKE_TIMEOUT,
                link_timeout: float = LINK_TIMEOUT) -> "Channel":
        """Connect and authenticate; the TCP connect and the handshake together get timeout
        seconds (a peer that accepts and never answers is given up on, ProtocolError). After
        that, a dead link ends the connection within link_timeout seconds (watch_link)."""
        where = f"{address[0]}:{address[1]}"
        deadline = time.monotonic() + timeout
        try:
            sock = socket.create_connection(address, timeout=timeout)
        except TimeoutError:
            raise ProtocolError(f"cannot connect to {where}: no answer within {timeout:g} s") \
                from None
        except OSError as e:
            raise ProtocolError(f"cannot connect to {where}: {e.strerror or e}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = _plain_recv(sock, deadline)
            if hello.get("hello") != PROTOCOL or not isinstance(hello.get("nonce"), bytes):
                raise ProtocolError(f"{where} does not speak {PROTOCOL}")
            ns, nc = hello["nonce"], os.urandom(32)
            _plain_send(sock, {"nonce": nc, "proof": _mac(secret, b"client", ns, nc)}, deadline)
            reply = _plain_recv(sock, deadline)
            proof = reply.get("proof")
            if not isinstance(proof, bytes) or \
                    not hmac.compare_digest(proof, _mac(secret, b"server", nc, ns)):
                raise AuthError(f"{where} did not prove it knows the shared secret")
            sock.settimeout(None)
            watch_link(sock, link_timeout)
            return cls(sock, _mac(secret, b"session", ns, nc), "client")
        except TimeoutError:
            sock.close()
            raise ProtocolError(f"{where} accepted the connection but did not complete the "
                                f"handshake within {timeout:g} s") from None
        except ProtocolError as e:             # AuthError too: say who it was
            sock.close()
            if where in str(e):
                raise
            raise type(e)(f"{where}: {e}") from None
        except OSError as e:
            sock.close()
            raise ProtocolError(f"{where}: handshake failed: {e.strerror or e}") from None
        except BaseException:
            sock.close()
            raise

    @classmethod
    def accept(cls, sock: socket.socket, secret: bytes,
               timeout: float = HANDSHAKE_TIMEOUT,
               link_timeout: float = LINK_TIMEOUT) -> "Channel":
        """Authenticate a connection just accepted; closes it and raises AuthError if the
        peer does not know the secret, ProtocolError if the whole handshake takes longer
        than timeout seconds (a peer trickling bytes is cut off at the deadline, not given
        a fresh timeout per read)."""
        deadline = time.monotonic() + timeout
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ns = os.urandom(32)
            _plain_send(sock, {"hello": PROTOCOL, "nonce": ns}, deadline)
            answer = _plain_recv(sock, deadline)
            nc, proof = answer.get("nonce"), answer.get("proof")
            if not isinstance(nc, bytes) or len(nc) != 32 or not isinstance(proof, bytes) or \
                    not hmac.compare_digest(proof, _mac(secret, b"client", ns, nc)):
                raise AuthError("the peer did not prove it knows the shared secret")
            _plain_send(sock, {"proof": _mac(secret, b"server", nc, ns)}, deadline)
            sock.settimeout(None)
            watch_link(sock, link_timeout)
            return cls(sock, _mac(secret, b"session", ns, nc), "server")
        except TimeoutError:
            sock.close()
            raise ProtocolError(f"the peer did not complete the handshake within {timeout:g} s") \
                from None
        except BaseException:
            sock.close()
            raise

    # ---- frames ---------------------------------------------------------------------------------

    def _send(self, kind: int, body) -> None:
        if len(body) > MAX_FRAME:
            raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
        tag = _mac(self.key, self.out_dir, struct.pack("!QB", self.sent, kind), body)
        parts = [HEADER.pack(len(body), kind), body, tag]
        while parts:                     # scatter-gather: the body is never copied
            n = self.sock.sendmsg(parts)
            while parts and n >= len(parts[0]):
                n -= len(parts[0])
                parts.pop(0)
            if parts and n:
                parts[0] = memoryview(parts[0])[n:]
        self.sent += 1
        self.bytes_sent += HEADER.size + len(body) + TAG

    def _recv(self) -> tuple[int, memoryview]:
        """(kind, body): the body is a view of the channel's buffer, valid until the next
        receive."""
        length, kind = HEADER.unpack(_recv_exact(self.sock, HEADER.size))
        if length > MAX_FRAME or kind not in (MESSAGE, DATA):
            raise ProtocolError(f"bad frame header (kind {kind}, {length} bytes)")
        if len(self._buf) < length + TAG:
            self._buf = bytearray(length + TAG)
        view = memoryview(self._buf)[:length + TAG]
        _recv_into(self.sock, view)
        body, tag = view[:length], view[length:]
        if not hmac.compare_digest(tag, _mac(self.key, self.in_dir,
                                             struct.pack("!QB", self.received, kind), body)):
            raise AuthError(f"frame {self.received} failed authentication (tampered, replayed "
                            "or from a stranger)")
        self.received += 1
        self.bytes_received += HEADER.size + length + TAG
        return kind, body

    def send(self, obj: dict) -> None:
        self._send(MESSAGE, msgpack.packb(obj, use_bin_type=True))

    def send_data(self, chunk) -> None:
        """chunk: bytes or any buffer (sent as it is, not copied)."""
        self._send(DATA, chunk)

    def recv(self) -> dict:
        kind, body = self._recv()
        if kind != MESSAGE:
            raise ProtocolError("expected a message, got page data")
        return _decode(body)

    def recv_data(self) -> memoryview:
        """Page data: a view valid until the next receive (write it out before that)."""
        kind, body = self._recv()
        if kind != DATA:
            raise ProtocolError("expected page data, got a message")
        return body

    def close(self) -> None:
        self.sock.close()


def _decode(body: bytes) -> dict:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as e:          # msgpack raises several types on garbage
        raise ProtocolError(f"malformed message: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a map, got {type(obj).__name__}")
    return obj


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ProtocolError(f"connection closed after {got} of {n} bytes")
        got += k


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        _until(sock, deadline)
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ProtocolError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _until(sock: socket.socket, deadline: float | None) -> None:
    """Let the next socket call wait only until deadline (TimeoutError past it)."""
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        sock.settimeout(left)


def _plain_send(sock: socket.socket, obj: dict, deadline: float | None = None) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    _until(sock, deadline)
    sock.sendall(struct.pack("!I", len(body)) + body)


def _plain_recv(sock: socket.socket, deadline: float | None = None) -> dict:
    (length,) = struct.unpack("!I", _recv_exact(sock, 4, deadline))
    if length > HANDSHAKE_MAX:
        raise ProtocolError(f"handshake message of {length} bytes")
    return _decode(_recv_exact(sock, length, deadline))
