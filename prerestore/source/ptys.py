"""The pseudo-terminals of a process tree, on the source side.

A pty pair is the tree's when its master is held in the tree: it is made anew at the
destination, on one host too (a controlling terminal has to be given to the session leader's
husk before that husk forks the rest of its session, long before the source lets go of its own
pair), with its settings and the bytes queued in it. A terminal whose master is held outside
the tree (the host's terminal, a terminal emulator's) cannot move: a session of the tree that
has one as its controlling terminal is refused, and so is any fd of it in an image for another
host (on one host such an fd is handed over as it is). A session led outside the tree is not
the tree's: its controlling terminal stays with it."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import msgpack

from ..errors import ProcessGone, UnsupportedState
from ..kernel import native, procfs, tty
from ..model import FileDescriptor, ProcessState


@dataclass
class TreePtys:
    """The pty ends the tree's fds hold, by pty number: [(pid, fd)] in tree and fd order."""
    masters: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    slaves: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    devpts: set[int] = field(default_factory=set)     # the devpts instances of those slaves


def tree_ptys(pids: list[int]) -> TreePtys:
    """The pty ends these processes hold, looked up in /proc."""
    found = TreePtys()
    for pid in pids:
        try:
            for fd in procfs.fd_numbers(pid):
                end = procfs.pty_end(pid, fd)
                if end is None:
                    continue
                kind, number = end
                (found.masters if kind == "master" else found.slaves).setdefault(
                    number, []).append((pid, fd))
                if kind == "slave":
                    found.devpts.add(procfs.stat_file(pid, f"fd/{fd}").st_dev)
        except (ProcessGone, FileNotFoundError):
            continue
    return found


def ptys_of_states(states: list[ProcessState]) -> TreePtys:
    """The same, from the fds collected with the tree frozen (no second look at /proc)."""
    found = TreePtys()
    for s in states:
        for f in s.fds:
            if f.kind in ("pty-master", "pty-slave"):
                (found.masters if f.kind == "pty-master" else found.slaves).setdefault(
                    f.dev_inode[1], []).append((s.pid, f.fd))
    return found


def _terminal(tty_nr: int) -> str:
    if os.major(tty_nr) == procfs.PTY_SLAVE_MAJOR:
        return f"/dev/pts/{os.minor(tty_nr)}"
    return f"terminal {os.major(tty_nr)}:{os.minor(tty_nr)}" if tty_nr else "none"


def pty_problems(tasks: list[procfs.TreeTask], same_host: bool,
                 found: TreePtys | None = None) -> list[str]:
    """What about the tree's terminals cannot be carried (see the module's docstring). found:
    the tree's pty ends as collected with the tree frozen; without it they are looked up, and
    so are the processes outside the tree that use a pty of the tree (not on the downtime
    path: that takes a look at every process)."""
    live = [t for t in tasks if not t.zombie]
    by_pid = {t.pid: t for t in tasks}
    outside = found is None
    if found is None:
        found = tree_ptys([t.pid for t in live])
    problems = []
    if len(found.devpts) > 1:
        problems.append("the tree's ptys come from more than one devpts instance (not carried)")
    if not same_host:
        for number, ends in found.slaves.items():
            if number not in found.masters:
                pid, fd = ends[0]
                problems.append(f"pid {pid} fd {fd}: /dev/pts/{number} is a terminal whose "
                                "master is not in the tree (the host's terminal, a terminal "
                                "emulator's): a terminal cannot move")
    for t in live:
        leader = by_pid.get(t.sid)
        if leader is None:
            continue                    # a session led outside the tree: not the tree's
        if t.tty_nr != leader.tty_nr:
            problems.append(f"pid {t.pid}: its controlling terminal ({_terminal(t.tty_nr)}) is "
                            f"not that of its session leader {t.sid} "
                            f"({_terminal(leader.tty_nr)}): cannot be recreated (a process "
                            "gets its session's terminal as it is forked)")
        elif t.pid == t.sid and t.tty_nr and t.ctty_pty not in found.masters:
            problems.append(f"pid {t.pid} leads a session whose controlling terminal "
                            f"{_terminal(t.tty_nr)} has its master outside the tree (the "
                            "host's terminal, a terminal emulator's): a terminal cannot move")
    if outside and found.masters:
        problems += outside_users(set(found.masters), {t.pid for t in tasks})
    return problems


def outside_users(numbers: set[int], tree: set[int]) -> list[str]:
    """Processes outside the tree that hold an end of these ptys or have one as controlling
    terminal: the pairs are made anew, they would be left with the old ones."""
    problems = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in tree:
            continue
        pid = int(entry.name)
        try:
            t = procfs.tree_task(pid)
            if t.ctty_pty in numbers:
                problems.append(f"/dev/pts/{t.ctty_pty} is the controlling terminal of pid {pid} "
                                f"({procfs.comm(pid)}), outside the tree: the tree's pty is "
                                "made anew, it would be left with the old one")
            for fd in procfs.fd_numbers(pid):
                link = procfs.readlink(pid, f"fd/{fd}")
                if not (link.startswith("/dev/pts/") or link.endswith("ptmx")):
                    continue
                end = procfs.pty_end(pid, fd)
                if end is not None and end[1] in numbers:
                    problems.append(f"/dev/pts/{end[1]}: pid {pid} ({procfs.comm(pid)}) outside "
                                    f"the tree holds its {end[0]} (fd {fd}): the tree's pty is "
                                    "made anew, it would be left with the old one")
        except (ProcessGone, OSError):
            continue                  # gone, or not ours to look at
    return problems


class CapturedPty:
    """One pty pair of the tree as read at the freeze: our copy of the source's master fd, a
    slave fd of our own (None if the slave was never opened) and the state read, its queues
    read away from the source's pair: put_back() queues them there again if the source
    resumes."""

    def __init__(self, number: int, master: int, slave: int | None):
        self.number, self.master, self.slave = number, master, slave
        self.state: tty.PtyState | None = None

    def put_back(self) -> None:
        if self.state is not None:
            tty.refill(self.master, self.slave, self.state)
            self.state = None

    def close(self) -> None:
        for fd in (self.master, self.slave):
            if fd is not None:
                os.close(fd)
        self.master = self.slave = None


def capture_ptys(states: list[ProcessState], direct: bool, captured: list[CapturedPty]) -> None:
    """With the tree frozen: each pty pair of the tree read (its state goes on its first master
    fd, as msgpack); a slave fd whose master is outside the tree is handed over on one host
    (else refused). Each pair read is added to `captured` at once, so that an error after it
    still puts its bytes back."""
    masters: dict[int, list[tuple[int, FileDescriptor]]] = {}
    slaves: dict[int, list[tuple[int, FileDescriptor]]] = {}
    for s in states:
        for f in s.fds:
            if f.kind in ("pty-master", "pty-slave"):
                (masters if f.kind == "pty-master" else slaves).setdefault(
                    f.dev_inode[1], []).append((s.pid, f))
    for number, ends in slaves.items():
        if number in masters:
            continue
        if not direct:
            pid, f = ends[0]
            raise UnsupportedState(f"pid {pid} fd {f.fd}: /dev/pts/{number} is a terminal whose "
                                   "master is not in the tree: a terminal cannot move")
        for _, f in ends:
            f.kind = "handover"
    for number, ends in masters.items():
        pid, f = ends[0]
        where = f"pid {pid} fd {f.fd}: pty /dev/pts/{number}"
        pidfd = native.pidfd_open(pid)
        try:
            master = native.pidfd_getfd(pidfd, f.fd, pid)
        finally:
            os.close(pidfd)
        cap = CapturedPty(number, master, None)
        captured.append(cap)
        state = "open" if number in slaves else \
            "closed" if tty.slave_closed(master) else "never"
        try:
            if state != "never":
                cap.slave = tty.open_slave_even_locked(master, os.O_RDWR | os.O_NONBLOCK)
            cap.state = tty.read_state(master, cap.slave, state, where)
            cap.state.owner = tty.slave_owner(master)
        except OSError as e:
            raise UnsupportedState(f"{where}: cannot read its state ({e})") from None
        st = cap.state
        if st.stored_input() > tty.N_TTY_BUF - 1 and not tty.transparent_input(st.termios):
            raise UnsupportedState(f"{where}: {st.stored_input()} bytes of input wait in it "
                                   "while it processes input (at most "
                                   f"{tty.N_TTY_BUF - 1} are carried then)")
        f.data = msgpack.packb(st.to_map(), use_bin_type=True)
