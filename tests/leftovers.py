"""Every process a test started (workloads, restored trees, namespace inits) and every process
seen below one of them is recorded; at the end of the test whatever of them still runs or is
stopped is a process left behind: it is killed (by pid, so that later tests are not affected)
and the test fails naming it (tests/conftest.py, no_process_left_behind).

A process is recorded with its start time, so that a pid reused by someone else's process is
never taken for ours. Descendants are recorded whenever a process is registered and at the
end, so that children orphaned in between (their parent killed by the test) are still known;
the members of a session or group that a recorded process leads (a child that called setsid()
and forked) count as its descendants."""
from __future__ import annotations

import os
import signal
import time

_roots: dict[int, int] = {}      # pid -> start time: processes the test started or restored
_seen: dict[int, int] = {}       # pid -> start time: those and every descendant seen


def _stat(pid: int) -> tuple[str, int, int, int, int] | None:
    """(state, ppid, pgid, sid, start time) of pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])


def _same(pid: int, start: int) -> tuple[str, int, int, int, int] | None:
    st = _stat(pid)
    return st if st and st[4] == start else None


def _children(pid: int) -> list[int]:
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def reset() -> None:
    _roots.clear()
    _seen.clear()


def watch(pid: int) -> None:
    """pid was started (or restored) by the test: it and its descendants are its own."""
    st = _stat(pid)
    if st is None:
        return
    _roots.setdefault(pid, st[4])
    snapshot()


def snapshot() -> None:
    """Record the descendants every recorded live process has now."""
    todo = [pid for pid, start in list(_seen.items()) + list(_roots.items()) if _same(pid, start)]
    while todo:
        pid = todo.pop()
        st = _stat(pid)
        if st is None:
            continue
        if _seen.setdefault(pid, st[4]) != st[4]:
            continue                     # a reused pid: not ours
        todo += [c for c in _children(pid) if c not in _seen]


def _led_by(leaders: set[int]) -> set[int]:
    """Processes in a session or process group led by one of leaders (our live processes)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st and (st[2] in leaders or st[3] in leaders):
                out.add(int(entry))
    return out


def left_behind(grace: float = 2.0) -> list[str]:
    """The recorded processes still running or stopped (not zombies), each killed; a
    running one gets `grace` seconds to end on its own first (a child that leaves when it
    sees its parent gone), a stopped one never ends on its own. Returns their descriptions."""
    snapshot()
    deadline = time.monotonic() + grace
    while True:
        live = {pid for pid, start in _seen.items()
                if (st := _same(pid, start)) and st[0] not in ("Z", "X")}
        live |= {pid for pid in _led_by(live) if (st := _stat(pid)) and st[0] not in "ZX"}
        if all(_stat(p) is None or _stat(p)[0] in "tT" for p in live) or \
                time.monotonic() > deadline:
            break
        time.sleep(0.02)
        snapshot()
    out = []
    for pid in sorted(live):
        st = _stat(pid)
        if st is None or st[0] in "ZX":
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = "?"
        out.append(f"pid {pid} state {st[0]} ppid {st[1]} pgid {st[2]} sid {st[3]}: {cmd}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in live:
        end = time.monotonic() + 5
        while (st := _stat(pid)) and st[0] not in "ZX" and time.monotonic() < end:
            time.sleep(0.01)
        try:
            os.waitpid(pid, os.WNOHANG)          # ours to reap, if it is our child
        except ChildProcessError:
            pass
    return out
