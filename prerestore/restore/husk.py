"""A husk: a frozen process that becomes the restored one.

Lifecycle: spawn() starts the husk program with the source's pid (directly, or inside a fresh pid
namespace) and seizes it; prepare() clears its own mappings and moves its [vvar]/[vdso] to the
source's addresses; apply_round() makes its address space follow each round; apply_state() and
resume() finish it. kill() at any point removes it (and its pid namespace) without a trace.

The husk executes nothing of the target until resume(): every change is made through system calls
injected in batches (see kernel.tracee.RemoteSyscalls) and page writes from outside."""
from __future__ import annotations

import errno
import os
import secrets
import select
import socket
import struct
import time
from importlib import resources

from ..errors import KernelCallError, PidTaken, ProcessGone, RestoreError
from ..faults import maybe_fail
from ..image import schema
from ..kernel import native, procfs, vmflags
from ..kernel.native import lib
from ..kernel.tracee import KSIGACTION, STACK_T, RemoteSyscalls, Tracee
from ..kernel.sysvipc import SHM_RDONLY, SHM_REMAP
from ..model import (AddressSpaceRound, FileDescriptor, ProcessState, Vma, Zombie, diff_layout,
                     free_area, mapped_vmas, memory_vmas, merge_ranges, ranges_bytes, unpack_ranges,
                     PROT_READ, PROT_WRITE, VMFLAG_BITS, vmflags_default)

SPECIAL_ORDER = ("[vvar]", "[vvar_vclock]", "[vdso]")
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
WALL = 0x40000000                         # __WALL: wait for any kind of child
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


def wait_exit(pid: int) -> None:
    """Collect the exit of a task we trace. A stop it had pending is reported to its tracer
    first (without WUNTRACED): that report is not the exit, wait on."""
    while True:
        try:
            if not os.WIFSTOPPED(os.waitpid(pid, WALL)[1]):
                return
        except ChildProcessError:
            return


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


class Husk:
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

    # ---- the empty shell --------------------------------------------------------------------

    def prepare(self, source_layout: list[Vma]) -> None:
        """Unmap the husk's own program and stack and put [vvar]/[vvar_vclock]/[vdso] exactly
        where the source has them (glibc caches vdso pointers)."""
        own = procfs.maps(self.host_pid)
        specials = {v.path: v for v in own if v.path in SPECIAL_ORDER}
        wanted = {v.path: v for v in source_layout if v.path in SPECIAL_ORDER}
        if not wanted and "[vdso]" in specials:
            self._prepare_without_vdso(own, specials, source_layout)
            return
        if set(specials) != set(wanted) or any(
                specials[n].size != wanted[n].size for n in wanted):
            raise RestoreError("the source's [vvar]/[vdso] layout differs from this host's "
                               f"(source {sorted((n, v.size) for n, v in wanted.items())}, here "
                               f"{sorted((n, v.size) for n, v in specials.items())}): a "
                               "different kernel?")
        vdso = specials["[vdso]"]
        self.remote = RemoteSyscalls(self.tracee, (vdso.start, vdso.end))
        self.remote.map_scratch(free_area([own, source_layout], RemoteSyscalls.SCRATCH_SIZE))
        b = self.remote.batch()
        for v in own:
            if not v.is_special:
                b.call(lib.SYS_munmap, v.start, v.size)
        names = [n for n in SPECIAL_ORDER if n in wanted]
        lo, hi = min(specials[n].start for n in names), max(specials[n].end for n in names)
        tlo = min(wanted[n].start for n in names)
        thi = max(wanted[n].end for n in names)
        if any(wanted[n].start - tlo != specials[n].start - lo for n in names):
            raise RestoreError("the source's [vvar]/[vdso] are not laid out like this host's")
        hops = []
        if lo < thi and tlo < hi and lo != tlo:     # overlapping moves go through a free area
            hops.append(free_area([own, source_layout,
                                   [Vma(self.remote.scratch.addr, self.remote.scratch.addr +
                                        self.remote.scratch.size, 0, False, 0, "")]], hi - lo))
        hops.append(tlo)
        cur = lo
        for dest in hops:
            if dest == cur:
                continue
            for n in names:
                s = specials[n]
                b.call(lib.SYS_mremap, cur + s.start - lo, s.size, s.size,
                       lib.MREMAP_MAYMOVE | lib.MREMAP_FIXED, dest + s.start - lo)
            cur = dest
        self.remote.run(b)
        self.remote.rebase(lo, cur)
        self.layout = []
        self.prepared = True

    def _prepare_without_vdso(self, own: list[Vma], specials: dict[str, Vma],
                              source_layout: list[Vma]) -> None:
        """A source that unmapped its [vdso] and [vvar]: the husk keeps its own (its injected
        calls use the vdso's syscall instruction) where the source has nothing, and drops
        them at the end of apply_state."""
        vdso = specials["[vdso]"]
        self.remote = RemoteSyscalls(self.tracee, (vdso.start, vdso.end))
        self.remote.map_scratch(free_area([own, source_layout], RemoteSyscalls.SCRATCH_SIZE))
        b = self.remote.batch()
        for v in own:
            if not v.is_special:
                b.call(lib.SYS_munmap, v.start, v.size)
        self.remote.run(b)
        self.drop_specials = {n: (v.start, v.end) for n, v in specials.items()}
        self.layout = []
        self._ensure_specials_clear_of(source_layout)
        self.prepared = True

    def _ensure_specials_clear_of(self, layout: list[Vma]) -> None:
        """The husk's own [vvar]/[vdso], kept for a source without them, moved out of the way
        of the source's mappings (they move together: the vdso finds its data at a fixed
        distance)."""
        if not self.drop_specials:
            return
        lo = min(s for s, _ in self.drop_specials.values())
        hi = max(e for _, e in self.drop_specials.values())
        if not any(v.start < hi and lo < v.end for v in layout):
            return
        sc = self.remote.scratch
        dest = free_area([layout, self.layout, [Vma(sc.addr, sc.addr + sc.size, 0, False, 0, "")],
                          [Vma(lo, hi, 0, False, 0, "")]], hi - lo)
        b = self.remote.batch()
        for name in SPECIAL_ORDER:
            if name in self.drop_specials:
                s, e = self.drop_specials[name]
                b.call(lib.SYS_mremap, s, e - s, e - s, lib.MREMAP_MAYMOVE | lib.MREMAP_FIXED,
                       dest + s - lo)
        self.remote.run(b)
        self.remote.rebase(lo, dest)
        self.drop_specials = {n: (s - lo + dest, e - lo + dest)
                              for n, (s, e) in self.drop_specials.items()}

    def _drop_specials(self) -> None:
        """The end of a husk whose source has no [vdso]: unmap its own, and run the last
        injected calls from a syscall instruction of the restored program's code."""
        b = self.remote.batch()
        for s, e in self.drop_specials.values():
            b.call(lib.SYS_munmap, s, e - s, label=f"munmap the husk's own special {s:#x}")
        self.remote.run(b)
        for v in self.layout:
            if v.prot & 4 and not v.shared:                  # PROT_EXEC
                try:
                    self.remote.insn = native.find_syscall_insn(self.host_pid, v.start, v.end)
                    break
                except KernelCallError:
                    continue
        else:
            raise RestoreError(f"process {self.pid} has no [vdso] and no syscall instruction "
                               "in its code: nowhere to run the last calls from")
        self.drop_specials = {}

    def _ensure_scratch_clear_of(self, layout: list[Vma]) -> None:
        sc = self.remote.scratch
        if any(v.start < sc.addr + sc.size and sc.addr < v.end for v in layout):
            new = free_area([layout, self.layout], sc.size)
            self.remote.call(lib.SYS_mremap, sc.addr, sc.size, sc.size,
                             lib.MREMAP_MAYMOVE | lib.MREMAP_FIXED, new)
            sc.addr = new

    # ---- rounds -----------------------------------------------------------------------------

    def apply_round(self, task: AddressSpaceRound, round_dir: str) -> dict:
        """Make the husk's memory equal to the source's at this round."""
        t0 = time.perf_counter()
        maybe_fail("stage")
        self._ensure_scratch_clear_of(task.layout)
        self._ensure_specials_clear_of(task.layout)
        new = mapped_vmas(task.layout)
        d = diff_layout(self.layout, new)
        fresh_ranges = merge_ranges([(v.start, v.end) for v in d.fresh] + unpack_ranges(task.fresh))
        pieces = []
        for v in new:
            for s, e in fresh_ranges:
                s, e = max(s, v.start), min(e, v.end)
                if s < e:
                    pieces.append((v.piece(s, e), v))
        b = self.remote.batch()
        for s, e in d.unmap:
            b.call(lib.SYS_munmap, s, e - s)
        fd = self._lowest_free_fd()
        self.vmflags = task.vmflags
        flags = {(s, e): bits for s, e, bits in task.vmflags}
        for v, whole in pieces:
            if b.room() < self.MAP_DATA_ROOM:
                # tens of thousands of file mappings put more paths than one scratch area
                # holds: run what we have, in order, and go on in a new batch
                self._check_mmaps(b, self.remote.run(b))
                b = self.remote.batch()
            self._map(b, v, whole, fd, task,
                      flags.get((whole.start, whole.end), vmflags_default(whole, 0)))
        for v in d.reprotect:
            b.call(lib.SYS_mprotect, v.start, v.size, v.prot)
        if len(b):
            results = self.remote.run(b)
            self._check_mmaps(b, results)
        t_layout = time.perf_counter()
        nbytes = forced = 0
        populating = self._start_populating(task, [v for v, _ in pieces if not v.shared])
        try:
            if task.pages and task.pages_from == "pid":
                nbytes, forced = self._copy_from_source(task)
            elif task.pages:
                with schema.open_pages(os.path.join(round_dir, schema.PAGES_FILE),
                                       task.pages_offset + ranges_bytes(task.pages)) as f:
                    nbytes, forced = native.load_pages(self.host_pid, self.mem_fd, f.fileno(),
                                                       task.pages_offset, task.pages)
        finally:
            if populating:
                populating.finish()     # errors (a range it could not populate) do not matter
        t_pages = time.perf_counter()
        if task.zap:
            b = self.remote.batch()
            for s, e in unpack_ranges(task.zap):
                b.call(lib.SYS_madvise, s, e - s, lib.MADV_DONTNEED)
            self.remote.run(b)
        self.layout = new
        t_threads = time.perf_counter()
        if task.tids:
            self.sync_threads(task.tids)
        threads_ms = (time.perf_counter() - t_threads) * 1e3
        return {"threads_ms": threads_ms, "threads": len(self.threads) + 1, "vma_ops": len(d.unmap) + len(pieces) + len(d.reprotect),
                "pages": nbytes // 4096, "bytes": nbytes, "forced_bytes": forced,
                "layout_ms": (t_layout - t0) * 1e3, "pages_ms": (t_pages - t_layout) * 1e3,
                "apply_ms": (time.perf_counter() - t0) * 1e3}

    MAP_DATA_ROOM = 8192        # batch data one _map may put: a path (PATH_MAX 4096) and more
    POPULATE_FROM = 64 << 20    # bytes of fresh pages in a round worth populating ahead

    def _start_populating(self, task: AddressSpaceRound, pieces: list[Vma]):
        """For a large round into fresh mappings (round 0), let the husk fault its pages in
        itself (MADV_POPULATE_WRITE) while we copy: first-touch faults are the slow half of
        the copy, and faulting in-process is faster than through process_vm_writev. Only
        pages the source has are populated, so the RSS stays the source's."""
        writable = [(v.start, v.end) for v in pieces if v.prot & PROT_WRITE]
        if not writable or not task.pages:
            return None
        todo, total = [], 0
        for s, e in unpack_ranges(task.pages):
            for ws, we in writable:
                lo, hi = max(s, ws), min(e, we)
                if lo < hi:
                    todo.append((lo, hi))
                    total += hi - lo
        if total < self.POPULATE_FROM or len(todo) > self.remote.scratch.max_calls:
            return None
        b = self.remote.batch()
        for s, e in todo:
            b.call(lib.SYS_madvise, s, e - s, lib.MADV_POPULATE_WRITE)
        return self.remote.start(b)

    def _copy_from_source(self, task: AddressSpaceRound) -> tuple[int, int]:
        """Pages straight from the live source process (same host). A range the source
        unmapped since its round was scanned is written as zeros: the next round's layout
        drops it."""
        if self.source_mem_fd < 0:
            self.source_mem_fd = procfs.open_file(task.source_pid or task.pid, "mem",
                                                  os.O_RDONLY)
        nbytes, forced, self.skipped = native.copy_pages(task.source_pid or task.pid,
                                                         self.source_mem_fd,
                                                         self.host_pid, self.mem_fd, task.pages)
        return nbytes, forced

    def pin(self, cpu: int) -> None:
        """Run on `cpu` from now on, like its tracer: see SourceSession.dump."""
        os.sched_setaffinity(self.host_pid, {cpu})

    def verify_against(self, source_pid: int, layout: list[Vma]) -> list[tuple[int, str]]:
        """Debugging oracle (PRERESTORE_VERIFY=1): with the source frozen on this host,
        compare every readable private page of the husk with the source's. Returns the
        differing pages as (address, VMA description)."""
        diffs: list[tuple[int, str]] = []
        src_mem = procfs.open_file(source_pid, "mem", os.O_RDONLY)
        try:
            for v in memory_vmas(layout, shmem=True):
                for a in range(v.start, v.end, 8 << 20):
                    n = min(8 << 20, v.end - a)
                    try:
                        mine = os.pread(self.mem_fd, n, a)
                        theirs = os.pread(src_mem, n, a)
                    except OSError:
                        continue
                    if mine != theirs:
                        for off in range(0, n, 4096):
                            if mine[off:off + 4096] != theirs[off:off + 4096]:
                                zero = mine[off:off + 4096].count(0) == 4096
                                diffs.append((a + off, f"{v.start:x}-{v.end:x} {v.perms()} "
                                                       f"{v.path} husk-{'zero' if zero else 'stale'}"))
        finally:
            os.close(src_mem)
        return diffs

    def _lowest_free_fd(self) -> int:
        fd = 0
        while fd in self.fds:
            fd += 1
        return fd

    def _map(self, b, v: Vma, whole: Vma, fd: int, task: AddressSpaceRound, bits: int) -> None:
        """The calls that map piece v of the source's VMA `whole` anew (fd: where an openat
        lands). A shared memory object is the source's own one on the same host (opened
        through /proc/PID/map_files), else a new one of its kind whose pages the rounds carry.
        bits: whole's carried VmFlags; those fixed at mmap time are given here: MAP_NORESERVE,
        MAP_DROPPABLE, a shared mapping's file opened for writing when the program may raise
        its protection to PROT_WRITE (mw), and VM_ACCOUNT of a private mapping made writable
        first (ac: mapped writable, then given its protection, as a library's RELRO is)."""
        flags = lib.MAP_FIXED | (lib.MAP_SHARED if v.shared else lib.MAP_PRIVATE)
        if bits & VMFLAG_BITS["nr"]:
            flags |= lib.MAP_NORESERVE
        if bits & VMFLAG_BITS["dp"]:
            flags = lib.MAP_FIXED | vmflags.MAP_DROPPABLE
        writable = v.shared and (v.prot & PROT_WRITE or bits & VMFLAG_BITS["mw"])
        prot = v.prot
        if bits & VMFLAG_BITS["ac"] and not v.shared and not v.prot & PROT_WRITE:
            prot |= PROT_WRITE
        if v.is_sysv:
            self._attach(b, v, task.layout)
            return
        deleted = v.is_file and v.path.endswith(" (deleted)")
        if (v.is_shmem or deleted) and task.pages_from == "pid":
            # the very object: a shared memory object, or a file deleted while mapped, which
            # has no other name to open it by
            path = f"/proc/{task.source_pid or task.pid}/map_files/{whole.start:x}-{whole.end:x}"
            b.call(lib.SYS_openat, lib.AT_FDCWD, b.put_str(path),
                   (os.O_RDWR if writable else os.O_RDONLY) | lib.O_CLOEXEC,
                   label=f"openat {path} ({v.path})")
        elif v.is_shmem and v.path.startswith("/memfd:"):
            name = v.path[len("/memfd:"):-len(" (deleted)")]
            b.call(lib.SYS_memfd_create, b.put_str(name), lib.MFD_CLOEXEC,
                   label=f"memfd_create {name}")
            b.call(lib.SYS_ftruncate, fd, v.offset + v.size)
        elif v.is_shmem:                           # MAP_SHARED | MAP_ANONYMOUS
            b.call(lib.SYS_mmap, v.start, v.size, v.prot, flags | lib.MAP_ANONYMOUS, -1, 0)
            return
        elif v.is_file:
            mode = os.O_RDWR if writable else os.O_RDONLY
            b.call(lib.SYS_openat, lib.AT_FDCWD, b.put_str(v.path), mode | lib.O_CLOEXEC,
                   label=f"openat {v.path}")
        else:
            flags |= lib.MAP_ANONYMOUS | (lib.MAP_GROWSDOWN if v.path == "[stack]" else 0)
            b.call(lib.SYS_mmap, v.start, v.size, prot, flags, -1, 0)
            if prot != v.prot:
                # anonymous memory made read-only before it has an anon_vma (no page was ever
                # faulted in) is uncharged again (mprotect_fixup): fault one in and drop it
                b.call(lib.SYS_madvise, v.start, 4096, lib.MADV_POPULATE_WRITE)
                b.call(lib.SYS_madvise, v.start, 4096, lib.MADV_DONTNEED)
                b.call(lib.SYS_mprotect, v.start, v.size, v.prot)
            return
        b.call(lib.SYS_mmap, v.start, v.size, prot, flags, fd, v.offset)
        b.call(lib.SYS_close, fd)
        if prot != v.prot:
            b.call(lib.SYS_mprotect, v.start, v.size, v.prot)

    def _attach(self, b, v: Vma, layout: list[Vma]) -> None:
        """The calls that attach piece v of a System V segment (its id is the inode the
        source's maps show; the husk is in the namespace where it has that id): shmat at its
        address, or, for a piece of an attachment (partly unmapped or moved), shmat in a
        free area, the piece moved into place and the rest detached."""
        shmid = v.inode
        size = self.sysv.sizes.get(shmid) if self.sysv else None
        if size is None:
            raise RestoreError(f"{v.start:#x}-{v.end:#x} attaches System V segment {shmid}, "
                               "which the image's IPC objects do not list")
        whole = -(-size // 4096) * 4096
        # attached as the source attached it (read-only or not: VmFlags mw, sh), then given
        # its protection (one made read-only, or PROT_NONE, or executable, since)
        readonly = (self.pid, v.start) in self.sysv.readonly
        flags = SHM_RDONLY if readonly else 0
        given = PROT_READ | (0 if readonly else PROT_WRITE)
        label = f"shmat segment {shmid} at {v.start:#x}"
        if v.offset == 0 and v.size == whole:
            b.call(lib.SYS_shmat, shmid, v.start, flags | SHM_REMAP, label=label)
        else:
            sc = self.remote.scratch
            scratch = Vma(sc.addr, sc.addr + sc.size, 0, False, 0, "")
            tmp = free_area([layout, self.layout, [scratch]], whole)
            b.call(lib.SYS_shmat, shmid, tmp, flags, label=label)
            b.call(lib.SYS_mremap, tmp + v.offset, v.size, v.size,
                   lib.MREMAP_MAYMOVE | lib.MREMAP_FIXED, v.start)
            b.call(lib.SYS_munmap, tmp, whole)
        if v.prot != given:
            b.call(lib.SYS_mprotect, v.start, v.size, v.prot)

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

    def _check_mmaps(self, b, results) -> None:
        for (nr, args), label, res in zip(b.calls, b.labels, results):
            if nr == lib.SYS_mmap and res != args[0]:
                raise RestoreError(f"husk mmap at {args[0]:#x} landed at {res:#x}")
            if nr == lib.SYS_shmat and res != args[1]:
                raise RestoreError(f"husk {label} landed at {res:#x}")
            if nr in (lib.SYS_openat, lib.SYS_memfd_create) and res != self._lowest_free_fd():
                raise RestoreError(f"husk {label} returned fd {res}, expected "
                                   f"{self._lowest_free_fd()}")

    # ---- the final state ----------------------------------------------------------------------

    STARTER_OFFSET = 128       # in the scratch area: the runner is at 0, its table at 256

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
        (an epoll shared between processes: see session.place_epoll_registrations). A
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
        effective set (else refused at the source: process.securebits_problem); the others
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
        (staged.make_deleted_dirs); fs: it sets the root, working directory and umask (of
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
        ignored = int(procfs.status(self.host_pid).get("SigIgn", "0"), 16)
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

    def _vmflag_calls(self, b, state: ProcessState) -> None:
        """Each area's madvise advice and locks (VmFlags dd dc wf hg nh mg, lo lf), then
        mlockall(MCL_FUTURE), in the main thread while the husk is still root: a lock never
        fails on RLIMIT_MEMLOCK here where the source's did not (the limit is carried and
        holds for what the program locks from now on)."""
        for start, end, bits in self.vmflags:
            for name, advice in vmflags.ADVICE.items():
                if bits & VMFLAG_BITS[name]:
                    b.call(lib.SYS_madvise, start, end - start, advice,
                           label=f"madvise({vmflags.ADVICE_NAMES[name]}) of {start:#x}-{end:#x}")
            if bits & VMFLAG_BITS["lf"]:
                b.call(vmflags.SYS_MLOCK2, start, end - start, vmflags.MLOCK_ONFAULT,
                       label=f"mlock2(MLOCK_ONFAULT) of {start:#x}-{end:#x}")
            elif bits & VMFLAG_BITS["lo"]:
                b.call(vmflags.SYS_MLOCK, start, end - start,
                       label=f"mlock of {start:#x}-{end:#x}")
        if state.mlock_future:
            b.call(vmflags.SYS_MLOCKALL, state.mlock_future,
                   label=f"mlockall({state.mlock_future:#x})")

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
