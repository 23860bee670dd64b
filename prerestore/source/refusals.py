"""The refusals of one process on the source side: what this version cannot migrate, in words.

find_unsupported() looks at one live process before anything is frozen (source/checks.py
asks it for every process of the tree, with the tree-wide checks); the *_problem functions
name one object each (an fd's locks, a pidfd, securebits, a shadow stack, an I/O flusher
thread, seccomp strict mode), and ProcessSource.collect_state (source/process.py) asks some of
them again of the frozen process, where the state may have appeared since."""
from __future__ import annotations

import os
import stat

from ..errors import ProcessGone, UnsupportedState
from ..kernel import native, procfs, seccomp
from ..kernel.tracee import runner_area
from ..model import Credentials


def pidfd_problem(fd: int, target: int, flags: int, members) -> str | None:
    """Why a pidfd (of host pid `target`) cannot be made again, if it cannot: it must refer
    to a process of the tree (members(): the host pids of the tree's processes and threads)."""
    if target == -1:
        return f"fd {fd}: a pidfd of a process that has ended (not carried)"
    if target not in members():
        what = "thread" if flags & procfs.PIDFD_THREAD else "process"
        return (f"fd {fd}: a pidfd of {what} {target or '(not in our pid namespace)'}, "
                "outside the tree (not carried)")
    return None


LOCK_NAMES = {"POSIX": "a POSIX lock (fcntl F_SETLK)", "FLOCK": "a flock() lock",
              "OFDLCK": "an OFD lock (F_OFD_SETLK)", "LEASE": "a lease (F_SETLEASE)"}
# locks that belong to the open file description: on this host the very file is handed over
# with them (no moment without them, nobody else can take them meanwhile)
FILE_LOCKS = {"FLOCK", "OFDLCK", "LEASE"}


def lock_problem(fd: int, what: str, fdinfo_text: str, same_host: bool,
                 kind: str = "") -> str | None:
    """Why the locks an fd holds (its fdinfo's "lock:" lines) cannot be carried, if they
    cannot. A POSIX lock belongs to the process's fd table, which is not moved, and is
    released as the source ends: taking it again after that would leave a moment where
    another process may take it. Between hosts no lock is carried (a file of this host is
    not the destination's). kind: what the fd is made as on this host, if known ("" for a
    check before the freeze): a file the destination reopens is handed over instead."""
    kinds = procfs.fd_locks(fdinfo_text)
    if not kinds:
        return None
    names = " and ".join(LOCK_NAMES.get(k, f"a {k} lock") for k in sorted(kinds))
    if "POSIX" in kinds:
        return (f"fd {fd}: {what} holds {names}: a POSIX lock belongs to the process's fd "
                "table, which does not move (not carried)")
    if not same_host:
        return f"fd {fd}: {what} holds {names} (not carried between hosts)"
    if kinds - FILE_LOCKS or kind not in ("", "file", "chr", "dir", "handover"):
        return f"fd {fd}: {what} holds {names} (not carried)"
    return None


def find_unsupported(pid: int, same_host: bool = False, members=None,
                     external_fds: frozenset[str] = frozenset()) -> list[str]:
    """Everything about one live process this version cannot migrate, in words. On the same
    host (same_host) fds of other kinds are handed over as they are (Husk.hand_over_fds).
    members(): the host pids of the tree's processes and threads (for its pidfds), asked
    only if it holds one. external_fds: objects (as /proc/PID/fd names them) the
    destination is given in their place (--inherit-fd): not looked at."""
    problems = []
    st = procfs.status(pid)
    problems += seccomp_problems(pid, st)
    shstk = shadow_stack_problem(pid, st)
    if shstk:
        problems.append(shstk)
    for tid in procfs.threads(pid):
        try:
            flags = int(procfs.stat_fields(f"{pid}/task/{tid}")[9])
        except ProcessGone:
            continue
        problem = io_flusher_problem(pid, tid, flags)
        if problem:
            problems.append(problem)
    for fd in procfs.fd_numbers(pid):
        what, desc, text = procfs.describe_fd_text(pid, fd)
        if what in external_fds:
            continue
        problem = lock_problem(fd, what, text, same_host)
        if problem:
            problems.append(problem)
            continue
        if desc is not None and desc.kind == "pidfd":
            problem = pidfd_problem(fd, desc.target_pid, desc.flags,
                                    members or (lambda: {pid}))
            if problem:
                problems.append(problem)
            continue
        if desc is None and what.startswith(("pipe:", "socket:")) and not same_host:
            continue       # carried if it stays inside the tree (see inner_ends)
        if desc is None and what in procfs.CARRIED_ANON and not same_host:
            continue       # made anew by the restorer
        if desc is None and what == procfs.INOTIFY and not same_host:
            try:
                procfs.describe_inotify(pid, fd, 0)     # every watch must have a path
            except UnsupportedState as e:
                problems.append(str(e))
            continue
        if desc is None and what.startswith(("directory ", "deleted file ", "fifo ")) and \
                not same_host:
            continue       # reopened / recreated from the image
        if desc is None and not same_host and _is_terminal(pid, fd):
            problems.append(f"fd {fd}: {what} is a terminal of this host: a terminal cannot "
                            "move")
        elif desc is None and not (same_host and procfs.can_hand_over(pid, fd, what)):
            problems.append(f"fd {fd}: {what} (unsupported file kind"
                            f"{'' if same_host else ' between hosts'})")
    layout = procfs.maps(pid)
    try:
        runner_area(pid, layout)         # a process without [vdso]: somewhere else
    except UnsupportedState as e:
        problems.append(str(e).split(": ", 1)[1])
    for v in layout:
        if v.is_sysv:
            continue           # carried with the tree's IPC objects (source/sysvipc.py)
        elif v.shared and v.path.startswith("socket:"):
            problems.append(f"socket memory mapped at {v.start:#x}-{v.end:#x} ({v.path}: a "
                            "packet socket's ring, PACKET_RX_RING or PACKET_TX_RING, is the "
                            "kernel's; not carried)")
        elif v.shared and not v.is_file and not v.is_special:
            problems.append(f"shared memory mapping {v.start:#x}-{v.end:#x} {v.path or '(anon)'}")
        elif v.path.startswith("/") and v.path.endswith(" (deleted)") and not v.is_shmem \
                and not same_host:
            # on one host the husk maps the very file (/proc/PID/map_files, Husk._map)
            problems.append(f"mapping {v.start:#x}-{v.end:#x} of a deleted file {v.path} "
                            "(carried on one host only)")
    return problems


# securebits a restored process can only be given with CAP_SETPCAP in its own effective set
# (the husk sets them last, as the source's credentials): SECBIT_KEEP_CAPS_LOCKED,
# SECBIT_NO_CAP_AMBIENT_RAISE and its lock
SECBITS_LATE = 1 << 5 | 1 << 6 | 1 << 7
CAP_SETPCAP = 8


def securebits_problem(pid: int, securebits: int, creds: Credentials | None) -> str | None:
    if securebits & SECBITS_LATE and creds is not None and \
            not creds.cap_effective >> CAP_SETPCAP & 1:
        return (f"pid {pid}: securebits {securebits:#x} (keep-caps locked or no ambient "
                "raise) without CAP_SETPCAP in its effective set: they cannot be set again")
    return None


def shadow_stack_problem(pid: int, status: dict[str, str]) -> str | None:
    """x86 user shadow stack (x86_Thread_features: shstk, Linux 6.6+): not carried (its
    pointer and the shadow stack's contents would have to be rebuilt)."""
    if "shstk" in status.get("x86_Thread_features", "").split():
        return (f"pid {pid}: x86 user shadow stack enabled (x86_Thread_features: "
                f"{status['x86_Thread_features'].strip()}): not carried")
    return None


PR_IO_FLUSHER = 0x00080000 | 0x00100000       # PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE


def io_flusher_problem(pid: int, tid: int, flags: int) -> str | None:
    """A thread marked PR_SET_IO_FLUSHER (a userspace block or file system server: both
    task flags, /proc/PID/task/TID/stat field 9): not carried (setting it takes
    CAP_SYS_RESOURCE, which a restorer may lack)."""
    if flags & PR_IO_FLUSHER == PR_IO_FLUSHER:
        return f"pid {pid} thread {tid}: PR_SET_IO_FLUSHER (not carried)"
    return None


def seccomp_problems(pid: int, status: dict[str, str]) -> list[str]:
    """Threads in seccomp strict mode. Each thread has a mode of its own, so each is looked
    at (the process's status shows its main thread's)."""
    problems = []
    for tid in procfs.threads(pid):
        try:
            st = status if tid == pid else procfs.status(f"{pid}/task/{tid}")
        except ProcessGone:
            continue                            # it exited meanwhile
        problem = seccomp.strict_problem(tid, st)
        if problem:
            problems.append(problem)
    return problems


def _is_terminal(pid: int, fd: int) -> bool:
    """Is the fd a terminal? Asked of a copy of it: opening a terminal anew can have effects
    (a serial line's modem signals)."""
    try:
        if not stat.S_ISCHR(procfs.stat_file(pid, f"fd/{fd}").st_mode):
            return False
        pidfd = native.pidfd_open(pid)
        try:
            mine = native.pidfd_getfd(pidfd, fd, pid)
        finally:
            os.close(pidfd)
    except OSError:
        return False
    try:
        return os.isatty(mine)
    finally:
        os.close(mine)
