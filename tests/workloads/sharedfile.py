"""sharedfile: a parent and a child take turns (a token passed over two pipes) appending a
numbered line to one file through the fd they share since the fork, without O_APPEND: only the
shared offset of the one open file description keeps their lines from overwriting each other.
Also fd 4 is a dup of fd 3 in the parent (same description again).
Usage: sharedfile.py PATH. Prints "start pid=N", then "it=N" every 100 turns."""
import os
import sys
import time

path = sys.argv[1]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
to_child_r, to_child_w = os.pipe()
to_parent_r, to_parent_w = os.pipe()
pid = os.fork()
if pid == 0:
    import ctypes
    ctypes.CDLL(None).prctl(1, 9)          # PR_SET_PDEATHSIG, SIGKILL
    while True:
        n = int(os.read(to_child_r, 16))
        os.write(3, b"C%d\n" % n)
        os.write(to_parent_w, b"%d" % n)
os.dup2(3, 4)
print(f"start pid={os.getpid()}", flush=True)
n = 0
while True:
    os.write(4 if n % 2 else 3, b"P%d\n" % n)
    os.write(to_child_w, b"%d" % n)
    assert int(os.read(to_parent_r, 16)) == n
    n += 1
    if n % 100 == 0:
        print(f"it={n} turns", flush=True)
    time.sleep(0.001)
