"""reaper: a child subreaper (PR_SET_CHILD_SUBREAPER) that keeps making orphans: every 100 turns
a child forks a grandchild and exits at once; the grandchild, reparented to the root (not to
pid 1) because the root is a subreaper, reports its getppid() over a pipe and exits; the root
reaps both. After a migration the orphans made from then on prove the restored root is still a
subreaper. Prints "start pid=N", then "it=N orphans=K parents=ok" every 100 turns ("BAD ..." on
a wrong parent or a lost subreaper flag)."""
import ctypes
import os
import time

libc = ctypes.CDLL(None, use_errno=True)
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
root = os.getpid()
print(f"start pid={root}", flush=True)


def is_subreaper() -> bool:
    flag = ctypes.c_int(0)
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
    return flag.value == 1


n = orphans = 0
while True:
    n += 1
    if n % 100 == 0:
        r, w = os.pipe()
        kid = os.fork()
        if kid == 0:
            if os.fork() == 0:                        # the grandchild
                while os.getppid() != root and os.getppid() != 1:
                    time.sleep(0.001)                 # until its parent is gone
                os.write(w, b"%d" % os.getppid())
                os._exit(0)
            os._exit(0)
        os.close(w)
        os.waitpid(kid, 0)
        ppid = int(os.read(r, 32) or b"0")
        os.close(r)
        os.waitpid(-1, 0)                             # the orphan, now ours
        orphans += 1
        ok = ppid == root and is_subreaper()
        if not ok:
            print(f"BAD orphan parent {ppid} (root {root}), subreaper {is_subreaper()}",
                  flush=True)
        print(f"it={n} orphans={orphans} parents={'ok' if ok else 'BAD'}", flush=True)
    time.sleep(0.001)
