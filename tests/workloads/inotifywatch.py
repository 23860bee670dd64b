"""inotifywatch DIR: two inotify instances whose wds have gaps (watches added and removed):
instance A watches DIR/a (wd 1, modify), DIR/b (wd 3, attrib) and DIR/sub (wd 4, create and
delete); instance B watches DIR itself (wd 10, create and delete). Every turn it writes to a,
chmods b, creates and deletes sub/fN and DIR/t, then reads both instances until it has seen
each event this turn causes, with the wd and name it expects; any other event prints BAD.

Events queued but not read when the process is frozen are not carried through images: a turn
whose events do not all arrive within 2 s is done again once ("LOST turn N", not compared) and
must then complete, or it prints BAD. Prints "start pid=N", then "it=N digest=<hex>" every 100
turns, the same in every run."""
import ctypes
import hashlib
import os
import select
import struct
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
IN_MODIFY, IN_ATTRIB, IN_CREATE, IN_DELETE, IN_IGNORED = 0x2, 0x4, 0x100, 0x200, 0x8000
EVENT = struct.Struct("=iIII")            # wd, mask, cookie, len; then the name


def add(fd: int, path: str, mask: int) -> int:
    wd = libc.inotify_add_watch(fd, os.fsencode(path), mask)
    if wd < 0:
        raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
    return wd


def events(fd: int) -> list[tuple[int, int, str]]:
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        return []
    out, off = [], 0
    while off < len(data):
        wd, mask, _, n = EVENT.unpack_from(data, off)
        name = data[off + EVENT.size:off + EVENT.size + n].rstrip(b"\0").decode()
        out.append((wd, mask, name))
        off += EVENT.size + n
    return out


d = sys.argv[1]
a, b, sub, spare = (os.path.join(d, n) for n in ("a", "b", "sub", "spare"))
open(a, "w").close()
open(b, "w").close()
open(spare, "w").close()
os.mkdir(sub)
ia = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
ib = libc.inotify_init1(os.O_NONBLOCK)
wds = {"a": add(ia, a, IN_MODIFY)}
libc.inotify_rm_watch(ia, add(ia, spare, IN_ATTRIB))              # wd 2 is gone: a gap
wds["b"] = add(ia, b, IN_ATTRIB)
wds["sub"] = add(ia, sub, IN_CREATE | IN_DELETE)
for _ in range(9):
    libc.inotify_rm_watch(ib, add(ib, spare, IN_ATTRIB))
wds["dir"] = add(ib, d, IN_CREATE | IN_DELETE)
if wds != {"a": 1, "b": 3, "sub": 4, "dir": 10}:
    raise SystemExit(f"BAD unexpected wds {wds}")
time.sleep(0.05)
while events(ia) or events(ib):          # the IN_IGNORED of the removed watches
    pass
poller = select.poll()
poller.register(ia, select.POLLIN)
poller.register(ib, select.POLLIN)
print(f"start pid={os.getpid()}", flush=True)


def act(n: int) -> None:
    with open(a, "a") as f:
        f.write("x")
    os.chmod(b, 0o600 if n % 2 else 0o644)
    name = os.path.join(sub, f"f{n}")
    open(name, "w").close()
    os.unlink(name)
    t = os.path.join(d, "t")
    open(t, "w").close()
    os.unlink(t)


def expected(n: int) -> dict[int, set[tuple[int, int, str]]]:
    return {ia: {(1, IN_MODIFY, ""), (3, IN_ATTRIB, ""), (4, IN_CREATE, f"f{n}"),
                 (4, IN_DELETE, f"f{n}")},
            ib: {(10, IN_CREATE, "t"), (10, IN_DELETE, "t")}}


digest = hashlib.sha256()
n = 0
while True:
    n += 1
    want = expected(n)
    seen: dict[int, set] = {ia: set(), ib: set()}
    act(n)
    tries, deadline = 1, time.monotonic() + 2
    while any(seen[fd] != want[fd] for fd in want):
        if time.monotonic() > deadline:
            if tries == 2:
                print(f"BAD turn {n}: saw {seen}, wanted {want}", flush=True)
                break
            print(f"LOST turn {n}: saw {seen}", flush=True)
            tries += 1
            act(n)
            deadline = time.monotonic() + 2
        poller.poll(100)
        for fd in want:
            for ev in events(fd):
                if ev not in want[fd]:
                    print(f"BAD turn {n}: unexpected event {ev} on instance "
                          f"{'A' if fd == ia else 'B'}", flush=True)
                seen[fd].add(ev)
    if tries > 1:                          # what the second round doubled
        time.sleep(0.05)
        for fd in want:
            for ev in events(fd):
                if ev not in want[fd]:
                    print(f"BAD turn {n}: unexpected event {ev}", flush=True)
    for fd in want:
        digest.update(repr(sorted(want[fd])).encode())
    if n % 100 == 0:
        print(f"it={n} digest={digest.hexdigest()[:16]}", flush=True)
    time.sleep(0.001)
