"""unixsockets DIR [--own-netns]: a server (the parent) and its client (the child) talk over
unix sockets of every kind an image carries.

  - A stream listener bound to the relative path "stream.sock" (cwd DIR, mode 0640, owned
    by 4321:4322). The client always keeps two connections waiting in its accept queue
    besides the one being served. The server greets each connection with its number (the
    accept order), answers its REQ_STREAM numbered requests with digests; then the client
    shuts down writing, the server sees end of file and closes, and the client reads the
    last answers and then end of file from a peer that is gone. Every connection after the
    first ones is made anew while the program runs, also after a migration.
  - A seqpacket listener on an abstract name, the same with record boundaries checked; its
    clients are bound to abstract names of their own, which the server checks.
  - A datagram socket bound to DIR/dgram.sock receives numbered datagrams from three senders:
    one bound to an abstract name, one bound to DIR/client.sock, one unnamed and connected to
    it. The server checks each datagram's sender name and sequence number, and answers the
    named senders from an unbound socket.
  - A connection to a third listener (abstract name), from a client bound to the path
    DIR/leftover.sock: the server wrote LEFTOVER bytes on it and closed it at once; the client
    reads 16 of them every 10 turns (then end of file), so it always has a gone peer.
The client keeps AHEAD requests and datagrams in flight, so that messages are always queued.
Names (getsockname/getpeername) and the socket files' type and mode are checked as it goes.
Anything lost, doubled, reordered, merged, cut or misnamed prints BAD. Prints "start pid=N",
then "it=N digest=<hex>" every 100 turns, the same in every run (names depend on DIR only).

--own-netns: run in a network namespace of its own (abstract names are per namespace: a
restore through image files on this host can then bind them while the frozen source still
holds its own, as on another host)."""
import ctypes
import hashlib
import os
import select
import socket
import stat
import struct
import sys
import time

DIR = os.path.abspath(sys.argv[1])
if "--own-netns" in sys.argv:
    if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:     # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
os.chdir(DIR)
TAG = hashlib.sha256(DIR.encode()).hexdigest()[:12].encode()
SEQ_NAME = b"\0prerestore-test-" + TAG + b"-seqpacket"
S1_NAME = b"\0prerestore-test-" + TAG + b"-sender"
S2_PATH = os.path.join(DIR, "client.sock")
DGRAM_PATH = os.path.join(DIR, "dgram.sock")
LEFTOVER_NAME = b"\0prerestore-test-" + TAG + b"-leftover"
LEFTOVER_PATH = os.path.join(DIR, "leftover.sock")
LEFTOVER = 64 * 1024
AHEAD, PENDING, REQ_STREAM, REQ_SEQ = 3, 2, 20, 13
OWNER = (4321, 4322)                     # of the stream listener's socket file
STREAM, SEQ = socket.SOCK_STREAM, socket.SOCK_SEQPACKET


def bad(text: str) -> None:
    print(f"BAD {text}", flush=True)


def seq_client_name(k: int) -> bytes:
    return b"\0prerestore-test-" + TAG + b"-client-%d" % k


def request(n: int, kind: int) -> bytes:
    body = hashlib.sha256(b"%d/%d" % (n, kind)).digest() * (1 + n % 7)
    return struct.pack("=II", n, len(body)) + body


def answer(req: bytes) -> bytes:
    return req[:4] + hashlib.sha256(req).digest()                  # 36 bytes


def datagram(n: int, who: int) -> bytes:
    return struct.pack("=II", n, who) + hashlib.sha256(b"dgram %d %d" % (n, who)).digest()


def ack(msg: bytes) -> bytes:
    return b"ACK" + msg[:8] + hashlib.sha256(msg).digest()[:8]


def recv_exact(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            bad(f"end of file after {len(got)} of {n} bytes")
            sys.exit(1)
        got += chunk
    return got


def leftover() -> bytes:
    return b"".join(hashlib.sha256(b"leftover %d" % i).digest() for i in range(LEFTOVER // 32))


def check_file(path: str, mode: int, owner: tuple[int, int] = (0, 0)) -> None:
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode) or stat.S_IMODE(st.st_mode) != mode or \
            (st.st_uid, st.st_gid) != owner:
        bad(f"{path}: mode {st.st_mode:o} owner {st.st_uid}:{st.st_gid}, expected a socket "
            f"with mode {mode:o}, owner {owner}")


# ---- the server: the parent ------------------------------------------------------------------

def serve(listeners: dict, dgram: socket.socket, replies: socket.socket) -> None:
    active = {STREAM: None, SEQ: None}
    accepted = {STREAM: 0, SEQ: 0}
    pending = b""
    expect = {1: 0, 2: 0, 3: 0}
    names = {1: S1_NAME, 2: S2_PATH, 3: None}
    while True:
        ready, _, _ = select.select(
            [dgram] + [active[k] or listeners[k] for k in (STREAM, SEQ)], [], [], 1.0)
        for s in ready:
            if s is dgram:
                while True:
                    try:
                        msg, addr = dgram.recvfrom(1 << 16, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    n, who = struct.unpack_from("=II", msg)
                    if who not in names or (addr or None) != names[who] or n != expect[who] or \
                            msg != datagram(n, who):
                        bad(f"datagram {n} from {who} ({addr!r}), expected {expect.get(who)}")
                    expect[who] = n + 1
                    if names[who]:
                        replies.sendto(ack(msg), names[who])
            elif s in listeners.values():
                kind = STREAM if s is listeners[STREAM] else SEQ
                conn, _ = s.accept()
                k = accepted[kind]
                accepted[kind] += 1
                want = ("stream.sock", "") if kind == STREAM else (SEQ_NAME, seq_client_name(k))
                if (conn.getsockname(), conn.getpeername()) != want:
                    bad(f"accepted connection {k}: names {conn.getsockname()!r}, "
                        f"{conn.getpeername()!r}, expected {want!r}")
                conn.sendall(b"HELO" + struct.pack("=I", k))
                active[kind] = conn
            elif s is active[STREAM]:
                data = s.recv(1 << 16)
                if not data:
                    if pending:
                        bad(f"stream: {len(pending)} bytes of a request cut")
                    s.close()
                    active[STREAM], pending = None, b""
                    continue
                pending += data
                while len(pending) >= 8:
                    size = struct.unpack_from("=I", pending, 4)[0]
                    if len(pending) < 8 + size:
                        break
                    req, pending = pending[:8 + size], pending[8 + size:]
                    if req != request(struct.unpack_from("=I", req)[0], STREAM):
                        bad(f"stream request {struct.unpack_from('=I', req)[0]} corrupt")
                    s.sendall(answer(req))
            elif s is active[SEQ]:
                req = s.recv(1 << 16)
                if not req:
                    s.close()
                    active[SEQ] = None
                    continue
                n = struct.unpack_from("=I", req)[0]
                if req != request(n, SEQ):
                    bad(f"seqpacket record {n} of {len(req)} bytes is not the one sent")
                s.send(answer(req))


# ---- the client: the child, which checks and reports ---------------------------------------

class Connections:
    """The client's connections to one listener: connection k carries requests
    k*per .. (k+1)*per-1; PENDING more wait in the accept queue."""

    def __init__(self, kind: int, per: int):
        self.kind, self.per = kind, per
        self.conns: dict[int, socket.socket] = {}
        self.opened = 0

    def open_upto(self, k: int) -> None:
        while self.opened <= k:
            s = socket.socket(socket.AF_UNIX, self.kind)
            if self.kind == SEQ:
                s.bind(seq_client_name(self.opened))
            s.connect("stream.sock" if self.kind == STREAM else SEQ_NAME)   # no data yet
            self.conns[self.opened] = s
            self.opened += 1

    def turn(self, n: int, digest) -> None:
        k = n // self.per
        self.open_upto(k + PENDING)
        s = self.conns[k]
        if n % self.per == 0:                       # its first request: it was accepted
            hello = recv_exact(s, 8) if self.kind == STREAM else s.recv(64)
            if hello != b"HELO" + struct.pack("=I", k):
                bad(f"{self.kind}: connection {k} greeted as {hello!r}")
            digest.update(hello)
            want = "stream.sock" if self.kind == STREAM else SEQ_NAME
            if s.getpeername() != want:
                bad(f"{self.kind}: connection {k} peer name {s.getpeername()!r}")
        s.sendall(request(n, self.kind))
        if n % self.per == self.per - 1:
            s.shutdown(socket.SHUT_WR)              # its last request
        m = n - AHEAD
        if m < 0:
            return
        km = m // self.per
        got = recv_exact(self.conns[km], 36) if self.kind == STREAM else \
            self.conns[km].recv(1 << 16)
        if got != answer(request(m, self.kind)):
            bad(f"{self.kind}: answer {m} on connection {km}: {got[:8].hex()}")
        digest.update(got)
        if m % self.per == self.per - 1:            # the server closed it after the last
            if self.conns[km].recv(16) != b"":
                bad(f"{self.kind}: connection {km} not at end of file")
            self.conns.pop(km).close()


def client() -> None:
    ctypes.CDLL(None).prctl(1, 9)            # PR_SET_PDEATHSIG, SIGKILL
    streams, seqs = Connections(STREAM, REQ_STREAM), Connections(SEQ, REQ_SEQ)
    s1 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s1.bind(S1_NAME)
    s2 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s2.bind(S2_PATH)
    s3 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s3.connect(DGRAM_PATH)
    rest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    rest.bind(LEFTOVER_PATH)
    os.chmod(LEFTOVER_PATH, 0o751)
    rest.connect(LEFTOVER_NAME)
    left, read = leftover(), 0
    digest = hashlib.sha256()
    n = 0
    while True:
        if n % 10 == 0 and read <= len(left):
            got = rest.recv(16) if read < len(left) else rest.recv(16) + rest.recv(16)
            if got != left[read:read + 16]:
                bad(f"leftover bytes {read}: {got.hex()}")
            if (rest.getsockname(), rest.getpeername()) != (LEFTOVER_PATH, LEFTOVER_NAME):
                bad(f"leftover names {rest.getsockname()!r} {rest.getpeername()!r}")
            read += 16
        streams.turn(n, digest)
        seqs.turn(n, digest)
        s1.sendto(datagram(n, 1), DGRAM_PATH)
        s2.sendto(datagram(n, 2), DGRAM_PATH)
        s3.send(datagram(n, 3))
        m = n - AHEAD
        if m >= 0:
            for s, who in ((s1, 1), (s2, 2)):
                got = s.recv(64)
                if got != ack(datagram(m, who)):
                    bad(f"datagram ack {m} to {who}: {got!r}")
                digest.update(got)
        n += 1
        if n % 50 == 0:
            if (s1.getsockname(), s2.getsockname(), s3.getpeername()) != \
                    (S1_NAME, S2_PATH, DGRAM_PATH):
                bad(f"datagram names {s1.getsockname()!r} {s2.getsockname()!r} "
                    f"{s3.getpeername()!r}")
            check_file("stream.sock", 0o640, OWNER)
            check_file(DGRAM_PATH, 0o600)
            check_file(LEFTOVER_PATH, 0o751)
        if n % 100 == 0:
            print(f"it={n} digest={digest.hexdigest()[:16]}", flush=True)
        time.sleep(0.001)


for path in ("stream.sock", DGRAM_PATH, S2_PATH, LEFTOVER_PATH):
    if os.path.exists(path):
        os.unlink(path)
listeners = {STREAM: socket.socket(socket.AF_UNIX, STREAM),
             SEQ: socket.socket(socket.AF_UNIX, SEQ)}
listeners[STREAM].bind("stream.sock")
os.chmod("stream.sock", 0o640)
os.chown("stream.sock", *OWNER)
listeners[SEQ].bind(SEQ_NAME)
for s in listeners.values():
    s.listen(4)
dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
dgram.bind(DGRAM_PATH)
os.chmod(DGRAM_PATH, 0o600)
replies = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
rest_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
rest_listener.bind(LEFTOVER_NAME)
rest_listener.listen(1)
if os.fork() == 0:
    for s in list(listeners.values()) + [dgram, replies, rest_listener]:
        s.close()
    client()
conn, _ = rest_listener.accept()          # kept listening, with nothing more to accept
conn.sendall(leftover())
conn.close()
print(f"start pid={os.getpid()}", flush=True)
serve(listeners, dgram, replies)
