"""A husk: a frozen process that becomes the restored one.

Lifecycle: spawn() starts the husk program with the source's pid (directly, or inside a fresh pid
namespace) and seizes it; prepare() clears its own mappings and moves its [vvar]/[vdso] to the
source's addresses; apply_round() makes its address space follow each round; apply_state() and
resume() finish it. kill() at any point removes it (and its pid namespace) without a trace.

The husk executes nothing of the target until resume(): every change is made through system calls
injected in batches (see kernel.tracee.RemoteSyscalls) and page writes from outside.

Husk is one object per restored process, composed of three files that each have one job: this
one, its birth and the tree's shape (spawn, fork_child, sessions, groups, namespaces, zombies,
its threads) and its death; restore/husk_memory.HuskMemory, its memory (prepare, apply_round,
VmFlags, the verify oracle); restore/husk_state.HuskState, its final state (apply_state and
what it calls, registers, let_go). Those two are mixins of Husk: they use the attributes
Husk.__init__ sets, and every caller keeps calling husk.prepare(), husk.apply_state()..."""
from __future__ import annotations

import errno
import os
import select
import struct
import time
from importlib import resources

from ..errors import KernelCallError, PidTaken, ProcessGone, RestoreError
from ..kernel import native, procfs
from ..kernel.native import lib
from ..kernel.tracee import KSIGACTION, RemoteSyscalls, Tracee, wait_exit
from ..model import Vma, Zombie
from .husk_memory import HuskMemory
from .husk_state import SIGCHLD, SIGKILL, HuskState

WALL = 0x40000000                         # __WALL: wait for any kind of child


def husk_program() -> str:
    return str(resources.files("prerestore") / "prerestore-husk")


def _pid_free(pid: int, wait_zombie: float = 2.0) -> bool:
    """Is pid free here? A just-killed source may linger as a zombie until its parent reaps
    it: give that a moment."""
    deadline = time.monotonic() + wait_zombie
    while True:
        try:
            state = procfs.stat_fields(pid)[3]
        except ProcessGone:
            return True
        if state != "Z" or time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def _pid_lingers(pid: int, since: float, wait: float = 5.0) -> bool:
    """After clone3(set_tid) said EEXIST: is pid held only by what is dying (a zombie of the
    killed source, or its number still a session or group id of such zombies, which pid 1
    reaps when it gets to it)? Then wait a little and say so (the caller tries again); a live
    process with that pid: no."""
    try:
        if procfs.stat_fields(pid)[3] not in ("Z", "X"):
            return False
    except ProcessGone:
        pass
    if time.monotonic() - since > wait:
        return False
    time.sleep(0.01)
    return True


class Husk(HuskMemory, HuskState):
    # the root of a tree in a new pid namespace (and with it a new mount namespace): it
    # mounts a /proc of that namespace at the final step (mount_proc_calls)
    mounts_proc = False

    def __init__(self, host_pid: int, pid: int, init_pid: int | None):
        self.host_pid = host_pid          # pid in our namespace (ptrace, /proc)
        self.pid = pid                    # pid the restored process sees (the source's)
        self.init_pid = init_pid          # host pid of the pid namespace's init (root husk)
        self.parent: Husk | None = None   # the husk it was forked from (None: the root)
        self.tracee: Tracee | None = None
        self.threads: dict[int, Tracee] = {}   # the other threads, by the tid they stand for
        self.remote: RemoteSyscalls | None = None
        self.mem_fd = -1
        self.source_mem_fd = -1           # /proc/PID/mem of a same-host source (direct pages)
        self.skipped = 0                  # bytes the running source unmapped before we read them
        self.layout: list[Vma] = []       # memory VMAs as applied so far (no special ones)
        self.fds: set[int] = set()        # fds open in the husk (to predict openat results)
        self.prepared = False
        self.resumed = False
        self.leads_session = False        # only lead_session() makes a husk lead one
        self.ctty = -1                    # the source's pty number its controlling terminal is
        # the tree's System V IPC (restore/sysvipc.IpcPlace: its segments' sizes and
        # read-only attachments), shared by the tree's husks
        self.sysv = None
        self._ignored: int | None = None  # the signals it ignores (HuskState.ignored_signals)
        # what it shares with its parent husk (CLONE_FILES, CLONE_FS: fork_child), and the
        # husk of the tree that first had that fd table / fs (None: its own)
        self.shares = 0
        self.files_leader: Husk | None = None
        self.fs_leader: Husk | None = None
        # the last round's carried VmFlags (AddressSpaceRound.vmflags): advice and locks are
        # given in apply_state, once every child husk is forked (DONTFORK, WIPEONFORK)
        self.vmflags: list[tuple[int, int, int]] = []
        # the source unmapped its [vdso]: the husk keeps its own specials out of the way until
        # apply_state drops them (their current (start, end) by name)
        self.drop_specials: dict[str, tuple[int, int]] = {}

    # ---- birth ------------------------------------------------------------------------------

    @classmethod
    def spawn(cls, pid: int, *, pidns: bool, cgroup_fd: int = -1) -> "Husk":
        """A husk that will have `pid`: in our pid namespace (the pid must be free), or as that
        pid inside a new pid namespace whose init is a second husk program. Either is spawned
        leading a session of its own (native.spawn): nothing of the restored tree shares the
        restoring tool's session or process group."""
        if not pidns and not _pid_free(pid):
            raise PidTaken(f"pid {pid} is in use on this host: cannot restore with the same pid "
                           "(use --pidns to restore inside a new pid namespace)")
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        try:
            prog = husk_program()
            init = None
            if pid == 1:       # the root is its namespace's init: pid 1 of a new one, no helper
                host_pid = native.spawn(prog, [prog, "husk", "1"], [], True, wfd,
                                        cgroup_fd)
            elif pidns:
                init = native.spawn(prog, [prog, "init", str(pid)], [], True, wfd, cgroup_fd)
                host_pid = None
            else:
                t0 = time.monotonic()
                while True:
                    try:
                        host_pid = native.spawn(prog, [prog, "husk", str(pid)], [pid], False,
                                                wfd, cgroup_fd)
                        break
                    except KernelCallError as e:
                        if e.errno != errno.EEXIST:
                            raise
                        if not _pid_lingers(pid, t0):
                            raise PidTaken(f"pid {pid} is in use on this host") from None
            os.close(wfd)
            wfd = -1
            if not cls._wait_ready(rfd, 10.0):
                status = cls._reap(init or host_pid)
                if status is not None and os.WIFEXITED(status) and \
                        os.WEXITSTATUS(status) == 126:          # native pr_spawn
                    raise RestoreError(f"husk for pid {pid}: cannot make /proc a slave mount in "
                                       "its new mount namespace (mount --make-rslave /proc)")
                raise RestoreError(f"husk for pid {pid} did not start (exit status {status})")
        finally:
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)
        if init:
            kids = procfs.children(init)
            if len(kids) != 1:
                cls._reap(init)
                raise RestoreError(f"pid namespace init {init} has no husk child")
            host_pid = kids[0]
        husk = cls(host_pid, pid, init)
        husk.leads_session = init is None            # else it is in its init's session
        husk.mounts_proc = pidns or pid == 1
        try:
            husk.tracee = Tracee(host_pid, exitkill=True)
            husk.tracee.stop()
            husk.mem_fd = procfs.open_file(host_pid, "mem", os.O_RDWR)
        except BaseException:
            husk.kill()
            raise
        return husk

    @staticmethod
    def _wait_ready(rfd: int, timeout: float) -> bool:
        """The husk writes "R" and then closes the pipe once its fd table is empty: wait for
        both, so that it holds no fd of its own when we take over."""
        deadline = time.monotonic() + timeout
        got = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([rfd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(rfd, 16)
            if not chunk:
                return got == b"R"
            got += chunk
        return False

    @staticmethod
    def _reap(pid: int | None) -> int | None:
        if not pid:
            return None
        try:
            os.kill(pid, SIGKILL)
        except ProcessLookupError:
            pass
        try:
            return os.waitpid(pid, 0)[1]
        except ChildProcessError:
            return None

    def fork_child(self, pid: int, exit_signal: int = SIGCHLD, shares: int = 0) -> "Husk":
        """A child process of this husk with `pid` (in this husk's pid namespace), made by an
        injected clone3 without CLONE_VM: it starts as a copy of this husk, memory included
        (shared copy-on-write, which is how a restored tree keeps the pages its processes
        share), parked in the thread starter with every signal blocked. shares: CLONE_FILES
        and/or CLONE_FS, to share this husk's fd table or root, working directory and umask,
        as the source's child did (filled by the first of them that apply_state reaches)."""
        sc = self.remote.scratch
        native.set_options(self.host_pid, lib.PTRACE_O_EXITKILL | lib.PTRACE_O_TRACECLONE |
                           lib.PTRACE_O_TRACEFORK)
        starter = sc.addr + self.STARTER_OFFSET
        native.write_mem(self.host_pid, starter, native.thread_starter_code())
        tid_slot, args = sc.data_addr, sc.data_addr + 64
        native.write_mem(self.host_pid, tid_slot, struct.pack("=i", pid))
        native.write_mem(self.host_pid, args, struct.pack(
            "=11Q", shares, 0, 0, 0, exit_signal, 0, 0, 0, tid_slot, 1, 0))
        saved = self.tracee.regs()
        t0 = time.monotonic()
        try:
            while True:
                try:
                    host_pid = native.clone_thread(self.host_pid, starter, args, 88)
                    break
                except KernelCallError as e:
                    if e.errno != errno.EEXIST:
                        raise
                    # a source just killed may linger as a zombie until it is reaped: in our
                    # own pid namespace, give that the moment the root gets (_pid_free)
                    if self.host_pid != self.pid or not _pid_lingers(pid, t0):
                        raise PidTaken(f"pid {pid} is in use: cannot restore that process with "
                                       "its pid (use --pidns to restore inside a new pid "
                                       "namespace)") from None
        finally:
            self.tracee.set_regs(saved)
        child = Husk(host_pid, pid, None)
        child.parent = self
        child.tracee = Tracee.adopt(host_pid)
        try:
            child.mem_fd = procfs.open_file(host_pid, "mem", os.O_RDWR)
            native.set_options(host_pid, lib.PTRACE_O_EXITKILL)
        except BaseException:
            child.kill()
            raise
        child.remote = self.remote.forked(child.tracee)
        child.layout = list(self.layout)
        child.drop_specials = dict(self.drop_specials)
        child.fds = set(self.fds)
        child.sysv = self.sysv
        child.prepared = True
        child.shares = shares
        if shares & lib.CLONE_FILES:
            child.files_leader = self.files_leader or self
        if shares & lib.CLONE_FS:
            child.fs_leader = self.fs_leader or self
        return child

    def unshare(self, flags: int) -> None:
        """Stop sharing (CLONE_FILES, CLONE_FS) what it was forked sharing with its parent:
        the source's process did since (unshare, exec). Before apply_state: a copy of an fd
        table the husks have not filled yet."""
        self.remote.call(lib.SYS_unshare, flags)
        self.shares &= ~flags
        if flags & lib.CLONE_FILES:
            self.files_leader = None
        if flags & lib.CLONE_FS:
            self.fs_leader = None

    def lead_session(self) -> None:
        """setsid(): it leads a session, as the source did (before it forks any child)."""
        self.remote.call(lib.SYS_setsid)
        self.leads_session = True

    def take_ctty(self, number: int, slave_path: str) -> None:
        """Make the slave at slave_path (a new pair standing for the source's /dev/pts/number)
        its controlling terminal: it leads a session (lead_session) and has not forked yet, so
        every husk of its session is forked with it, as the source's processes were."""
        fd = self._lowest_free_fd()
        b = self.remote.batch()
        b.call(lib.SYS_openat, lib.AT_FDCWD, b.put_str(slave_path),
               os.O_RDWR | lib.O_NOCTTY | lib.O_CLOEXEC, label=f"openat {slave_path}")
        b.call(lib.SYS_ioctl, fd, lib.TIOCSCTTY, 0, label=f"ioctl(TIOCSCTTY) {slave_path}")
        b.call(lib.SYS_close, fd)
        results = self.remote.run(b)
        if results[0] != fd:
            raise RestoreError(f"husk {b.labels[0]} returned fd {results[0]}, expected {fd}")
        self.ctty = number

    def join_ipc_namespace(self, pid: int) -> None:
        """setns() into the IPC namespace of process pid (a source on this host): its System
        V objects are then the very ones the tree had. Before it maps anything."""
        path = f"/proc/{pid}/ns/ipc"
        fd = self._lowest_free_fd()
        b = self.remote.batch()
        b.call(lib.SYS_openat, lib.AT_FDCWD, b.put_str(path), os.O_RDONLY | lib.O_CLOEXEC,
               label=f"openat {path}")
        b.call(lib.SYS_setns, fd, lib.CLONE_NEWIPC, label=f"setns {path}")
        b.call(lib.SYS_close, fd)
        results = self.remote.run(b)
        if results[0] != fd:
            raise RestoreError(f"husk {b.labels[0]} returned fd {results[0]}, expected {fd}")

    def new_ipc_namespace(self) -> None:
        """unshare(CLONE_NEWIPC): the tree's System V objects are made in a namespace of its
        own, where their ids are free. Before it maps anything; its children inherit it."""
        self.remote.call(lib.SYS_unshare, lib.CLONE_NEWIPC)

    def join_group(self, pgid: int) -> None:
        """setpgid(0, pgid) in the husk: pgid is a pid as the restored tree sees it."""
        self.remote.call(lib.SYS_setpgid, 0, pgid)

    def become_zombie(self, z: Zombie) -> None:
        """End as the source's zombie did: exit with its status (or die of its signal) and
        stay unreaped for its parent. We trace it, so we collect its exit first: the kernel
        then reports it to its real parent, the parent husk."""
        if z.sid == z.pid:
            self.lead_session()
        if z.pgid == z.pid:
            self.join_group(0)
        sig = z.exit_code & 0x7F
        if sig == SIGKILL:
            # it acts at once, on a stopped tracee too; its exit is ours to collect first
            os.kill(self.host_pid, SIGKILL)
            wait_exit(self.host_pid)
            self.tracee.attached = False
        elif sig:
            # Its death by that signal: the husk may ignore it (dispositions its spawner
            # ignored across exec: Python ignores SIGPIPE and SIGXFSZ, a shell's background
            # job SIGINT), and must not dump a core (of the parent husk's memory; the
            # source's core, if any, is refused by name before the freeze: tree_problems)
            b = self.remote.batch()
            b.call(lib.SYS_rt_sigaction, sig, b.put(KSIGACTION.pack(0, 0, 0, 0)), 0, 8,
                   label=f"rt_sigaction({sig}, SIG_DFL)")
            b.call(lib.SYS_prctl, lib.PR_SET_DUMPABLE, 0)
            self.remote.run(b)
            # A signal given with PTRACE_DETACH is only delivered from a signal-delivery stop,
            # and the husk is in a ptrace-event stop: it would be dropped (the husk went on
            # living). Queued before the detach, it is delivered as the husk runs on.
            self.tracee.set_sigmask(0)
            os.kill(self.host_pid, sig)
            native.detach(self.host_pid)           # no longer ours: its parent gets it
            self.tracee.attached = False
            deadline = time.monotonic() + 5
            while self._alive():
                if time.monotonic() > deadline:
                    raise RestoreError(f"the zombie {self.pid} (signal {sig}) did not die")
                time.sleep(0.001)
        else:
            try:
                self.remote.call(lib.SYS_exit_group, z.exit_code >> 8 & 0xFF, check=False)
            except KernelCallError:
                pass                                 # it exits: no trap to report
            wait_exit(self.host_pid)
            self.tracee.attached = False
        self.close()

    def _alive(self) -> bool:
        try:
            return procfs.stat_fields(self.host_pid)[3] not in ("Z", "X")
        except ProcessGone:
            return False

    def reap_child(self, child: "Husk") -> None:
        """Collect a removed child husk's zombie in this husk (an injected wait4), so that the
        pid is free again and this husk has no child the source does not have."""
        for _ in range(500):
            got = self.remote.call(lib.SYS_wait4, child.pid, 0, WALL | os.WNOHANG, 0,
                                   check=False)
            if got != 0:
                return
            time.sleep(0.002)

    # ---- placement ---------------------------------------------------------------------------

    def pin(self, cpu: int) -> None:
        """Run on `cpu` from now on, like its tracer: see SourceSession.dump."""
        os.sched_setaffinity(self.host_pid, {cpu})

    def _lowest_free_fd(self) -> int:
        fd = 0
        while fd in self.fds:
            fd += 1
        return fd

    # ---- threads ------------------------------------------------------------------------------

    STARTER_OFFSET = 128       # in the scratch area: the runner is at 0, its table at 256

    def sync_threads(self, tids: list[int]) -> None:
        """Have exactly the source's threads: create the new ones, end those that exited."""
        wanted = set(tids) - {self.pid}
        for tid in [t for t in self.threads if t not in wanted]:
            self._end_thread(tid)
        self._create_threads(sorted(wanted - set(self.threads)))

    def _end_thread(self, tid: int) -> None:
        """A staged thread whose source thread exited: it makes an exit(0) of its own."""
        t = self.threads.pop(tid)
        try:
            self.remote.sharing(t).call(lib.SYS_exit, 0, check=False)
        except KernelCallError:
            pass                                      # it exits: no trap to report
        wait_exit(t.pid)                              # we trace it: collect it
        t.attached = False

    def _create_threads(self, tids: list[int]) -> None:
        """Threads with these exact tids (glibc caches them), parked in the starter until
        resume with all signals blocked."""
        if not tids:
            return
        sc = self.remote.scratch
        native.set_options(self.host_pid, lib.PTRACE_O_EXITKILL | lib.PTRACE_O_TRACECLONE)
        starter = sc.addr + self.STARTER_OFFSET
        native.write_mem(self.host_pid, starter, native.thread_starter_code())
        flags = lib.CLONE_VM | lib.CLONE_FS | lib.CLONE_FILES | lib.CLONE_SIGHAND | \
            lib.CLONE_THREAD | lib.CLONE_SYSVSEM
        stack, tid_slot, args = sc.addr + sc.size - 4096, sc.data_addr, sc.data_addr + 64
        saved = self.tracee.regs()
        try:
            for tid in tids:
                # struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack,
                # stack_size, tls, set_tid, set_tid_size, cgroup
                native.write_mem(self.host_pid, tid_slot, struct.pack("=i", tid))
                native.write_mem(self.host_pid, args, struct.pack(
                    "=11Q", flags, 0, 0, 0, 0, stack, 4096, 0, tid_slot, 1, 0))
                try:
                    host_tid = native.clone_thread(self.host_pid, starter, args, 88)
                except KernelCallError as e:
                    if e.errno == errno.EEXIST:
                        raise PidTaken(f"thread id {tid} is in use: cannot restore that "
                                       "thread with its id") from None
                    raise
                self.threads[tid] = Tracee.adopt(host_tid)
        finally:
            self.tracee.set_regs(saved)

    # ---- death ------------------------------------------------------------------------------

    def kill(self) -> None:
        """Remove the husk (and its namespace) now; safe to call at any point."""
        for pid in (self.host_pid, self.init_pid):
            if pid:
                try:
                    os.kill(pid, SIGKILL)
                except ProcessLookupError:
                    pass
        # We trace the husk's threads: their exits are ours to collect first (a thread-group
        # leader is reported only after every other thread), and a namespace init waits for
        # its children to be collected before it can die.
        if self.tracee and self.tracee.attached:
            self._collect_traced_exits()
            self.tracee.attached = False
        for t in self.threads.values():
            t.attached = False
        self._reap(self.init_pid or self.host_pid)
        self.close()

    def _collect_traced_exits(self, timeout: float = 5.0) -> None:
        wall, nohang = 0x40000000, os.WNOHANG
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                tids = set(procfs.threads(self.host_pid))
            except ProcessGone:
                tids = set()
            for tid in tids | {t.pid for t in self.threads.values()} - {self.host_pid}:
                try:
                    os.waitpid(tid, wall | nohang)
                except ChildProcessError:
                    pass
            try:
                # A report of a stop it had pending when it was killed (a tracee's stop is
                # reported to its tracer without WUNTRACED) is not its exit: only the exit
                # lets a namespace init, which waits for it, die (then _reap would wait
                # for that init forever).
                pid, status = os.waitpid(self.host_pid, wall | nohang)
                if pid == self.host_pid and not os.WIFSTOPPED(status):
                    return
            except ChildProcessError:
                return
            time.sleep(0.005)

    def close(self) -> None:
        for fd in (self.mem_fd, self.source_mem_fd):
            if fd >= 0:
                os.close(fd)
        self.mem_fd = self.source_mem_fd = -1
