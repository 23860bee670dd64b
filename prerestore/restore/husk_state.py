"""The final state of a husk (restore/husk.py): apply_state() and everything it calls.

apply_state() gives a husk the source's state in one injected batch per process plus calls per
thread: open files (same-host fds handed over: hand_over_fds, epoll registrations, fd owners),
credentials, timers, process attributes, seccomp filters (install_seccomp), and the last calls
that run from the program's code; load_registers()/let_go() (or resume()) then set the threads
going; release_namespace() lets a pid namespace's init outlive the restorer.

HuskState is a mixin, not a class of its own: Husk (restore/husk.py) is one object per restored
process, and its birth and tree shape (husk.py), its memory (restore/husk_memory.HuskMemory) and
its final state share that object's attributes, which Husk.__init__ sets. Splitting the methods
into mixins keeps every call site (husk.apply_state(...), husk.let_go()) unchanged while each
file has one job."""
from __future__ import annotations

import errno
import os
import secrets
import socket
import struct
import time

from ..errors import KernelCallError, RestoreError
from ..faults import maybe_fail
from ..kernel import native, procfs
from ..kernel.native import lib
from ..kernel.tracee import KSIGACTION, STACK_T, RemoteSyscalls, Tracee
from ..model import FileDescriptor, ProcessState

PRCTL_MM_MAP = struct.Struct("=11QQII")   # struct prctl_mm_map
# struct sigevent (64 bytes): sigev_value, sigev_signo, sigev_notify, then the target tid
SIGEVENT = struct.Struct("=Qiii44x")
OPEN_DROP = lib.O_CREAT | lib.O_TRUNC | lib.O_EXCL | lib.O_NOCTTY
SIGTRAP, SIGKILL, SIGSTOP, SIGCHLD = 5, 9, 19, 17
F_SETFL, F_SETSIG, F_SETOWN_EX = 4, 10, 15
O_ASYNC = 0o20000
SYS_PIDFD_OPEN = 434
PIDFD_FLAGS = 0o4000 | 0o200          # PIDFD_NONBLOCK (O_NONBLOCK), PIDFD_THREAD (O_EXCL)
# what F_SETFL changes: O_APPEND, O_NONBLOCK, O_ASYNC, O_DIRECT, O_NOATIME
SETFL_FLAGS = 0o2000 | 0o4000 | O_ASYNC | 0o40000 | 0o1000000
SYS_MOUNT = 165                           # x86_64
SCM_MAX_FD = 253                          # fds one SCM_RIGHTS message carries at most
PR_TSC_SIGSEGV = 2                        # PR_SET_TSC: rdtsc raises SIGSEGV
PR_SPEC_PRCTL = 1                         # PR_GET_SPECULATION_CTRL: the thread may set it
SECBIT_KEEP_CAPS = 1 << 4
# securebits that would stop the husk becoming the source: keep-caps locked, no ambient raise
# (and its lock)
SECBITS_LATE = 1 << 5 | 1 << 6 | 1 << 7
_LOGINUID: list[int] = []


def _own_loginuid() -> int:
    """Ours, which a husk inherits."""
    if not _LOGINUID:
        _LOGINUID.append(procfs.loginuid(os.getpid()))
    return _LOGINUID[0]


def resumable_regs(saved: dict[str, int]) -> dict[str, int]:
    """The registers to resume with: a thread stopped inside a system call restarts it, as
    the kernel would have on its way back to user space."""
    regs = dict(saved)
    if regs["orig_rax"] < 2 ** 63:               # stopped inside a system call
        rv = regs["rax"] - 2 ** 64 if regs["rax"] >= 2 ** 63 else regs["rax"]
        if rv in (-lib.ERESTARTSYS, -lib.ERESTARTNOINTR, -lib.ERESTARTNOHAND):
            regs["rax"], regs["rip"] = regs["orig_rax"], regs["rip"] - 2   # run it again
        elif rv == -lib.ERESTART_RESTARTBLOCK:
            # its restart block stayed in the source kernel: report an interruption, which
            # callers of such calls (nanosleep, poll with timeout...) handle by retrying
            regs["rax"] = -errno.EINTR & 0xFFFFFFFFFFFFFFFF
        regs["orig_rax"] = 0xFFFFFFFFFFFFFFFF
    return regs


def _place_fds(b, moves: dict[int, tuple[int, bool]], spare: int) -> None:
    """The calls that move received fds to their numbers: moves maps where each landed (the
    lowest free numbers, which may be numbers others must get) to (its number, close-on-exec).
    A parallel move: one whose number is still held by another waiting to move goes after
    it; a cycle goes through `spare`, a free number. No other number is used, so that a
    process near its RLIMIT_NOFILE gets its fds back all the same."""
    pending = dict(moves)
    waiting_for = {target: src for src, (target, _) in pending.items()}   # number -> holder
    ready = [src for src, (target, _) in pending.items() if target not in pending or
             target == src]
    while pending:
        while ready:
            src = ready.pop()
            target, cloexec = pending.pop(src)
            if target == src:
                if cloexec:
                    b.call(lib.SYS_fcntl, src, 2, 1)          # F_SETFD, FD_CLOEXEC
            else:
                b.call(lib.SYS_dup3, src, target, lib.O_CLOEXEC if cloexec else 0)
                b.call(lib.SYS_close, src)
            blocked = waiting_for.get(src)                    # the one waiting for src
            if blocked is not None and blocked in pending:
                ready.append(blocked)
        if pending:                                            # only cycles are left
            src = next(iter(pending))
            target, cloexec = pending.pop(src)
            b.call(lib.SYS_dup3, src, spare, 0)
            b.call(lib.SYS_close, src)
            pending[spare] = (target, cloexec)     # goes once target's holder has moved
            waiting_for[target] = spare
            blocked = waiting_for.get(src)         # src is free now
            if blocked is not None and blocked in pending:
                ready.append(blocked)


class HuskState:
    """The final-state methods of Husk (mixed into it: see the module docstring)."""

    def ignored_signals(self) -> int:
        """The signals the husk ignores (SigIgn: what its spawner ignored across exec). Read
        once, when it is prepared (nothing of ours changes them before apply_state does)."""
        if self._ignored is None:
            self._ignored = int(procfs.status(self.host_pid).get("SigIgn", "0"), 16)
        return self._ignored

    def mount_proc_calls(self, b) -> None:
        """A tree in a new pid namespace sees a /proc of that namespace (/proc/self, its
        children's /proc/PID), as `unshare --pid --mount-proc` gives: the root husk mounts
        one on /proc of its mount namespace (made with the pid namespace, a copy of the
        restorer's), with the mount options of the restorer's /proc. Only now, in the final
        batch (~40 us): until the last round was applied, the husks open the same-host
        source's memory through the host's /proc (map_files). Its /proc was made a slave as
        it was spawned (native pr_spawn): the new mount does not propagate to the host's
        /proc (were it shared); every other mount keeps the propagation the copy has."""
        flags, data = procfs.proc_mount_options()
        b.call(SYS_MOUNT, b.put_str("proc"), b.put_str("/proc"), b.put_str("proc"), flags,
               b.put_str(data) if data else 0,
               label="mount proc on /proc (of the tree's pid namespace)")

    def hand_over_fds(self, items: list[tuple[int, int, FileDescriptor]],
                      all_fds: set[int]) -> None:
        """Give the husk open file descriptions of other processes: items are (host pid,
        its fd, the FileDescriptor to make of it here). From a source on this host: pipes,
        sockets, eventfds, epoll... keep their kernel state, their peers and their queued data,
        because they are the very same objects. From another husk of the tree: an open file
        shared by several processes stays shared.

        We take them with pidfd_getfd, listen on an abstract unix socket, and have the husk
        connect and receive them (SCM_RIGHTS) in a batch running while we send; a second batch
        moves each to its number and sets close-on-exec. One SCM_RIGHTS message carries at
        most SCM_MAX_FD (253) fds: more go in several messages, each received by its own
        recvmsg of a 1-byte buffer (a stream socket's recvmsg stops at the message whose fds
        it took, so each gets exactly its own)."""
        fds = [f for _, _, f in items]
        chunks = [list(range(i, min(i + SCM_MAX_FD, len(fds))))
                  for i in range(0, len(fds), SCM_MAX_FD)]
        pidfds: dict[int, int] = {}
        local = []
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            for pid, there, _ in items:
                if pid is None:                  # one of ours
                    local.append(os.dup(there))
                    continue
                if pid not in pidfds:
                    pidfds[pid] = native.pidfd_open(pid)
                local.append(native.pidfd_getfd(pidfds[pid], there, pid))
            name = b"\0prerestore-handover-" + secrets.token_hex(8).encode()
            listener.bind(name)
            listener.listen(1)
            listener.settimeout(5.0)
            high = max(set(self.fds) | all_fds | {2}) + 1   # above every fd it will have
            first = self._lowest_free_fd()       # where the husk's socket() lands
            b = self.remote.batch()
            addr = b.put(struct.pack("=H", socket.AF_UNIX) + name)
            byte = b.put(b"\0")
            iov = b.put(struct.pack("=QQ", byte, 1))
            ctls = []
            for chunk in chunks:
                ctl_len = 16 + (4 * len(chunk) + 7) // 8 * 8      # CMSG_SPACE(4 * n)
                ctl = b.put(b"\0" * ctl_len)
                msg = b.put(struct.pack("=QI4xQQQQi4x", 0, 0, iov, 1, ctl, ctl_len, 0))
                ctls.append((ctl, ctl_len, msg))
            b.call(lib.SYS_socket, socket.AF_UNIX, socket.SOCK_STREAM | lib.O_CLOEXEC, 0)
            b.call(lib.SYS_dup3, first, high, lib.O_CLOEXEC)
            b.call(lib.SYS_close, first)
            b.call(lib.SYS_connect, high, addr, 2 + len(name))
            for _, _, msg in ctls:
                b.call(lib.SYS_recvmsg, high, msg, 0)
            started = self.remote.start(b)
            try:
                conn, _ = listener.accept()
            except OSError as e:
                results, done = started.finish()
                raise RestoreError(f"the husk did not connect to take its fds: {e} "
                                   f"({b.labels[done - 1]} returned {results[done - 1]})") from None
            with conn:
                for chunk in chunks:
                    socket.send_fds(conn, [b"F"], [local[i] for i in chunk])
            results, done = started.finish()
            if done < len(b.calls) or any(r != 1 for r in results[4:]) or results[0] != first:
                raise RestoreError(f"the husk could not receive its fds (results {results})")
            received = []
            for (ctl, ctl_len, _), chunk in zip(ctls, chunks):
                cmsg = self.remote.read(ctl, ctl_len)
                length, level, kind = struct.unpack_from("=Qii", cmsg)
                got = list(struct.unpack_from(f"={(length - 16) // 4}i", cmsg, 16))
                if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS or \
                        len(got) != len(chunk):
                    raise RestoreError(f"the husk received {len(got)} of {len(chunk)} fds "
                                       f"in a message")
                received += got
            b = self.remote.batch()
            b.call(lib.SYS_close, high)           # free: the one spare number needed below
            _place_fds(b, {r: (f.fd, bool(f.flags & lib.O_CLOEXEC))
                           for r, f in zip(received, fds)}, high)
            self.remote.run(b)
        finally:
            listener.close()
            for fd in local + list(pidfds.values()):
                os.close(fd)

    def _register_epoll(self, state: ProcessState) -> None:
        """Each epoll made for an image gets its registrations again (the fds it watches are
        all in place now): those this process made, listed on its own fd entry of the epoll
        (an epoll shared between processes: see source.capture.place_epoll_registrations). A
        handed-over epoll keeps its registrations, except that a signalfd's wakeups come from
        the task that registered it (the source): those are registered again from here."""
        kinds = {f.fd: f.path for f in state.fds}
        b = self.remote.batch()
        for f in state.fds:
            if not (f.kind == "epoll" or f.path == "anon_inode:[eventpoll]"):
                continue
            handed = f.kind == "handover"
            if handed and f.same_as:
                continue
            for tfd, events, data in procfs.EPOLL_ITEM.iter_unpack(f.data):
                # registered under a number closed since: from a dup of the fd that holds
                # its file now, under that number, closed again after
                held = f.closed_targets.get(tfd)
                if handed and kinds.get(tfd if held is None else held) != \
                        "anon_inode:[signalfd]":
                    continue
                if held is not None:
                    b.call(lib.SYS_dup3, held, tfd, 0,
                           label=f"dup3({held}, {tfd}) for the closed fd epoll fd {f.fd} "
                           "watches")
                ev = b.put(struct.pack("=IQ", events, data))      # packed struct epoll_event
                if handed:
                    b.call(lib.SYS_epoll_ctl, f.fd, 2, tfd, ev,    # EPOLL_CTL_DEL
                           label=f"epoll_ctl(DEL) fd {tfd} from epoll fd {f.fd}")
                b.call(lib.SYS_epoll_ctl, f.fd, 1, tfd, ev,        # EPOLL_CTL_ADD
                       label=f"epoll_ctl(ADD) fd {tfd} to epoll fd {f.fd}")
                if held is not None:
                    b.call(lib.SYS_close, tfd)
        if len(b):
            self.remote.run(b)

    def _set_fd_owners(self, state: ProcessState) -> None:
        """Who gets each fd's SIGIO/SIGURG (F_SETOWN_EX) and with which signal (F_SETSIG),
        once every fd and every task and group of the tree is in place, with the process's
        own credentials (the kernel checks the setter's against the owner's at each
        signal). A handed-over file has them already, but owned by the source's tasks: set
        again, to ours."""
        b = self.remote.batch()
        for f in state.fds:
            if f.flags & O_ASYNC:
                # O_ASYNC given to open() or to a new object's flags shows in its flags but
                # does not sign it up for the signals (only F_SETFL does, as it changes): off,
                # then on
                setfl = f.flags & SETFL_FLAGS
                b.call(lib.SYS_fcntl, f.fd, F_SETFL, setfl & ~O_ASYNC,
                       label=f"fcntl(fd {f.fd}, F_SETFL, {setfl & ~O_ASYNC:#o})")
                b.call(lib.SYS_fcntl, f.fd, F_SETFL, setfl,
                       label=f"fcntl(fd {f.fd}, F_SETFL, {setfl:#o})")
            if f.owner != (0, 0):
                b.call(lib.SYS_fcntl, f.fd, F_SETOWN_EX, b.put(struct.pack("=ii", *f.owner)),
                       label=f"fcntl(fd {f.fd}, F_SETOWN_EX, {f.owner})")
            if f.signal:
                b.call(lib.SYS_fcntl, f.fd, F_SETSIG, f.signal,
                       label=f"fcntl(fd {f.fd}, F_SETSIG, {f.signal})")
        if len(b):
            self.remote.run(b)

    def _thread_calls(self, b, th) -> None:
        """The calls that set one thread's own state, run in that thread."""
        b.call(lib.SYS_set_tid_address, th.clear_child_tid)
        if th.robust_list[0]:
            b.call(lib.SYS_set_robust_list, *th.robust_list)
        if th.rseq:
            ptr, size, sig = th.rseq
            b.call(lib.SYS_rseq, ptr, size, 0, sig)
        sp, flags, size = th.sigaltstack
        if not flags & 2:          # SS_DISABLE: nothing to install
            b.call(lib.SYS_sigaltstack, b.put(STACK_T.pack(sp, flags & ~1, 0, size)), 0)
        if th.name:
            b.call(lib.SYS_prctl, lib.PR_SET_NAME,
                   b.put(th.name.encode(errors="surrogateescape")[:15] + b"\0"),
                   label=f"prctl(PR_SET_NAME) thread {th.tid}")
        if th.timerslack:
            # a thread's own (timerslack_ns shows the main one's); a real-time thread's is 0
            # and stays 0: its policy is set last (load_registers), which zeroes it
            b.call(lib.SYS_prctl, lib.PR_SET_TIMERSLACK, th.timerslack,
                   label=f"prctl(PR_SET_TIMERSLACK) thread {th.tid}")
        if th.tsc == PR_TSC_SIGSEGV:
            b.call(lib.SYS_prctl, lib.PR_SET_TSC, PR_TSC_SIGSEGV, 0, 0, 0,
                   label=f"prctl(PR_SET_TSC, SIGSEGV) thread {th.tid}")
        for which, value in enumerate(th.spec):
            if value & PR_SPEC_PRCTL and value & ~PR_SPEC_PRCTL:
                # a control this thread may set (PR_SPEC_PRCTL): its state, exactly
                b.call(lib.SYS_prctl, lib.PR_SET_SPECULATION_CTRL, which,
                       value & ~PR_SPEC_PRCTL, 0, 0,
                       label=f"prctl(PR_SET_SPECULATION_CTRL, {which}, {value:#x}) thread "
                             f"{th.tid}")
        if th.mce_kill in (0, 1):                           # late, early; 2: the default
            b.call(lib.SYS_prctl, lib.PR_MCE_KILL, 1, th.mce_kill, 0, 0,   # PR_MCE_KILL_SET
                   label=f"prctl(PR_MCE_KILL, {th.mce_kill}) thread {th.tid}")

    CAP_LAST = 40                                       # CAP_CHECKPOINT_RESTORE

    CAPS_V3 = 0x20080522                                # _LINUX_CAPABILITY_VERSION_3

    def _cred_calls(self, b, creds, securebits: int = 0) -> None:
        """Become who the source was, in the thread running the batch (credentials are
        per-thread in the kernel): bounding set, groups, gids, then uids keeping the
        capabilities to set them exactly, ambient set, no_new_privs, securebits. Run last:
        the husk loses its root powers here. Securebits: those that would stop us (keep-caps
        locked, no ambient raise) are set last, which takes CAP_SETPCAP in the source's own
        effective set (else refused at the source: refusals.securebits_problem); the others
        before the uid change, while the husk is root."""
        if creds is None:
            return
        early = securebits & ~SECBITS_LATE
        if early:
            b.call(lib.SYS_prctl, lib.PR_SET_SECUREBITS, early, 0, 0, 0,
                   label=f"prctl(PR_SET_SECUREBITS, {early:#x})")
        for cap in range(self.CAP_LAST + 1):
            if not creds.cap_bounding >> cap & 1:
                b.call(lib.SYS_prctl, lib.PR_CAPBSET_DROP, cap, label=f"drop cap {cap}")
        groups = struct.pack(f"={len(creds.groups)}I", *creds.groups)
        b.call(lib.SYS_setgroups, len(creds.groups), b.put(groups or b"\0" * 4))
        b.call(lib.SYS_setresgid, *creds.gids)
        if creds.fsgid not in (-1, creds.gids[1]):
            b.call(lib.SYS_setfsgid, creds.fsgid)          # still root: any gid
        b.call(lib.SYS_prctl, lib.PR_SET_KEEPCAPS, 1)
        b.call(lib.SYS_setresuid, *creds.uids)
        header = b.put(struct.pack("=Ii", self.CAPS_V3, 0))
        lo, hi = (lambda v: v & 0xFFFFFFFF), (lambda v: v >> 32)
        data = b.put(struct.pack("=6I", lo(creds.cap_effective), lo(creds.cap_permitted),
                                 lo(creds.cap_inheritable), hi(creds.cap_effective),
                                 hi(creds.cap_permitted), hi(creds.cap_inheritable)))
        b.call(lib.SYS_capset, header, data)
        b.call(lib.SYS_prctl, lib.PR_SET_KEEPCAPS, 1 if securebits & SECBIT_KEEP_CAPS else 0)
        if creds.fsuid not in (-1, creds.uids[1]):
            # after setresuid (which sets it to the effective uid): allowed as one of the
            # thread's uids, or with CAP_SETUID in the capabilities just set
            b.call(lib.SYS_setfsuid, creds.fsuid)
        for cap in range(self.CAP_LAST + 1):
            if creds.cap_ambient >> cap & 1:
                b.call(lib.SYS_prctl, lib.PR_CAP_AMBIENT, lib.PR_CAP_AMBIENT_RAISE, cap, 0, 0)
        if creds.no_new_privs:
            b.call(lib.SYS_prctl, lib.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if securebits & SECBITS_LATE:
            b.call(lib.SYS_prctl, lib.PR_SET_SECUREBITS, securebits, 0, 0, 0,
                   label=f"prctl(PR_SET_SECUREBITS, {securebits:#x})")

    def apply_state(self, state: ProcessState, source_pid: int | None = None,
                    tree: dict[int, int] | None = None,
                    made: dict[tuple[int, int], int] | None = None,
                    queued_here: tuple[int, ...] = (SIGCHLD,),
                    dirs: dict[tuple[int, str], str] | None = None, fs: bool = True) -> dict:
        """Everything but the registers: fds, mm fields, signals, rseq... in one batch, after
        creating the other threads. source_pid: the live source on this host, to hand over
        what cannot be reopened; tree: host pids of the tree's husks by the pid they stand
        for, whose states were applied before (for open files shared with them); made:
        objects the restorer made for the tree (pipes): our own fds, by (pid, fd);
        queued_here: signals the restore itself may have queued to the husk (SIGCHLD from
        its children husks, SIGWINCH from giving its terminal its window size), discarded
        before the source's pending signals are queued again; dirs: directories the restorer
        made for a deleted working directory or root, by (pid, "cwd"/"root")
        (makers.make_deleted_dirs); fs: it sets the root, working directory and umask (of
        husks sharing them, CLONE_FS, the last one applied: after every path the others
        open from the host's root).

        A husk sharing its fd table with one applied before it (files_leader) installs no fd:
        that one has installed them all in their one table."""
        t0 = time.perf_counter()
        maybe_fail("apply_state")
        dirs = dirs or {}
        if state.oom_score_adj:
            try:
                with open(f"/proc/{self.host_pid}/oom_score_adj", "w") as f:
                    f.write(str(state.oom_score_adj))
            except OSError as e:
                raise RestoreError(f"cannot restore oom_score_adj {state.oom_score_adj}: "
                                   f"{e.strerror}") from None
        # limits first: RLIMIT_NOFILE bounds the fd numbers we are about to install
        for res, (soft, hard) in sorted(state.rlimits.items(), key=lambda x: x[0] != 7):
            try:
                native.prlimit(self.host_pid, res, (soft, hard))
            except KernelCallError as e:
                raise RestoreError(f"cannot restore rlimit {res} = ({soft}, {hard}): {e}") from None
        self.sync_threads([th.tid for th in state.threads])
        if state.seccomp_filters:
            self.install_seccomp(state)
        for th in state.threads[1:]:            # each thread's own state, run in it
            remote = self.remote.sharing(self.threads[th.tid])
            b = remote.batch()
            self._thread_calls(b, th)
            self._cred_calls(b, th.creds or state.creds, state.securebits)
            remote.run(b)
        b = self.remote.batch()
        if self.mounts_proc:
            self.mount_proc_calls(b)
        leader = self.files_leader
        # a shared table holds every fd of the source's by now (the same table there)
        opened = {f.fd for f in state.fds} if leader else set(self.fds)
        own_fds = [] if leader else state.fds
        expected = []

        def lowest():
            fd = 0
            while fd in opened:
                fd += 1
            return fd

        handed = [f for f in own_fds if f.kind == "handover"]
        if handed and not source_pid:
            raise RestoreError(f"fds {[f.fd for f in handed]} ({handed[0].path}...) can only be "
                               "handed over from a source on this host")
        items = [(source_pid, f.fd, f) for f in handed]
        for f in sorted(own_fds, key=lambda f: f.fd):
            if f.kind == "handover":
                continue
            if made and (self.pid, f.fd) in made:     # an object the restorer made
                items.append((None, made[(self.pid, f.fd)], f))
                continue
            cloexec = lib.O_CLOEXEC if f.flags & lib.O_CLOEXEC else 0
            if f.same_as and f.same_as[0] == self.pid:      # a dup of an fd opened above
                b.call(lib.SYS_dup3, f.same_as[1], f.fd, cloexec)
                opened.add(f.fd)
                continue
            if f.same_as:                                   # opened by another process
                items.append(((tree or {})[f.same_as[0]], f.same_as[1], f))
                continue
            if f.kind == "pidfd":
                # of a process (or thread) of the tree: all are in place by now, by the pids
                # the tree names them. pidfd_open makes it close-on-exec.
                tmp = lowest()
                b.call(SYS_PIDFD_OPEN, f.target_pid, f.flags & PIDFD_FLAGS,
                       label=f"pidfd_open({f.target_pid}) for fd {f.fd}")
                expected.append((len(b) - 1, tmp))
                if tmp != f.fd:
                    b.call(lib.SYS_dup3, tmp, f.fd, cloexec)
                    b.call(lib.SYS_close, tmp)
                elif not cloexec:
                    b.call(lib.SYS_fcntl, f.fd, 2, 0)      # F_SETFD: not close-on-exec
                opened.add(f.fd)
                continue
            tmp = lowest()
            flags = (f.flags & ~OPEN_DROP & ~lib.O_CLOEXEC)
            b.call(lib.SYS_openat, lib.AT_FDCWD, b.put_str(f.path), flags,
                   label=f"openat {f.path} for fd {f.fd}")
            expected.append((len(b) - 1, tmp))
            if tmp != f.fd:
                b.call(lib.SYS_dup3, tmp, f.fd, cloexec)
                b.call(lib.SYS_close, tmp)
            elif cloexec:
                b.call(lib.SYS_fcntl, f.fd, 2, 1)      # F_SETFD, FD_CLOEXEC
            opened.add(f.fd)
            if f.kind == "file" or f.kind == "dir" and f.offset:
                b.call(lib.SYS_lseek, f.fd, f.offset, 0)
        if state.tty_pgrp:
            # its terminal's foreground group (the groups exist by now: StagedTree._set_groups)
            tty_fd = lowest()
            b.call(lib.SYS_openat, lib.AT_FDCWD, b.put_str("/dev/tty"),
                   os.O_RDWR | lib.O_NOCTTY | lib.O_CLOEXEC, label="openat /dev/tty")
            expected.append((len(b) - 1, tty_fd))
            b.call(lib.SYS_ioctl, tty_fd, lib.TIOCSPGRP, b.put(struct.pack("=i", state.tty_pgrp)),
                   label=f"ioctl(TIOCSPGRP, {state.tty_pgrp})")
            b.call(lib.SYS_close, tty_fd)
        exe_fd = lowest()
        b.call(lib.SYS_openat, lib.AT_FDCWD, b.put_str(state.exe), os.O_RDONLY | lib.O_CLOEXEC,
               label=f"openat exe {state.exe}")
        expected.append((len(b) - 1, exe_fd))
        mm = state.mm
        auxv_addr = b.put(state.auxv)
        mm_map = PRCTL_MM_MAP.pack(mm.start_code, mm.end_code, mm.start_data, mm.end_data,
                                   mm.start_brk, mm.brk, mm.start_stack, mm.arg_start, mm.arg_end,
                                   mm.env_start, mm.env_end, auxv_addr, len(state.auxv), exe_fd)
        b.call(lib.SYS_prctl, lib.PR_SET_MM, lib.PR_SET_MM_MAP, b.put(mm_map), len(mm_map),
               label="prctl(PR_SET_MM_MAP)")
        b.call(lib.SYS_close, exe_fd)
        th = state.threads[0]
        self._thread_calls(b, th)
        # Children the restored tree made as husks (or removed, or zombies) queued SIGCHLDs
        # here that the source never had (and its terminal's new window size a SIGWINCH):
        # setting SIG_IGN discards a pending signal. Then the default, unless the source had
        # an action of its own for it (set just below).
        for sig in queued_here:
            b.call(lib.SYS_rt_sigaction, sig, b.put(KSIGACTION.pack(1, 0, 0, 0)), 0, 8)
            b.call(lib.SYS_rt_sigaction, sig, b.put(KSIGACTION.pack(0, 0, 0, 0)), 0, 8)
        # A signal the source left at its default may be ignored here: the husk inherits the
        # dispositions its spawner ignored across exec (Python ignores SIGPIPE and SIGXFSZ),
        # and a restored process that ignored SIGPIPE would get EPIPE where its source died.
        ignored = self.ignored_signals()
        for sig in range(1, 65):
            if ignored >> (sig - 1) & 1 and sig not in state.sigactions:
                b.call(lib.SYS_rt_sigaction, sig, b.put(KSIGACTION.pack(0, 0, 0, 0)), 0, 8)
        for sig, a in sorted(state.sigactions.items()):
            if sig in (SIGKILL, SIGSTOP):
                continue
            act = b.put(KSIGACTION.pack(a.handler, a.flags, a.restorer, a.mask))
            b.call(lib.SYS_rt_sigaction, sig, act, 0, 8, label=f"rt_sigaction({sig})")
        for v in self.layout:
            if v.path.startswith("[anon:") and v.path.endswith("]") and not v.shared:
                # an anonymous area's name (PR_SET_VMA_ANON_NAME), as maps shows it
                b.call(lib.SYS_prctl, lib.PR_SET_VMA, lib.PR_SET_VMA_ANON_NAME, v.start, v.size,
                       b.put_str(v.path[len("[anon:"):-1]),
                       label=f"prctl(PR_SET_VMA_ANON_NAME) {v.start:#x}-{v.end:#x} {v.path}")
        comm = state.comm.encode()[:15]
        b.call(lib.SYS_prctl, lib.PR_SET_NAME, b.put(comm + b"\0"), label="prctl(PR_SET_NAME)")
        if fs:
            b.call(lib.SYS_umask, state.umask)
            cwd = dirs.get((state.pid, "cwd"), state.cwd)
            b.call(lib.SYS_chdir, b.put_str(cwd), label=f"chdir {cwd}")
        for info in state.shared_pending:
            sig = struct.unpack_from("=i", info)[0]
            b.call(lib.SYS_rt_sigqueueinfo, self.pid, sig, b.put(info))
        for thread in state.threads:
            for info in thread.pending:
                sig = struct.unpack_from("=i", info)[0]
                b.call(lib.SYS_rt_tgsigqueueinfo, self.pid, thread.tid, sig, b.put(info))
        if state.child_subreaper:
            b.call(lib.SYS_prctl, lib.PR_SET_CHILD_SUBREAPER, 1)
        if state.personality:
            b.call(lib.SYS_personality, state.personality, label="personality")
        self._timer_calls(b, state)
        if state.thp_disable:
            b.call(lib.SYS_prctl, lib.PR_SET_THP_DISABLE, 1, 0, 0, 0)
        self._vmflag_calls(b, state)
        b.call(lib.SYS_prctl, lib.PR_SET_PDEATHSIG, 0)
        # (loginuid is written through /proc/self: before the chroot)
        self._process_attr_calls(b, state, lowest, expected)
        root = dirs.get((state.pid, "root"), state.root)
        if fs and root != "/":
            # Last of what names paths (every path of the image is one from the reader's
            # root, the host's: the working directory, which may lie inside or outside the
            # new root, files, the exe) and before the credentials (CAP_SYS_CHROOT); fds are
            # handed over after it through an abstract socket, which names no path.
            b.call(lib.SYS_chroot, b.put_str(root), label=f"chroot {root}")
        self._cred_calls(b, state.creds, state.securebits)
        b.call(lib.SYS_prctl, lib.PR_SET_DUMPABLE, state.dumpable)   # a uid change reset it
        if state.pdeathsig and self.parent is not None:
            # after the uid change, which clears it; the root's parent is another process
            # here than on the source: its parent-death signal is not carried
            b.call(lib.SYS_prctl, lib.PR_SET_PDEATHSIG, state.pdeathsig)
        results = self.remote.run(b)
        for i, fd in expected:
            if results[i] != fd:
                raise RestoreError(f"husk {b.labels[i]} returned fd {results[i]}, expected {fd}")
        handed = {f.fd for _, _, f in items}
        self.fds = {f.fd for f in state.fds} if leader else \
            {f.fd for f in state.fds if f.kind != "handover" and f.fd not in handed}
        t_batch = time.perf_counter()
        if items:
            self.hand_over_fds(items, {f.fd for f in state.fds})
        if not leader:               # a shared fd table's first process did these
            self._register_epoll(state)
            self._set_fd_owners(state)
        t_handed = time.perf_counter()
        if self.drop_specials:
            self._drop_specials()       # its last calls run from the program's code
        self._last_calls(state)
        return {"handover_ms": (t_handed - t_batch) * 1e3, "handed_over": len(items),"state_batch_ms": (t_batch - t0) * 1e3, "state_calls": len(b),
                "state_ms": (time.perf_counter() - t0) * 1e3}

    def _last_calls(self, state: ProcessState) -> None:
        """The scratch area away, last. A SIGTRAP action of the source's is set here, after
        the last trap the restore causes in the husk, and neither call traps: a trap (our
        batches end in int3, single calls single-step) in a task that ignores SIGTRAP, or
        blocks it as a husk does, makes the kernel reset SIGTRAP's action to the default
        (force_sig_info_to_task); the restored program would die of its next SIGTRAP."""
        trap = state.sigactions.get(SIGTRAP)
        if trap is None:
            self.remote.unmap_scratch()
            return
        sc = self.remote.scratch
        native.write_mem(self.host_pid, sc.data_addr,
                         KSIGACTION.pack(trap.handler, trap.flags, trap.restorer, trap.mask))
        for label, nr, args in (("rt_sigaction(SIGTRAP)", lib.SYS_rt_sigaction,
                                 (SIGTRAP, sc.data_addr, 0, 8)),
                                ("munmap(scratch)", lib.SYS_munmap, (sc.addr, sc.size))):
            ret = native.inject_syscall_quiet(self.host_pid, self.remote.insn, nr, *args)
            if -4096 < ret < 0:
                raise RestoreError(f"husk {self.pid}: injected {label} failed: "
                                   f"{os.strerror(-ret)}")
        self.remote.scratch = None

    def _process_attr_calls(self, b, state: ProcessState, lowest, expected: list) -> None:
        """What a process sets on itself that holds for its whole address space or task
        group: its audit login uid (only the process itself may write it, and only once
        unless it has CAP_AUDIT_CONTROL: the husk still does), KSM for all its memory,
        membarrier registrations, memory-deny-write-execute (after the last mapping: the
        husk maps exec areas and its scratch area is RWX; no mapping follows this batch)."""
        if state.loginuid >= 0 and state.loginuid != _own_loginuid():
            fd = lowest()
            b.call(lib.SYS_openat, lib.AT_FDCWD, b.put_str("/proc/self/loginuid"),
                   os.O_WRONLY | lib.O_CLOEXEC, label="openat /proc/self/loginuid")
            expected.append((len(b) - 1, fd))
            text = str(state.loginuid).encode()
            b.call(lib.SYS_write, fd, b.put(text), len(text),
                   label=f"write loginuid {state.loginuid}")
            b.call(lib.SYS_close, fd)
        if state.memory_merge:
            b.call(lib.SYS_prctl, lib.PR_SET_MEMORY_MERGE_, 1, 0, 0, 0,
                   label="prctl(PR_SET_MEMORY_MERGE)")
        for bit in (4, 16, 64, 256):            # the MEMBARRIER_CMD_REGISTER_* commands
            if state.membarrier & bit:
                b.call(lib.SYS_membarrier, bit, 0, 0, label=f"membarrier(register {bit})")
        if state.mdwe:
            b.call(lib.SYS_prctl, lib.PR_SET_MDWE_, state.mdwe, 0, 0, 0,
                   label=f"prctl(PR_SET_MDWE, {state.mdwe})")

    SOCK_FPROG = struct.Struct("=H6xQ")     # struct sock_fprog: len, then the instructions

    def install_seccomp(self, state: ProcessState) -> None:
        """Every thread's seccomp filters, once all its threads exist.

        The husk is ptraced with PTRACE_O_SUSPEND_SECCOMP first: an installed filter applies
        to every system call after it, ours too, and what the restore still injects (fds,
        credentials, signals...) is not the program's to be denied, nor killed for. The
        suspension ends as we let the process go. So the filters go in before the
        credentials change, as root (installing needs CAP_SYS_ADMIN or no_new_privs, which
        the source may have had then and dropped since; no_new_privs is set afterwards as the
        source has it).

        What its threads share (the part their lists start with alike, as a TSYNC or a thread
        created after its creator's filter makes it) is installed once, with
        SECCOMP_FILTER_FLAG_TSYNC from the main thread: a later TSYNC by the program needs the
        other threads' filters to be that very list. Each thread then adds its own in itself.
        Children processes get theirs in their own husks: an inherited list is copied, not
        shared, which nothing but the kernel's memory tells."""
        chains = [th.seccomp for th in state.threads]
        suspend = lib.PTRACE_O_SUSPEND_SECCOMP
        for t in [self.tracee] + [self.threads[th.tid] for th in state.threads[1:]]:
            options = lib.PTRACE_O_EXITKILL | suspend | \
                (lib.PTRACE_O_TRACECLONE | lib.PTRACE_O_TRACEFORK if t is self.tracee else 0)
            try:
                native.set_options(t.pid, options)
            except KernelCallError as e:
                raise RestoreError(f"process {self.pid}: cannot suspend seccomp in its husk to "
                                   f"install its filters (PTRACE_O_SUSPEND_SECCOMP needs "
                                   f"CAP_SYS_ADMIN and no seccomp of our own): {e}") from None
        shared = 0
        while all(len(c) > shared for c in chains) and \
                len({c[shared] for c in chains}) == 1:
            shared += 1
        tsync = lib.SECCOMP_FILTER_FLAG_TSYNC if len(chains) > 1 else 0
        for i, (th, chain) in enumerate(zip(state.threads, chains)):
            remote = self.remote if i == 0 else self.remote.sharing(self.threads[th.tid])
            # one batch: the kernel bounds a thread's filters to 32768 instructions in all
            # (MAX_INSNS_PER_PATH), 256 KiB, which the scratch area's data part holds
            b = remote.batch()
            first = 0 if i == 0 else shared
            for n, index in enumerate(chain[first:], first):
                f = state.seccomp_filters[index]
                flags = f.flags | (tsync if i == 0 and n < shared else 0)
                prog = b.put(self.SOCK_FPROG.pack(len(f.program) // 8, b.put(f.program)))
                b.call(lib.SYS_seccomp, lib.SECCOMP_SET_MODE_FILTER, flags, prog,
                       label=f"seccomp(SET_MODE_FILTER{'|TSYNC' if flags & tsync else ''}) "
                             f"filter {n} of thread {th.tid}")
            if len(b):
                self._run_seccomp(remote, b)

    def _run_seccomp(self, remote: RemoteSyscalls, b) -> None:
        """Run a batch of seccomp() calls: a TSYNC one that could not synchronize a thread
        returns that thread's id, not an error."""
        results = remote.run(b)
        for label, res in zip(b.labels, results):
            if res:
                raise RestoreError(f"process {self.pid}: {label}: thread {res} could not take "
                                   "the filters its threads share (TSYNC)")

    def _timer_calls(self, b, state: ProcessState) -> None:
        """POSIX timers with the ids the program holds (PR_TIMER_CREATE_RESTORE_IDS: the
        kernel takes the id timer_create is given; Linux 6.16+), armed with what remained of
        them at the freeze; then the interval timers."""
        if state.timers:
            b.call(lib.SYS_prctl, lib.PR_TIMER_RESTORE_IDS, 1, 0, 0, 0,
                   label="prctl(PR_TIMER_CREATE_RESTORE_IDS) (Linux 6.16+)")
            for tm in state.timers:
                target = state.threads[tm.thread].tid if tm.notify & 4 else 0
                sev = b.put(SIGEVENT.pack(tm.value, tm.signo, tm.notify, target))
                b.call(lib.SYS_timer_create, tm.clock, sev, b.put(struct.pack("=i", tm.id)),
                       label=f"timer_create(id {tm.id})")
            b.call(lib.SYS_prctl, lib.PR_TIMER_RESTORE_IDS, 0, 0, 0, 0)
            for tm in state.timers:
                # a periodic timer that expired with its signal still pending shows (0, 0)
                # left: the kernel arms it again only as that signal is delivered, which
                # the signal queued again here is not; so it goes on from one interval on
                remaining = tm.remaining if tm.remaining != (0, 0) else tm.interval
                if remaining != (0, 0):
                    its = b.put(struct.pack("=qqqq", *tm.interval, *remaining))
                    b.call(lib.SYS_timer_settime, tm.id, 0, its, 0,
                           label=f"timer_settime(id {tm.id})")
        for which, it in enumerate(state.itimers):
            value = it[2:] if it[2:] != (0, 0) else it[:2]     # as above
            if value != (0, 0):
                b.call(lib.SYS_setitimer, which, b.put(struct.pack("=qqqq", *it[:2], *value)),
                       0, label=f"setitimer({which})")

    def resume(self, state: ProcessState) -> None:
        """Registers last, then let it run."""
        self.load_registers(state)
        self.let_go(state.stopped)

    def load_registers(self, state: ProcessState) -> None:
        """Every thread's registers, xstate, signal mask and CPUs: the last step before it
        runs (a tree loads them all, then lets every process go at once)."""
        maybe_fail("resume")
        tracees = [(self.tracee, state.threads[0])] + \
            [(self.threads[th.tid], th) for th in state.threads[1:]]
        for t, th in tracees:
            cpus = th.cpus or state.cpus
            if cpus:
                os.sched_setaffinity(t.pid, cpus)
            if th.sched:
                # last: a real-time policy would let it crowd out our own work on its CPU
                try:
                    native.sched_set(t.pid, th.sched)
                except KernelCallError as e:
                    raise RestoreError(f"thread {th.tid}: cannot restore its scheduling "
                                       f"{th.sched}: {e}") from None
            t.set_sigmask(th.sigmask)
            t.set_regs(resumable_regs(th.regs))
            t.set_xstate(th.xstate)

    def let_go(self, stopped: bool = False) -> None:
        """Detach every thread. stopped: the process was stopped (SIGSTOP, job control) on
        the source, and stops here too (a group stop, which SIGCONT ends)."""
        for i, t in enumerate([self.tracee] + list(self.threads.values())):
            t.detach(SIGSTOP if stopped and i == 0 else 0)
        self.resumed = True

    def release_namespace(self) -> None:
        """The namespace's init must not die with us once the tree runs (see StagedTree)."""
        if self.init_pid:
            with Tracee(self.init_pid) as t:
                saved = t.regs()
                vdso = next(v for v in procfs.maps(self.init_pid) if v.path == "[vdso]")
                RemoteSyscalls(t, (vdso.start, vdso.end)).call(lib.SYS_prctl,
                                                               lib.PR_SET_PDEATHSIG, 0)
                t.set_regs(saved)
