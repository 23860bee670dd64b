"""unixstates DIR [--own-netns]: unix sockets held in states that a busy program passes through only for an
instant, set up once and checked on SIGUSR1 (after a migration): prints "checked" and a BAD
line for each difference. Prints "start pid=N" and "it=N ok" every 100 turns meanwhile.

  - unconnected sockets: a stream one unbound, a seqpacket one bound to an abstract name;
  - two datagram sockets bound (a path, an abstract name) and connected to each other, with
    datagrams queued both ways, one of them empty;
  - a half-closed connection: the client sent a request and shut down writing, the server
    has read nothing yet;
  - a stream socketpair whose reader uses SO_PEEK_OFF (its offset is 4);
  - a datagram socket with SO_PASSCRED and a send buffer of its own, holding a datagram
    from a sender (bound to an abstract name) that has closed since;
  - a seqpacket socketpair with an empty record queued before another;
  - a stream socketpair with 600 KB queued, more than a default send buffer holds.
--own-netns: as in unixsockets.py."""
import ctypes
import hashlib
import os
import signal
import socket
import sys
import time

DIR = os.path.abspath(sys.argv[1])
if "--own-netns" in sys.argv:
    if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:     # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
TAG = b"\0prerestore-test-" + hashlib.sha256(DIR.encode()).hexdigest()[:12].encode()
A_PATH = os.path.join(DIR, "a.sock")
B_NAME, LONELY, HALF, R_NAME, GONE = (TAG + x for x in (b"-b", b"-lonely", b"-half", b"-r",
                                                        b"-gone-sender"))
BIG = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(600 * 1024 // 32))
SO_PEEK_OFF = 42
if os.path.exists(A_PATH):
    os.unlink(A_PATH)

u_stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
u_seq = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
u_seq.bind(LONELY)
a = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
a.bind(A_PATH)
b = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
b.bind(B_NAME)
a.connect(B_NAME)
b.connect(A_PATH)
a.send(b"to b")
a.send(b"")
b.send(b"to a")
half_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
half_listener.bind(HALF)
half_listener.listen(1)
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.connect(HALF)
server, _ = half_listener.accept()
client.sendall(b"request")
client.shutdown(socket.SHUT_WR)
p, q = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
p.sendall(b"0123456789")
q.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
q.recv(4, socket.MSG_PEEK)
r = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
r.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
r.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 50000)
r.bind(R_NAME)
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
    gone.bind(GONE)
    gone.sendto(b"from a closed sender", R_NAME)
x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
x.send(b"")
x.send(b"after the empty one")
i, j = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
i.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
i.setblocking(False)
i.sendall(BIG)
i.setblocking(True)

check = []
signal.signal(signal.SIGUSR1, lambda *_: check.append(1))


def expect(what: str, got, want) -> None:
    if got != want:
        print(f"BAD {what}: {got!r:.80}, expected {want!r:.80}", flush=True)


def verify() -> None:
    expect("unbound stream name", u_stream.getsockname(), "")
    expect("seqpacket name", u_seq.getsockname(), LONELY)
    expect("a's peer", a.getpeername(), B_NAME)
    expect("b's peer", b.getpeername(), A_PATH)
    expect("datagram to b", b.recvfrom(100), (b"to b", A_PATH))
    expect("empty datagram to b", b.recvfrom(100), (b"", A_PATH))
    expect("datagram to a", a.recvfrom(100), (b"to a", B_NAME))
    a.send(b"again")
    expect("new datagram to b", b.recv(100), b"again")
    expect("half-closed request", server.recv(100), b"request")
    expect("half-closed end", server.recv(100), b"")
    server.sendall(b"reply")
    expect("reply to the half-closed client", client.recv(100), b"reply")
    try:
        client.send(b"more")
        print("BAD a client that shut down writing could write", flush=True)
    except BrokenPipeError:
        pass
    expect("peek offset", q.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF), 4)
    expect("peek at the offset", q.recv(3, socket.MSG_PEEK), b"456")
    expect("passcred", r.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED), 1)
    expect("send buffer", r.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), 100000)
    expect("datagram from a closed sender", r.recvfrom(100), (b"from a closed sender", GONE))
    expect("empty record", y.recv(100), b"")
    expect("record after it", y.recv(100), b"after the empty one")
    got = b""
    while len(got) < len(BIG):
        got += j.recv(1 << 16)
    expect("600 KB queued", hashlib.sha256(got).hexdigest(), hashlib.sha256(BIG).hexdigest())
    print("checked", flush=True)


print(f"start pid={os.getpid()}", flush=True)
n = 0
while True:
    if check:
        check.clear()
        verify()
    n += 1
    if n % 100 == 0:
        print(f"it={n} ok", flush=True)
    time.sleep(0.001)
