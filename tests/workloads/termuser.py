"""termuser MODE [PATH]: a process using a terminal, for the tests of what cannot move.
  fd PATH    writes "tick N" lines to the terminal at PATH (opened O_NOCTTY: not its
             controlling terminal);
  ctty PATH  the same, the terminal being its controlling terminal (it leads its session);
  master     opens a pty pair of its own and prints "slave /dev/pts/N" (then holds it).
Prints "start pid=N" and "it=N" every 100 turns (the same in every run)."""
import os
import sys
import time

mode = sys.argv[1]
term = None
if mode == "master":
    master, slave = os.openpty()
    print(f"slave {os.ttyname(slave)}", flush=True)
else:
    # (a terminal opened write-only never becomes the controlling terminal)
    term = os.open(sys.argv[2], os.O_WRONLY | os.O_NOCTTY if mode == "fd" else os.O_RDWR)
print(f"start pid={os.getpid()}", flush=True)
n = 0
while True:
    n += 1
    if n % 100 == 0:
        if term is not None:
            os.write(term, b"tick %d\n" % n)
        print(f"it={n} turns={n}", flush=True)
    time.sleep(0.001)
