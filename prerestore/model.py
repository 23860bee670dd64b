"""The model of a checkpoint: plain dataclasses, no I/O.

A round describes one task's address space (its layout and the pages that changed); the final
round adds the CPU and kernel state needed to resume it. Addresses are ints; page ranges travel
as packed little-endian (start, end) u64 pairs (bytes), so per-page data never becomes Python
objects."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
SPECIAL_VMAS = ("[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]")
SHMEM_PREFIXES = ("/dev/zero ", "/memfd:", "/SYSV")
RANGE = struct.Struct("=QQ")
# A regular file's identity as the source saw it at the freeze: its size and modification time
# (ns), in the `data` of a "file" fd. Between hosts the device and inode differ even when both
# see the same file on shared storage; another copy of it shows another size or mtime.
FILE_IDENTITY = struct.Struct("=QQ")


# VmFlags (/proc/PID/smaps) a restore carries, as bits: madvise advice (dump, fork, wipe on
# fork, huge pages, KSM), locks (mlock, mlock2 MLOCK_ONFAULT), and how the mapping was made
# (MAP_NORESERVE; VM_ACCOUNT: charged to the commit limit; MAP_DROPPABLE; VM_MAYWRITE: a
# shared mapping whose protection may be raised to PROT_WRITE, its file open for writing)
VMFLAG_BITS = {"dd": 1, "dc": 2, "wf": 4, "hg": 8, "nh": 16, "mg": 32, "lo": 64, "lf": 128,
               "nr": 256, "ac": 512, "dp": 1024, "mw": 2048}
# the bits fixed when the mapping is made (mmap flags, or VM_ACCOUNT taken on by an mprotect
# that /proc/PID/maps shows): they change only with the layout
VMFLAG_MAPPING = VMFLAG_BITS["nr"] | VMFLAG_BITS["ac"] | VMFLAG_BITS["dp"] | VMFLAG_BITS["mw"]
VMFLAG_ALL = sum(VMFLAG_BITS.values())


def vmflags_default(v: "Vma", bits: int) -> int:
    """The carried VmFlags a plain mmap of v gives (see Husk._map): VM_MAYWRITE for a private
    mapping or a writable shared one; VM_ACCOUNT for a private writable mapping, unless
    MAP_NORESERVE."""
    if v.shared:
        return VMFLAG_BITS["mw"] if v.prot & PROT_WRITE else 0
    if v.prot & PROT_WRITE and not bits & VMFLAG_BITS["nr"]:
        return VMFLAG_BITS["mw"] | VMFLAG_BITS["ac"]
    return VMFLAG_BITS["mw"]


def vmflag_names(bits: int) -> str:
    return " ".join(n for n, b in VMFLAG_BITS.items() if bits & b)


class Vma(NamedTuple):
    """One line of /proc/PID/maps. A NamedTuple: parsing maps is on the downtime path, and
    building a frozen dataclass costs several times more per line."""
    start: int
    end: int
    prot: int
    shared: bool
    offset: int
    path: str          # "" for anonymous memory, "[heap]", "[stack]", "[vdso]"... or a file path
    inode: int = 0
    dev: str = "00:00"

    @property
    def is_file(self) -> bool:
        return self.inode != 0 and self.path.startswith("/")

    @property
    def is_shmem(self) -> bool:
        """Shared memory with no file of its own: MAP_SHARED|MAP_ANONYMOUS ("/dev/zero"),
        a memfd, or a System V segment ("/SYSV..."). Its pages live in the object."""
        return self.shared and (self.inode != 0 or self.path.startswith("/SYSV")) and \
            self.path.endswith(" (deleted)") and self.path.startswith(SHMEM_PREFIXES)

    @property
    def is_sysv(self) -> bool:
        """An attachment of a System V shared memory segment (shmat): "/SYSV<key> (deleted)",
        its inode the segment's id (which may be 0, the first id of an IPC namespace)."""
        return self.shared and self.path.startswith("/SYSV") and self.path.endswith(" (deleted)")

    @property
    def is_special(self) -> bool:
        return self.path in SPECIAL_VMAS

    @property
    def size(self) -> int:
        return self.end - self.start

    def backing(self) -> tuple:
        """What the memory is, independent of protection and of where the range is cut:
        two pieces with equal backing at the same address hold the same mapping."""
        if self.is_file or self.is_sysv:
            return ("file", self.shared, self.path, self.inode, self.offset - self.start)
        return ("anon", self.shared, self.path if self.path == "[stack]" else "")

    def piece(self, start: int, end: int) -> "Vma":
        off = self.offset + (start - self.start) if self.is_file or self.is_sysv else \
            self.offset
        return Vma(start, end, self.prot, self.shared, off, self.path, self.inode, self.dev)

    def perms(self) -> str:
        return ("r" if self.prot & PROT_READ else "-") + ("w" if self.prot & PROT_WRITE else "-") \
            + ("x" if self.prot & PROT_EXEC else "-") + ("s" if self.shared else "p")


@dataclass
class LayoutDiff:
    """How to turn one layout into another. Fresh pieces are mapped anew (their old content, if
    any, is gone); reprotected pieces keep their content and change protection only."""
    unmap: list[tuple[int, int]] = field(default_factory=list)
    fresh: list[Vma] = field(default_factory=list)
    reprotect: list[Vma] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.unmap or self.fresh or self.reprotect)


def diff_layout(old: list[Vma], new: list[Vma]) -> LayoutDiff:
    """Compare two sorted, non-overlapping layouts (special VMAs excluded) piece by piece."""
    d = LayoutDiff()
    if old == new:            # the common case, and the one on the downtime path
        return d
    # unmap: parts of old not covered by new
    for o in old:
        for s, e in _subtract((o.start, o.end), [(n.start, n.end) for n in new]):
            d.unmap.append((s, e))
    for n in new:
        covered = []
        for o in old:
            s, e = max(o.start, n.start), min(o.end, n.end)
            if s >= e:
                continue
            if o.backing() == n.backing():
                covered.append((s, e))
                if o.prot != n.prot:
                    d.reprotect.append(n.piece(s, e))
        for s, e in _subtract((n.start, n.end), covered):
            d.fresh.append(n.piece(s, e))
    return d


def _subtract(span: tuple[int, int], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, cur = [], span[0]
    for s, e in sorted(holes):
        if e <= cur or s >= span[1]:
            continue
        if s > cur:
            out.append((cur, s))
        cur = max(cur, e)
    if cur < span[1]:
        out.append((cur, span[1]))
    return out


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping or touching ranges joined."""
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def subtract_ranges(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """What of the ranges a is not in b."""
    out = []
    for span in a:
        out += _subtract(span, b)
    return out


def intersect_ranges(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The intersection of two sorted lists of disjoint ranges."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def memory_vmas(layout: list[Vma], shmem: bool = False) -> list[Vma]:
    """The VMAs whose pages we carry: private ones, not the kernel-provided special ones, and
    with `shmem` shared memory objects too (when they are recreated rather than handed over).
    Shared file mappings keep their pages in the file."""
    return [v for v in layout
            if not v.is_special and (not v.shared or (shmem and v.is_shmem and not (
                # a read-only attachment of a System V segment cannot be written through:
                # its content comes with the segment (source/sysvipc.py)
                v.is_sysv and not v.prot & PROT_WRITE)))]


def mapped_vmas(layout: list[Vma]) -> list[Vma]:
    """The VMAs a restored process maps itself: all but the kernel-provided special ones."""
    return [v for v in layout if not v.is_special]


def free_area(layouts: list[list[Vma]], size: int) -> int:
    """An address range of `size` free in every given layout, far from where things grow."""
    for base in range(0x100000000000, 0x700000000000, 0x10000000000):
        if all(not (v.start < base + size and base < v.end) for lay in layouts for v in lay):
            return base
    raise ValueError("no free address range for a scratch area")


def pack_ranges(ranges) -> bytes:
    return b"".join(RANGE.pack(s, e) for s, e in ranges)


def unpack_ranges(raw: bytes) -> list[tuple[int, int]]:
    return list(RANGE.iter_unpack(raw))


def ranges_bytes(raw: bytes) -> int:
    return sum(e - s for s, e in RANGE.iter_unpack(raw))


UNIX_STATES = ("unconnected", "listening", "connected", "pending", "reconnect", "peer-gone")


@dataclass
class UnixSocketState:
    """A unix socket as an image carries it, made anew by the restorer (restore/unixsock.py).

    state says how it is connected:
      unconnected  neither listening nor connected (bound or not);
      listening    listen(backlog); accept_queue: the clients (inodes, in the image) whose
                   connections wait to be accepted, in the order accept() returns them;
      connected    to `peer`, another socket of the image (a datagram socket: to the socket
                   it sends to by default); listener: the listening socket of the image it
                   was accepted from (it has that listener's name), 0 if none;
      pending      a client whose connection waits in the accept queue of `peer`, a
                   listening socket of the image (nothing was sent on it yet);
      reconnect    connected to a socket outside the tree through a name declared external
                   (peer_name): connected to that name again on restore, a new connection;
      peer-gone    (stream, seqpacket) its peer closed, or was outside the tree and reached
                   it through a name of ours declared external: what is queued is read, then
                   end of file; peer_name: the name the peer had (a client's, its listener's).
    queue holds the messages waiting to be read, as (sender's name, bytes); a stream's bytes
    are one message. Names are raw sun_path bytes: b"" unbound, b"\0..." abstract, else a
    path as it was bound (relative to `base`, the directory it resolved in, if relative)."""
    type: int                      # socket.SOCK_STREAM / SOCK_DGRAM / SOCK_SEQPACKET
    state: str                     # one of UNIX_STATES
    name: bytes = b""
    peer: int = 0
    listener: int = 0
    peer_name: bytes = b""
    backlog: int = 0
    accept_queue: list[int] = field(default_factory=list)
    shutdown: int = 0              # RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2
    queue: list[tuple[bytes, bytes]] = field(default_factory=list)
    base: str = ""
    file: tuple[int, int, int] | None = None   # its socket file, if it has one: mode, uid, gid
    sndbuf: int = 0                # as setsockopt takes them (half what getsockopt says)
    rcvbuf: int = 0
    passcred: bool = False
    peek_off: int = -1             # SO_PEEK_OFF, -1: not in use


@dataclass
class FileDescriptor:
    """An open fd: a regular file, a character device like /dev/null, an end of a pipe whose
    other end is in the tree too ("pipe": path "pipe:[inode]", offset is the pipe's capacity,
    and the pipe's first fd in the tree carries the bytes queued in it), a unix socket ("unix":
    its first fd in the tree carries its state in `unix`), a named FIFO ("fifo": likewise,
    data a msgpack map with its mode, owner and queued bytes), an end of a pty pair whose
    master is in the tree ("pty-master", "pty-slave": dev_inode (0, N) for /dev/pts/N; the
    first master fd carries the pair's state, see kernel.tty.PtyState), an inotify instance
    (data: its watches), an O_PATH fd of any inode that has a path ("path": opened again
    by its path with its flags, O_NOFOLLOW included), a pidfd of a process of the tree
    ("pidfd", see target_pid), or, on the same host, any object handed over as it is
    ("handover"), or an object outside the tree whose stand-in the restorer is given
    ("inherit": path is the object's name as /proc/PID/fd shows it on the source, e.g.
    "pipe:[1234]": restore --inherit-fd fd[N]:pipe:[1234]); see procfs and session for the
    other kinds. A regular file's data is its FILE_IDENTITY at the freeze (checked on the
    destination before the switch)."""
    fd: int
    kind: str          # "file" | "chr" | "pipe" | "fifo" | "unix" | "pty-master" | ... | "handover"
    path: str
    flags: int         # open flags as in fdinfo (O_ACCMODE, O_APPEND, O_CLOEXEC, ...)
    offset: int
    dev_inode: tuple[int, int] = (0, 0)
    # (pid, fd) of the first fd of the tree (in tree order, then fd order) that refers to the
    # same open file description (dup, inherited by fork): restored as that one, not reopened
    same_as: tuple[int, int] | None = None
    data: bytes = b""
    unix: UnixSocketState | None = None
    # who gets its SIGIO/SIGURG (fcntl F_GETOWN_EX: type F_OWNER_TID 0, F_OWNER_PID 1,
    # F_OWNER_PGRP 2, and the pid as the tree names it; (0, 0): none) and with which signal
    # (F_GETSIG; 0: SIGIO). Per open file description, read from inside the process (/proc
    # does not show them) and set again once every fd is in place.
    owner: tuple[int, int] = (0, 0)
    signal: int = 0
    # a pidfd ("pidfd"): the process (or, with PIDFD_THREAD in flags, the thread) it refers
    # to, a member of the tree, by the pid the tree names it (made again with pidfd_open)
    target_pid: int = 0
    # an epoll's registrations made under an fd number closed since, whose file this process
    # still holds under another: registered fd -> the fd that holds the file now (the husk
    # registers it from a dup under the old number, then closes the dup)
    closed_targets: dict[int, int] = field(default_factory=dict)


@dataclass
class MmFields:
    """The mm_struct fields PR_SET_MM_MAP restores (see /proc/PID/stat 26-28, 45-51)."""
    start_code: int
    end_code: int
    start_data: int
    end_data: int
    start_brk: int
    brk: int
    start_stack: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int


@dataclass
class SigAction:
    handler: int
    flags: int
    restorer: int
    mask: int


@dataclass
class PosixTimer:
    """A timer_create() timer, as /proc/PID/timers and timer_gettime() show it."""
    id: int
    clock: int
    signo: int
    value: int                  # sigev_value (the pointer-sized union)
    notify: int                 # SIGEV_SIGNAL, SIGEV_NONE, or either | SIGEV_THREAD_ID
    thread: int                 # SIGEV_THREAD_ID: the index in ProcessState.threads of its target
    interval: tuple[int, int]   # (s, ns)
    remaining: tuple[int, int]  # (s, ns) until it fires next; (0, 0): disarmed
    overrun: int = 0            # timer_getoverrun() at the freeze (not given back: see README)


@dataclass
class Credentials:
    """Who the process is: ids, groups, capability sets, no_new_privs (all its threads)."""
    uids: tuple[int, int, int]          # real, effective, saved
    gids: tuple[int, int, int]
    groups: list[int]
    cap_inheritable: int
    cap_permitted: int
    cap_effective: int
    cap_bounding: int
    cap_ambient: int
    no_new_privs: bool
    fsuid: int = -1             # the file system uid and gid; -1: the effective ones
    fsgid: int = -1


@dataclass(frozen=True)
class SeccompFilter:
    """One seccomp filter (SECCOMP_MODE_FILTER) as it was installed: its classic BPF program
    (struct sock_filter instructions, 8 bytes each) and the flags the kernel keeps of it
    (SECCOMP_FILTER_FLAG_LOG). A filter cannot be removed, only added; threads and children
    share the ones they inherited. Which ones are shared is not shown by the kernel: filters
    equal in content at the same place of two threads' lists are taken as one."""
    program: bytes
    flags: int = 0


@dataclass
class ThreadState:
    tid: int
    regs: dict[str, int]
    xstate: bytes
    sigmask: int
    rseq: tuple[int, int, int] | None          # (pointer, size, signature)
    robust_list: tuple[int, int]               # (head, length)
    clear_child_tid: int
    sigaltstack: tuple[int, int, int]           # (sp, flags, size)
    pending: list[bytes] = field(default_factory=list)    # siginfo records, thread queue
    # its scheduling, as native.SCHED_FIELDS (policy, flags, nice, priority, runtime,
    # deadline, period: runtime 0 for a fair policy on the kernel's default slice); None:
    # leave it to the destination
    sched: tuple[int, ...] | None = None
    cpus: list[int] = field(default_factory=list)         # its CPU affinity; empty: leave it
    creds: "Credentials | None" = None     # its own, where they differ from the process's
    name: str = ""             # its comm (PR_SET_NAME, pthread_setname_np); "": leave it
    timerslack: int = 0        # its timer slack in ns (PR_SET_TIMERSLACK); 0: leave it
    tsc: int = 0               # PR_GET_TSC: 1 rdtsc allowed, 2 SIGSEGV; 0: leave it
    # PR_GET_SPECULATION_CTRL of the store bypass, indirect branch and L1D flush controls
    # (PR_SPEC_* bits; set again only where PR_SPEC_PRCTL says a thread may); 0: leave it
    spec: tuple[int, int, int] = (0, 0, 0)
    mce_kill: int = 2          # PR_MCE_KILL_GET: 0 late, 1 early, 2 the system's default
    # its seccomp filters, oldest first, as indices in ProcessState.seccomp_filters; threads
    # whose lists start alike share that part (installed once, TSYNC): see SeccompFilter
    seccomp: list[int] = field(default_factory=list)


@dataclass
class ProcessState:
    """Everything besides memory that the final round carries."""
    pid: int
    comm: str
    exe: str
    cwd: str
    umask: int
    mm: MmFields
    auxv: bytes
    rlimits: dict[int, tuple[int, int]]
    sigactions: dict[int, SigAction]
    fds: list[FileDescriptor]
    threads: list[ThreadState]
    shared_pending: list[bytes] = field(default_factory=list)
    cpus: list[int] = field(default_factory=list)      # CPU affinity; empty: leave as is
    creds: "Credentials | None" = None
    dumpable: int = 1
    pdeathsig: int = 0          # the signal it gets when its parent dies (PR_SET_PDEATHSIG)
    child_subreaper: bool = False
    # a session leader with a pty of the tree as controlling terminal: the terminal's
    # foreground process group (0: its own, as TIOCSCTTY leaves it)
    tty_pgrp: int = 0
    # POSIX timers, and the interval timers ITIMER_REAL, VIRTUAL, PROF as (interval s, us,
    # remaining s, us)
    timers: list[PosixTimer] = field(default_factory=list)
    itimers: list[tuple[int, int, int, int]] = field(default_factory=list)
    stopped: bool = False       # stopped (SIGSTOP, job control) when frozen: so it comes back
    oom_score_adj: int = 0      # /proc/PID/oom_score_adj
    personality: int = 0        # personality(2) flags
    thp_disable: bool = False   # PR_SET_THP_DISABLE
    securebits: int = 0         # PR_GET_SECUREBITS (keep-caps, noroot... and their locks)
    mdwe: int = 0               # PR_GET_MDWE: memory-deny-write-execute flags
    memory_merge: bool = False  # PR_SET_MEMORY_MERGE: KSM for all its memory
    membarrier: int = 0         # membarrier registrations (MEMBARRIER_CMD_REGISTER_* bits)
    loginuid: int = -1          # /proc/PID/loginuid (4294967295: unset); -1: leave it
    # the distinct seccomp filters of its threads (ThreadState.seccomp names them)
    seccomp_filters: list[SeccompFilter] = field(default_factory=list)
    # its root directory (chroot) as /proc/PID/root shows it to the reader: a path from the
    # reader's root, like cwd (which may lie inside it or outside it)
    root: str = "/"
    # a working directory ("cwd") or root ("root") that was deleted (rmdir while in use:
    # the path above ends with " (deleted)"): its (mode, uid, gid), for the restorer to make
    # one like it beside where it was, enter it and remove it again
    deleted_dirs: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # mlockall(MCL_FUTURE) (the mm's default VM_LOCKED, in no /proc file): MCL_FUTURE and
    # MCL_ONFAULT bits as mlockall takes them; 0: not set (see ProcessSource.query_inside)
    mlock_future: int = 0


@dataclass
class AddressSpaceRound:
    """One task's memory in one round.

    layout: every VMA (special ones included) as the source had it;
    fresh:  packed ranges that must be mapped anew before pages are written (new VMAs, or
            areas whose tracking was lost) — everything present in them is in `pages`;
    pages:  packed ranges whose bytes follow one another in the round's page file;
    zap:    packed ranges written but no longer present (MADV_DONTNEED): drop them;
    pages_from: "file" (pages.img at pages_offset) or "pid": read them from the live source
            process itself, for a destination on the same host (no copy through a file);
    tids:   the task's threads when the round was taken: the husk creates them as they
            appear, so that finalize only adjusts for threads born or gone since.
    Pids (pid, tids, parent, sid, pgid) are as the tree's own pid namespace shows them (the
    root's innermost one): the pids it is restored with. source_pid is the process's pid on
    the source host, where a same-host destination reads it (pages_from "pid", handover).
    The task's place in the tree: parent (pid of its parent process, 0 for the root of the
    tree), sid and pgid as the source had them (0: outside the tree's namespace), starttime (with the pid, the identity of the
    process: a pid reused between rounds is another process) and first: this is the task's
    first round, and layout and pages are relative to a fork of its parent's husk as staged
    after the parent's part of this round (pages it still shares with its parent are not
    carried), or, for the root, to an empty husk."""
    pid: int
    layout: list[Vma]
    fresh: bytes = b""
    pages: bytes = b""
    zap: bytes = b""
    pages_offset: int = 0
    pages_from: str = "file"
    tids: list[int] = field(default_factory=list)     # its threads at this round
    parent: int = 0
    sid: int = 0
    pgid: int = 0
    starttime: int = 0
    first: bool = True
    exit_signal: int = 17                               # SIGCHLD
    source_pid: int = 0                                 # 0: the same as pid
    # a session leader's controlling terminal, if it is a pty of the tree: its number N
    # (/dev/pts/N on the source); -1: none. The husk takes a new pair's slave as its
    # controlling terminal when it is made, before it forks anyone of its session.
    ctty: int = -1
    # what it shares with its parent as a process (not a thread) does, made by clone():
    # CLONE_FILES (0x400) the fd table, CLONE_FS (0x200) root, working directory and umask.
    # Its husk is forked with them; a sharing that ended since (unshare, exec) ends in the
    # husk too (a sharing cannot begin after the clone).
    shares: int = 0
    # each VMA's VmFlags (/proc/PID/smaps) that the restore carries, where they differ from
    # what mapping it plainly gives (vmflags_default): (start, end, VMFLAG bits), in order
    vmflags: list[tuple[int, int, int]] = field(default_factory=list)
    # its cgroup v2 as its source's /proc/PID/cgroup shows it ("0::PATH": relative to the
    # cgroup root the migrator sees); "": not known (no cgroup v2): it stays where the
    # restorer puts it. The restored process is moved into PATH under the destination's
    # cgroup root when it leaves the gate (kernel/cgroup.py place).
    cgroup: str = ""


@dataclass
class SysvShm:
    """A System V shared memory segment of the tree's IPC namespace (/proc/sysvipc/shm).
    mode holds the permission bits and SHM_DEST (0o1000: removed with IPC_RMID while still
    attached; its key then reads IPC_PRIVATE) and SHM_LOCKED (0o2000). name_key: the key it
    was made with, which its attachments show ("/SYSV%08x") even once removed. Its pages
    travel with the processes that attach it, like other shared memory; pages (offset,
    bytes) carry the content of a segment no process of the tree attaches (final round)."""
    id: int
    key: int
    mode: int
    uid: int
    gid: int
    cuid: int
    cgid: int
    size: int
    name_key: int
    pages: list[tuple[int, bytes]] = field(default_factory=list)
    # the attachments made read-only (SHM_RDONLY), as (tree pid, address): the others may
    # be written (their protection aside), as their VmFlags show (mw)
    readonly: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class SysvSem:
    """A System V semaphore set: the value of each of its semaphores (semctl GETALL)."""
    id: int
    key: int
    mode: int
    uid: int
    gid: int
    cuid: int
    cgid: int
    values: list[int] = field(default_factory=list)


@dataclass
class SysvMsg:
    """A System V message queue: its capacity (msg_qbytes) and the messages waiting in it,
    oldest first, as (type, bytes), read without taking them (msgrcv MSG_COPY)."""
    id: int
    key: int
    mode: int
    uid: int
    gid: int
    cuid: int
    cgid: int
    qbytes: int
    messages: list[tuple[int, bytes]] = field(default_factory=list)


IPC_PLACES = ("own", "host")


@dataclass
class SysvIpc:
    """The System V IPC objects of a tree. place: "own", the tree has an IPC namespace of its
    own (a container): every object in it is the tree's, and the tree is restored into a new
    one (or, on one host, into that very one); "host": the tree shares the host's, and only
    the segments it attaches are its objects. same_objects: a destination on the same host
    uses the very objects (the source's namespace): shm lists the segments for their sizes
    only and nothing else is carried. sem and msg: in the final round only."""
    place: str
    same_objects: bool = False
    shm: list[SysvShm] = field(default_factory=list)
    sem: list[SysvSem] = field(default_factory=list)
    msg: list[SysvMsg] = field(default_factory=list)


@dataclass
class Zombie:
    """A process of the tree that exited and that its parent has not reaped yet."""
    pid: int
    parent: int
    sid: int
    pgid: int
    exit_code: int          # as wait() reports it: status << 8, or the signal number


@dataclass
class VisibleState:
    """What /proc shows of one process of a frozen tree (kernel/visible.py reads it,
    restore/verify.py compares the source's with its restored copy's): fields by name
    (`status.SigCgt`, `fd[3].pos`...) for the process, and for each of its threads by tid;
    pids and tids as the tree's own pid namespace names them."""
    pid: int
    fields: dict[str, str]
    threads: dict[int, dict[str, str]]


@dataclass
class Round:
    """One image directory: a pre-copy round, or the final dump (kind "dump") with the state
    of every process (`states`, in the order of `tasks`) and the tree's zombies."""
    id: str
    index: int
    parent_id: str | None
    parent_path: str | None
    kind: str                       # "predump" | "dump"
    source: dict                    # host, kernel, pid, time: where it came from
    tasks: list[AddressSpaceRound]
    states: list[ProcessState] = field(default_factory=list)
    zombies: list[Zombie] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    # a final round made for `--verify`: what /proc showed of each process of the frozen
    # source, which the destination compares with the husks before letting them go
    visible: list[VisibleState] = field(default_factory=list)
    # the tree's System V IPC (None: it shares the host's IPC namespace and attaches no
    # segment of it)
    ipc: SysvIpc | None = None

    @property
    def is_final(self) -> bool:
        return self.kind == "dump"

    def task_of(self, pid: int) -> AddressSpaceRound:
        return next(t for t in self.tasks if t.pid == pid)

    def state_of(self, pid: int) -> ProcessState:
        return next(s for s in self.states if s.pid == pid)
