"""The gate a restored tree is let go through: a cgroup v2 of its own, made when its first
husk is, frozen while its processes are detached one by one, then committed and thawed.

Why: a tree is let go process by process. If the restoring daemon dies halfway (kill -9, OOM),
the processes it still traces die with it (PTRACE_O_EXITKILL) while those already detached run
on: half a tree, beside a source that must then be resumed. In a frozen cgroup a detached
process stays frozen (the freezer traps it before it returns to user space), and thawing the
cgroup lets every process of it run in one system call.

The husks are born in the gate (CLONE_INTO_CGROUP, and every process forked from them follows):
moving a process between cgroups costs milliseconds, never paid inside the downtime. The gate
is thawed while the rounds are staged (a frozen husk could run no injected call). At the final
step: freeze (every traced husk counts as frozen at once), let each process go, then *commit*
by one write that marks the gate (cgroup v2 has no rename; its cgroup.max.descendants, which
nothing else sets here, goes from "max" to COMMITTED), then thaw. That write is the commit
point, and whoever outlives the daemon reads it: a marked gate holds a tree that was let go
whole (thawed now if it is not yet); an unmarked one a tree that never ran (cgroup.kill). After the
commit its processes go back to the daemon's cgroup and the gate is removed. Unlike
SIGSTOP/SIGCONT, the freezer sends the tree's parents no SIGCHLD.

Only cgroup v2 has a freezer with these semantics; without a cgroup2 mount (or where we may
not make a cgroup) there is no gate, and a tree is let go as before (gate_path() is None)."""
from __future__ import annotations

import errno
import json
import os
import time

from ..errors import ProcessGone, RestoreError
from . import procfs, tcp

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


def gate_path(pid: int | None = None) -> str | None:
    """Where process pid (default: this one; a process of our pid namespace), in our own
    cgroup, makes its gate: a child of that cgroup, named by the pid and the pid namespace
    it is a pid of."""
    parent = own_cgroup()
    return os.path.join(parent, f"{GATE_PREFIX}{pid or os.getpid()}-{_pidns()}") \
        if parent else None


def _pidns() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def _orphaned(path: str) -> bool:
    """Is the gate at path one whose restorer is dead? Only a gate of our own pid namespace
    can tell (cgroups are seen from every namespace; a pid of another one means nothing here:
    restorers in two containers, or a test run in a pid namespace of its own beside others,
    must not settle each other's gates): its name says which (a name without one is taken as
    ours), and so does its maker's note (_maker_dead), which also tells a pid reused since."""
    pid, _, ns = os.path.basename(path)[len(GATE_PREFIX):].partition("-")
    if not pid.isdigit() or (ns and ns != str(_pidns())):
        return False
    return _maker_dead(path, int(pid))


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class Gate:
    """One gate, by the directory it is made as. Every method may be called by another process
    than the one that made it (migrate and recover settle what a dead daemon left)."""

    COMMITTED = "2147483646"     # cgroup.max.descendants, INT_MAX - 1 ("max" until then)

    def __init__(self, path: str):
        self.path = path
        self._fds: dict[str, int] = {}
        self.misplaced: list[str] = []     # processes leave() could not put where they go

    def prepare(self) -> None:
        """Open the files the final step writes, now (opening a cgroup file costs ~30 us,
        and the final step writes three: freeze, mark, thaw)."""
        for name in ("cgroup.freeze", "cgroup.max.descendants"):
            if name not in self._fds:
                self._fds[name] = os.open(os.path.join(self.path, name),
                                          os.O_WRONLY | os.O_CLOEXEC)

    def _set(self, name: str, text: str) -> None:
        fd = self._fds.get(name)
        if fd is None:
            _write(os.path.join(self.path, name), text)
        else:
            os.write(fd, text.encode())

    def forget(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    @classmethod
    def make(cls, path: str | None) -> "Gate | None":
        """Make the gate, thawed and empty; None where no cgroup can be made. Gates that
        daemons killed earlier left empty beside it are removed first."""
        if not path:
            return None
        sweep(os.path.dirname(path))
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass                   # a gate of a dead daemon with our pid: reused
        except OSError:
            return None
        try:
            os.setxattr(path, MAKER, _identity(os.getpid()).encode())
        except OSError:
            pass                   # judged by the pid in its name alone, as before
        return cls(path)

    def fd(self) -> int:
        """An fd of its directory, for clone3(CLONE_INTO_CGROUP)."""
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def state(self) -> str | None:
        """"open" (committed: the tree was let go whole), "closed" (not committed: staging,
        or letting go, or frozen) or None (no gate)."""
        try:
            with open(os.path.join(self.path, "cgroup.max.descendants")) as f:
                return "open" if f.read().strip() == self.COMMITTED else "closed"
        except FileNotFoundError:
            return None

    def close(self) -> None:
        """Before letting the tree go: frozen from here, what is let go stays frozen."""
        self._set("cgroup.freeze", "1")

    def open(self) -> None:
        """The commit (the mark), then every process in the gate runs, all at once. Also
        finishes a commit that a dead daemon left frozen."""
        self.commit()
        self.thaw()

    def commit(self) -> None:
        """The mark alone: from here the tree is to run (whoever outlives us thaws it)."""
        self._set("cgroup.max.descendants", self.COMMITTED)

    def thaw(self) -> None:
        self._set("cgroup.freeze", "0")

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except FileNotFoundError:
            return []

    DESTINATIONS = "trusted.prerestore.cgroups"    # an xattr of the gate's directory

    def note_destinations(self, where: dict[int, str]) -> None:
        """Write down on the gate where each of its processes goes when it leaves (by host
        pid): whoever settles the gate of a restorer that died reads it (leave)."""
        os.setxattr(self.path, self.DESTINATIONS, json.dumps(where).encode())

    def destinations(self) -> dict[int, str]:
        try:
            return {int(k): v for k, v in json.loads(os.getxattr(self.path,
                                                                 self.DESTINATIONS)).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def leave(self, timeout: float = 5.0, where: dict[int, str] | None = None) -> None:
        """After open(): every process (and any it forked meanwhile) out of the gate, then the
        gate removed. where: the cgroup directory each process goes to, by host pid (the
        cgroup its source was in: see place(); default: what note_destinations wrote); a
        process not listed (forked since the thaw, or no cgroup carried) goes where its
        parent goes, else back to the cgroup the gate was made in."""
        home = os.path.dirname(self.path)
        where = dict(where) if where is not None else self.destinations()
        deadline = time.monotonic() + timeout
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                to = where.get(pid)
                if to is None:
                    try:
                        to = where.get(int(procfs.stat_fields(pid)[4]), home)
                    except ProcessGone:
                        continue
                    where[pid] = to
                try:
                    _write(os.path.join(to, "cgroup.procs"), str(pid))
                except OSError as e:
                    if e.errno == errno.ESRCH:
                        continue
                    if to == home:
                        raise
                    # its cgroup went away (or refuses it): it runs all the same, in ours;
                    # said (self.misplaced), never a reason to leave the gate unsettled
                    self.misplaced.append(f"pid {pid}: not moved into {to} ({e.strerror})")
                    where[pid] = home
        self.remove()

    def destroy(self, timeout: float = 5.0) -> None:
        """Not committed: kill everything in the gate, then remove it. Its TCP connections are
        put in repair mode first (tcp.silence_held): they may have been made live already
        (between letting the tree go and the commit), and the peer must not get a FIN or a
        reset from a copy that never ran: the source resumes with these connections."""
        if self.state() is None:
            return
        tcp.silence_held(self.pids())
        try:
            _write(os.path.join(self.path, "cgroup.kill"), "1")
        except FileNotFoundError:
            return
        self.remove(timeout)

    def remove(self, timeout: float = 5.0) -> None:
        """rmdir, once the processes killed or moved out are gone from it."""
        self.forget()
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


def sweep(parent: str | None = None) -> list[str]:
    """Settle the gates of dead restorers (their pid is in the name: _orphaned) under parent (default:
    our own cgroup, where the daemons we start make theirs): see settle_orphan. Returns what
    was done, one line per gate that held processes."""
    parent = parent or own_cgroup()
    if parent is None:
        return []
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    done = []
    for name in names:
        if not name.startswith(GATE_PREFIX):
            continue
        if not _orphaned(os.path.join(parent, name)):   # its daemon lives (or not ours)
            continue
        line = settle_orphan(Gate(os.path.join(parent, name)))
        if line:
            done.append(line)
    return done


def settle_orphan(gate: Gate) -> str:
    """A gate whose restorer died (a stage daemon, `restore`, serve's connection process):
    committed, its whole tree runs (thawed if need be, moved out of the gate); not committed,
    nothing of it ever ran, and what is left of it (processes let go, frozen in it) is killed.
    The gate is removed either way. Returns what was done ("" for an empty gate)."""
    state, pids = gate.state(), gate.pids()
    try:
        if state == "open":
            gate.open()
            gate.leave()
            what = f"its tree runs ({len(pids)} processes, thawed and let out of the gate)" + \
                "".join(f"; {m}" for m in gate.misplaced)
        elif state == "closed":
            gate.destroy()
            what = f"its tree never ran: {len(pids)} frozen processes killed"
        else:
            return ""
    except OSError as e:
        return f"{gate.path}: could not be settled: {e}"
    return f"gate {os.path.basename(gate.path)} of a restorer that died: {what}" if pids else ""


def all_orphans() -> list[Gate]:
    """Every gate under the cgroup v2 mount whose restorer is dead (wherever it ran)."""
    mount = _v2_mount()
    out = []
    if mount is None:
        return out
    for top, dirs, _ in os.walk(mount):
        for d in list(dirs):
            if d.startswith(GATE_PREFIX):
                dirs.remove(d)                         # nothing of ours below a gate
                if _orphaned(os.path.join(top, d)):
                    out.append(Gate(os.path.join(top, d)))
    return out


# Who made a gate: its pid namespace, pid and start time (an xattr of the gate). The pid in
# the gate's name is a pid of the maker's namespace: a restorer in another pid namespace
# (a container sharing the cgroup tree) would take a live maker for a dead one, and kill a
# tree being restored, or thaw one that must not run.
MAKER = "trusted.prerestore.maker"


def _identity(pid: int) -> str:
    return f"{os.readlink('/proc/self/ns/pid')} {pid} {procfs.stat_fields(pid)[22]}"


def _maker_dead(path: str, pid: int) -> bool:
    """Is the restorer that made the gate at path dead? A gate made in another pid
    namespace is not ours to judge (a restorer of that namespace settles it)."""
    try:
        ns, maker, start = os.getxattr(path, MAKER).decode().split()
    except (OSError, ValueError):
        return _zombie(pid)                 # a gate made before makers were noted
    if ns != os.readlink("/proc/self/ns/pid"):
        return False
    try:
        return _zombie(int(maker)) or procfs.stat_fields(int(maker))[22] != start
    except ProcessGone:
        return True


def _zombie(pid: int) -> bool:
    try:
        return procfs.stat_fields(pid)[3] in ("Z", "X")
    except ProcessGone:
        return True


# ---- the cgroup a restored process runs in ---------------------------------------------------
# A process's cgroup v2 is carried as a path relative to the cgroup root its migrator sees
# (/proc/PID/cgroup, "0::/path"); the destination puts the restored process in that same
# relative cgroup under its own root (its cgroup2 mount, or `--cgroup-root DIR`), made if
# missing. Only membership is carried: limits (cpu.max, memory.max...) belong to the cgroup,
# not to the process, and are not copied; a cgroup made here has the kernel's defaults and
# the controllers its parent enables for its children (cgroup v2 gives a new child those).


def source_problems(pid: int, rel: str | None, mount: str | None = None) -> list[str]:
    """Source side, before anything is frozen: a process in a threaded cgroup (its threads
    may each be in another cgroup: thread-granular membership is not carried)."""
    mount = mount if mount is not None else _v2_mount()
    if rel is None or mount is None:
        return []
    try:
        with open(os.path.join(mount, rel.lstrip("/"), "cgroup.type")) as f:
            kind = f.read().strip()
    except OSError:
        return []                 # the root (no cgroup.type), or not under our mount
    if kind in ("threaded", "domain threaded"):
        return [f"pid {pid}: its cgroup {rel} is {kind} (thread-granular cgroup membership "
                "is not carried)"]
    return []


def root_dir(given: str | None = None) -> str | None:
    """The directory the source's cgroup root stands for here: `given` (--cgroup-root),
    which must be a cgroup v2 directory, or our cgroup2 mount; None if there is none."""
    if given is None:
        return _v2_mount()
    path = os.path.abspath(given)
    if not os.path.isfile(os.path.join(path, "cgroup.procs")):
        raise RestoreError(f"--cgroup-root {given}: not a cgroup v2 directory (no cgroup.procs)")
    return path


def place(pid: int, rel: str, root: str, made: list[str]) -> str:
    """The directory of the cgroup that the restored process pid goes to: rel (its source's
    cgroup, relative to the source's root) under root, each missing level made (and listed
    in `made`, outermost first, for unmake()). Refused by name if it cannot hold the process:
    a path leaving root, a threaded cgroup, or one that enables controllers for its children
    (cgroup v2 lets only the root hold processes then)."""
    parts = [p for p in rel.split("/") if p]
    if any(p in (".", "..") for p in parts) or rel.endswith(" (deleted)"):
        raise RestoreError(f"pid {pid}: cgroup {rel!r} is not a path under the cgroup root")
    path = root
    for part in parts:
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o755)
            made.append(path)
        except FileExistsError:
            pass
        except OSError as e:
            raise RestoreError(f"pid {pid}: cannot make its cgroup {rel} as {path} ({e.strerror};"
                               " --cgroup-root DIR says under which cgroup to place the tree)"
                               ) from None
    if path == root and os.path.realpath(root) == os.path.realpath(_v2_mount() or ""):
        return path                # the root cgroup: holds processes whatever it enables
    try:
        with open(os.path.join(path, "cgroup.type")) as f:
            kind = f.read().strip()
        with open(os.path.join(path, "cgroup.subtree_control")) as f:
            enabled = f.read().split()
    except OSError as e:
        raise RestoreError(f"pid {pid}: {path} is not a cgroup v2 directory ({e.strerror})"
                           ) from None
    if kind != "domain":
        raise RestoreError(f"pid {pid}: its cgroup {rel} here ({path}) is {kind}: a restored "
                           "process goes into a domain cgroup only")
    if enabled:
        raise RestoreError(f"pid {pid}: its cgroup {rel} here ({path}) enables controllers for "
                           f"its children ({' '.join(enabled)}), so it cannot hold processes "
                           "(--cgroup-root DIR says under which cgroup to place the tree)")
    return path


def unmake(made: list[str]) -> None:
    """Remove the cgroups place() made, innermost first (a restore that failed: it leaves
    no cgroup behind; one still in use is left)."""
    for path in reversed(made):
        try:
            os.rmdir(path)
        except OSError:
            pass
    made.clear()


def move(pid: int, path: str) -> None:
    """Process pid (all its threads) into the cgroup at path."""
    _write(os.path.join(path, "cgroup.procs"), str(pid))
