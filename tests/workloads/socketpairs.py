"""socketpairs: a parent and its child talk over three unix socket pairs (stream, datagram,
seqpacket). Every turn the parent sends a numbered message on each, keeping three turns in
flight so that messages are always queued; the child answers each with a digest of it. The
parent checks every answer (a lost, duplicated, reordered or cut message prints BAD). Prints
"start pid=N", then "it=N digest=<hex>" every 100 turns, the same in every run."""
import ctypes
import hashlib
import os
import socket
import struct
import time

KINDS = (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET)
pairs = [socket.socketpair(socket.AF_UNIX, k) for k in KINDS]


def message(n: int, k: int) -> bytes:
    body = hashlib.sha256(b"%d/%d" % (n, k)).digest() * (1 + n % 7)
    return struct.pack("=II", n, len(body)) + body


def recv_message(s: socket.socket, kind: int) -> bytes:
    if kind != socket.SOCK_STREAM:
        return s.recv(1 << 16)
    head = b""
    while len(head) < 8:
        head += s.recv(8 - len(head))
    n, size = struct.unpack("=II", head)
    body = b""
    while len(body) < size:
        body += s.recv(size - len(body))
    return head + body


def answer(msg: bytes) -> bytes:
    return struct.pack("=I", 32) + msg[:4] + hashlib.sha256(msg).digest()     # 40 bytes


pid = os.fork()
if pid == 0:
    ctypes.CDLL(None).prctl(1, 9)            # PR_SET_PDEATHSIG, SIGKILL
    mine = [b for _, b in pairs]
    while True:
        for s, kind in zip(mine, KINDS):
            msg = recv_message(s, kind)
            reply = answer(msg)
            s.sendall(reply) if kind == socket.SOCK_STREAM else s.send(reply)
mine = [a for a, _ in pairs]
print(f"start pid={os.getpid()}", flush=True)
AHEAD = 3
digest = hashlib.sha256()
for n in range(AHEAD):
    for k, s in enumerate(mine):
        s.sendall(message(n, k))
n = 0
while True:
    for s, kind in zip(mine, KINDS):
        if kind == socket.SOCK_STREAM:
            got = b""
            while len(got) < 40:
                got += s.recv(40 - len(got))
        else:
            got = s.recv(1 << 16)
        want = answer(message(n, KINDS.index(kind)))
        if got != want:
            print(f"BAD answer {n} on {kind}: {got[:12].hex()} != {want[:12].hex()}", flush=True)
        digest.update(got)
        s.sendall(message(n + AHEAD, KINDS.index(kind)))
    n += 1
    if n % 100 == 0:
        print(f"it={n} digest={digest.hexdigest()[:16]}", flush=True)
    time.sleep(0.001)
