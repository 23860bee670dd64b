"""leaving reaped|zombie: a parent whose child (and the child's own child) may be killed at
any moment, as a test does between a round and its staging. The parent keeps a 4 MiB buffer
it writes a little of every turn and prints "it=N sum=S" every 100 turns (N and S depend only
on N, child or no child). reaped: the parent ignores SIGCHLD, so a killed child is gone at
once; zombie: it never reaps, so a killed child stays a zombie. Child and grandchild leave when
their parent does (each checks getppid every turn): nothing of the tree is left outside it."""
import hashlib
import os
import signal
import sys
import time

mode = sys.argv[1]
if mode == "reaped":
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)


def sub_tree() -> None:
    me, parent = os.getpid(), os.getppid()
    if os.fork() == 0:
        junk = bytearray(1 << 20)
        n = 0
        while os.getppid() == me:
            junk[n % len(junk)] = n & 0xFF
            n += 1
            time.sleep(0.002)
        os._exit(0)
    junk = bytearray(1 << 20)
    n = 0
    while os.getppid() == parent:
        junk[n % len(junk)] = n & 0xFF
        n += 1
        time.sleep(0.002)
    os._exit(0)


if os.fork() == 0:
    sub_tree()
buf = bytearray(4 << 20)
print(f"start pid={os.getpid()}", flush=True)
n = 0
while True:
    n += 1
    buf[(n * 4099) % len(buf)] = n & 0xFF
    if n % 100 == 0:
        print(f"it={n} sum={hashlib.sha1(buf).hexdigest()[:16]}", flush=True)
    time.sleep(0.002)
