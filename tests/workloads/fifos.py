"""fifos DIR: a parent and its child talk over named FIFOs made in DIR, always with messages
queued in them. The parent sends numbered messages on "down" (opened write-only; the child
reads it), keeping three turns ahead, and the child answers each with a digest of it on "up"
(the parent opened it read-only, the child write-only). The parent also keeps numbered records
queued in two FIFOs it reads back itself: "loop" (opened read-write, inherited by the child, who
also holds an open file description of its own on it, read-only and unused) and one it deleted
while open. Any lost, duplicated, reordered or cut message or record prints BAD. Prints
"start pid=N", then "it=N digest=<hex>" every 100 turns, the same in every run."""
import ctypes
import hashlib
import os
import struct
import sys
import time

d = sys.argv[1]
down, up, loop, gone = (os.path.join(d, n) for n in ("down", "up", "loop", "gone"))
for path in (down, up, loop, gone):
    os.mkfifo(path, 0o640)
loop_fd = os.open(loop, os.O_RDWR)
gone_fd = os.open(gone, os.O_RDWR | os.O_NONBLOCK)
os.unlink(gone)
up_r = os.open(up, os.O_RDONLY | os.O_NONBLOCK)        # a reader before the child writes
os.set_blocking(up_r, True)

AHEAD = 3


def message(n: int) -> bytes:
    body = hashlib.sha256(b"%d" % n).digest() * (1 + n % 5)
    return struct.pack("=II", n, len(body)) + body


def record(n: int, tag: bytes) -> bytes:
    return struct.pack("=I", n) + hashlib.sha256(tag + b"%d" % n).digest()[:12]     # 16 bytes


def read_exactly(fd: int, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = os.read(fd, n - len(got))
        if not chunk:
            raise SystemExit(f"BAD end of file after {len(got)} of {n} bytes")
        got += chunk
    return got


pid = os.fork()
if pid == 0:
    ctypes.CDLL(None).prctl(1, 9)            # PR_SET_PDEATHSIG, SIGKILL
    os.close(up_r)
    held = os.open(loop, os.O_RDONLY | os.O_NONBLOCK)     # an open file description of its own
    wr = os.open(up, os.O_WRONLY)          # before "down": the parent waits on that one
    rd = os.open(down, os.O_RDONLY)
    while True:
        head = read_exactly(rd, 8)
        n, size = struct.unpack("=II", head)
        msg = head + read_exactly(rd, size)
        os.write(wr, struct.pack("=I", n) + hashlib.sha256(msg).digest())      # 36 bytes

wr = os.open(down, os.O_WRONLY)
print(f"start pid={os.getpid()}", flush=True)
digest = hashlib.sha256()
for n in range(AHEAD):
    os.write(wr, message(n))
    os.write(loop_fd, record(n, b"loop"))
    os.write(gone_fd, record(n, b"gone"))
n = 0
while True:
    got = read_exactly(up_r, 36)
    want = struct.pack("=I", n) + hashlib.sha256(message(n)).digest()
    if got != want:
        print(f"BAD answer {n}: {got[:8].hex()} != {want[:8].hex()}", flush=True)
    for fd, tag in ((loop_fd, b"loop"), (gone_fd, b"gone")):
        rec = os.read(fd, 16)
        if rec != record(n, tag):
            print(f"BAD {tag.decode()} record {n}: {rec.hex()} != {record(n, tag).hex()}",
                  flush=True)
        digest.update(rec)
        os.write(fd, record(n + AHEAD, tag))
    digest.update(got)
    os.write(wr, message(n + AHEAD))
    n += 1
    if n % 100 == 0:
        print(f"it={n} digest={digest.hexdigest()[:16]}", flush=True)
    time.sleep(0.001)
