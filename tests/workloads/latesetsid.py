"""latesetsid GO: a parent and its child; once the file GO exists, the child calls setsid()
(a daemon's classic move) and forks a grandchild, which inherits the child's new session. Each
process checks its own session every turn: the parent leads the first one (started so), the
child is in the parent's until it calls setsid(), then leads its own, and the grandchild is in
the child's. The parent prints "start pid=N", then "it=N" every 100 turns; BAD on a surprise."""
import os
import sys
import time

go = sys.argv[1]
parent = os.getpid()
child = os.fork()
if child == 0:
    me = os.getpid()
    moved = False
    while True:
        if not moved and os.path.exists(go):
            os.setsid()
            moved = True
            if os.fork() == 0:
                while True:
                    if os.getsid(0) != me:
                        print(f"BAD grandchild in session {os.getsid(0)}, not {me}", flush=True)
                    if os.getppid() != me:
                        os._exit(0)
                    time.sleep(0.002)
        want = me if moved else parent
        if os.getsid(0) != want:
            print(f"BAD child in session {os.getsid(0)}, not {want}", flush=True)
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(0.002)
print(f"start pid={parent}", flush=True)
n = 0
while True:
    n += 1
    if os.getsid(0) != parent:
        print(f"BAD parent in session {os.getsid(0)}", flush=True)
    if n % 100 == 0:
        print(f"it={n} ok", flush=True)
    time.sleep(0.002)
