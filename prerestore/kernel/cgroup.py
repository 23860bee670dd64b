"""The gate a restored tree is let go through: a cgroup v2 of its own, frozen while its
processes are detached one by one, then thawed with one write.

Why: a tree is let go process by process. If the restoring daemon dies halfway (kill -9, OOM),
the processes it still traces die with it (PTRACE_O_EXITKILL) while those already detached run
on: half a tree, beside a source that must then be resumed. In a frozen cgroup a detached
process stays frozen (the freezer traps it before it returns to user space), and writing 0 to
cgroup.freeze thaws every process of the cgroup in one system call: the commit point of a
restore. Whoever survives the daemon reads it from the gate: frozen, the copy never ran
(cgroup.kill ends it); thawed, it runs (its processes go back to the daemon's cgroup and the
gate is removed). Unlike SIGSTOP/SIGCONT, the freezer sends the tree's parents no SIGCHLD.

Only cgroup v2 has a freezer with these semantics; without a cgroup2 mount (or where we may
not make a cgroup) there is no gate, and a tree is let go as before (gate_path() is None)."""
from __future__ import annotations

import errno
import os
import time

from ..errors import ProcessGone
from . import procfs

GATE_PREFIX = "prerestore-gate-"


def _v2_mount() -> str | None:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[sep + 1] == "cgroup2":
                    return fields[4]
    except (OSError, ValueError, IndexError):
        pass
    return None


def own_cgroup() -> str | None:
    """The directory of our own cgroup v2, or None."""
    mount = _v2_mount()
    if mount is None:
        return None
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((line.rstrip("\n")[3:] for line in f if line.startswith("0::")), None)
    except OSError:
        return None
    if rel is None or rel.endswith(" (deleted)"):
        return None
    path = os.path.join(mount, rel.lstrip("/"))
    return path if os.path.isfile(os.path.join(path, "cgroup.procs")) else None


def gate_path() -> str | None:
    """Where this process makes its gate: a child of its own cgroup."""
    parent = own_cgroup()
    return os.path.join(parent, f"{GATE_PREFIX}{os.getpid()}") if parent else None


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class Gate:
    """One gate, by its directory. Every method may be called by another process than the
    one that made it (migrate and recover settle what a dead daemon left)."""

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def make(cls, path: str | None) -> "Gate | None":
        """Make the gate, frozen and empty; None where no cgroup can be made."""
        if not path:
            return None
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass                   # a gate of a dead daemon with our pid: reused, emptied
        except OSError:
            return None
        gate = cls(path)
        try:
            _write(os.path.join(path, "cgroup.freeze"), "1")
        except OSError:
            gate.remove()
            return None
        return gate

    def close_behind(self, pids: list[int]) -> None:
        """Move these processes (every thread of each) into the frozen gate: once let go by
        their tracer, they stay frozen until open(). A zombie cannot move, nor needs to."""
        for pid in pids:
            try:
                _write(os.path.join(self.path, "cgroup.procs"), str(pid))
            except OSError as e:
                if e.errno != errno.ESRCH and not _zombie(pid):
                    raise

    def state(self) -> str | None:
        """"frozen" (not committed), "open" (committed: the tree runs) or None (no gate)."""
        try:
            with open(os.path.join(self.path, "cgroup.freeze")) as f:
                return "frozen" if f.read().strip() == "1" else "open"
        except FileNotFoundError:
            return None

    def open(self) -> None:
        """The commit: every process in the gate runs, all at once."""
        _write(os.path.join(self.path, "cgroup.freeze"), "0")

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except FileNotFoundError:
            return []

    def leave(self, timeout: float = 5.0) -> None:
        """After open(): every process (and any it forked meanwhile) back to the cgroup the
        gate was made in, then the gate removed."""
        parent = os.path.join(os.path.dirname(self.path), "cgroup.procs")
        deadline = time.monotonic() + timeout
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    _write(parent, str(pid))
                except OSError as e:
                    if e.errno != errno.ESRCH:
                        raise
        self.remove()

    def destroy(self, timeout: float = 5.0) -> None:
        """Before open(): kill everything in the gate, then remove it."""
        if self.state() is None:
            return
        try:
            _write(os.path.join(self.path, "cgroup.kill"), "1")
        except FileNotFoundError:
            return
        self.remove(timeout)

    def remove(self, timeout: float = 5.0) -> None:
        """rmdir, once the processes killed or moved out are gone from it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)


def _zombie(pid: int) -> bool:
    try:
        return procfs.stat_fields(pid)[3] in ("Z", "X")
    except ProcessGone:
        return True
