"""Who and what may be migrated: the refusals of the source side that look at the whole tree.

check_supported() runs before anything is frozen, with what find_tree_unsupported() gathers
(SourceSession looks at the frozen tree's shape again with tree_problems): the tree's shape
(sessions, groups, zombies: tree_problems), our own helpers and daemons (check_target,
tree_helpers), cgroups and mount namespaces (cgroup_problems, mount_ns_problems), what
CLONE_FILES/CLONE_FS share (sharing_problems; shares_with_parent: what a child shares with
its parent, which its husk is forked with), and for an image the ends of pipes and
sockets that leave the tree (inner_ends). Each problem is one line naming the object and why;
the refusals of one process are source/refusals.find_unsupported's."""
from __future__ import annotations

import collections
import functools
import os
import time

from ..errors import NoSuchProcess, ProcessGone, UnsupportedState
from ..kernel import cgroup, native, procfs, sockdiag, tcp
from ..kernel.native import lib
from . import ptys, unixsock
from . import sysvipc as sysv
from .refusals import find_unsupported


# ---- the tree's shape, and what its processes share ---------------------------------------


def tree_problems(tasks: list[procfs.TreeTask]) -> list[str]:
    """What about the shape of the tree this version cannot restore: sessions and process
    groups are recreated from inside the tree, so their leaders must be in it (alive, or for a
    group a zombie), unless the root inherited them from outside (then the restored tree gets
    the destination's)."""
    root = tasks[0]
    by_pid = {t.pid: t for t in tasks}
    problems = []
    if root.zombie:
        problems.append(f"process {root.pid} is a zombie")
    for t in tasks[1:]:
        if t.zombie and t.exit_code & 0x80:
            # WCOREDUMP: its status says a core was dumped; the husk cannot die with that
            # bit without dumping one (where the host's core_pattern says)
            problems.append(f"zombie {t.pid} died of signal {t.exit_code & 0x7f} with a core "
                            "dump (its status's core-dumped bit cannot be made again)")
    for t in tasks[1:]:
        parent = by_pid[t.parent]
        if t.sid != parent.sid and t.sid != t.pid:
            problems.append(f"pid {t.pid} stayed in session {t.sid} when its parent {parent.pid} "
                            f"moved to session {parent.sid}: cannot be recreated by fork")
        if t.sid != root.sid and t.sid not in by_pid:
            problems.append(f"pid {t.pid}: the leader of its session {t.sid} is not in the tree")
        elif t.sid != root.sid and by_pid[t.sid].zombie and t.sid != t.pid:
            problems.append(f"pid {t.pid}: the leader of its session {t.sid} is a zombie")
        if t.pgid != root.pgid and t.pgid not in by_pid:
            # a group is made again from inside the tree (setpgid by its leader's husk); one
            # led outside (another shell job's, the shell's own) cannot be joined by a
            # restored process, and there is no --shell-job (README: Detached)
            problems.append(f"pid {t.pid}: the leader of its process group {t.pgid} is not in "
                            f"the tree (another job's group): migrate the tree that holds "
                            f"{t.pgid} too (-t an ancestor of both), or have pid {t.pid} leave "
                            "that group first (setpgid)")
    if root.sid != root.pid and root.pgid == root.pid and any(
            t.pgid == root.pid for t in tasks[1:]):
        pass   # a group led by the root inside an outside session: recreated by setpgid
    return problems


def inner_ends(tasks: list[procfs.TreeTask], external: frozenset[bytes] = frozenset(),
               external_fds: frozenset[str] = frozenset()) -> list[str]:
    """For an image: pipes and unix sockets are made anew. Pipes must have both ends in the
    tree; unix sockets are carried unless they are connected outside the tree through a name
    not declared external (unixsock.classify); sockets of other families than TCP, UDP and
    unix are refused by name."""
    ends: dict[str, set[int]] = {}
    where: dict[str, tuple[int, int]] = {}
    sockets: list[tuple[int, int, int]] = []
    for t in tasks:
        if t.zombie:
            continue
        try:
            for fd in procfs.fd_numbers(t.pid):
                what = procfs.readlink(t.pid, f"fd/{fd}")
                if what in external_fds:
                    continue               # given to the destination (--inherit-fd)
                if what.startswith("pipe:"):
                    mode = int(procfs.fdinfo(t.pid, fd).get("flags", "0"), 8) & 3
                    ends.setdefault(what, set()).update({0, 1} if mode == 2 else {mode})
                    where.setdefault(what, (t.pid, fd))
                elif what.startswith("socket:"):
                    sockets.append((t.pid, fd, int(what[8:-1])))
        except ProcessGone:
            continue
    problems = [f"pid {where[p][0]} fd {where[p][1]}: {p}: its other end is outside the tree "
                "(a pipe is carried whole between hosts; or name what it is connected to on "
                f"the destination: --inherit-fd fd[N]:{p})" for p, e in ends.items()
                if e != {0, 1}]
    if sockets:
        table = sockdiag.tables([t.pid for t in tasks if not t.zombie])
        unix = [s for s in sockets if s[2] in table]
        for pid, fd, ino in sockets:
            if ino in table:
                continue
            proto = tcp.protocol(pid, fd)
            if proto.startswith("UNIX"):
                problems.append(f"pid {pid} fd {fd}: unix socket [{ino}] belongs to another "
                                "network namespace than its process's (not carried)")
            elif proto not in ("TCP", "TCPv6", "UDP", "UDPv6", "?"):     # ?: closed meanwhile
                problems.append(f"pid {pid} fd {fd}: socket:[{ino}] is a {proto} socket (only "
                                "TCP, UDP and unix sockets are carried between hosts yet)")
        placements, more = unixsock.classify(unix, table, external)
        problems += more + unixsock.file_problems(unix, table, placements)
        problems += chrooted_socket_names(unix, table)
    return problems


def chrooted_socket_names(unix: list[tuple[int, int, int]], table: dict) -> list[str]:
    """A path a chrooted process names a unix socket by (its own, or its peer's) is one
    from its root, while the restorer binds and connects from the host's: refused by name."""
    problems, roots = [], {}
    for pid, fd, ino in unix:
        try:
            root = roots.setdefault(pid, procfs.readlink(pid, "root"))
        except ProcessGone:
            continue
        if root == "/":
            continue
        sock = table[ino]
        peer = table.get(sock.peer)
        for name in (sock.name, peer.name if peer else b""):
            if name and not name.startswith(b"\0"):
                problems.append(f"pid {pid} fd {fd}: {sock.describe()} goes through the path "
                                f"{sockdiag.printable(name)} as seen from the process's root "
                                f"{root} (chroot): not carried between hosts yet")
                break
    return problems


def tree_members(tasks) -> set[int]:
    """The host pids of the tree's processes and of their threads."""
    out = set()
    for t in tasks:
        out.add(t.pid)
        try:
            out.update(procfs.threads(t.pid))
        except ProcessGone:
            pass
    return out


CLONE_NAMES = {native.KCMP_FILES: "CLONE_FILES", native.KCMP_FS: "CLONE_FS"}
SHARED_KINDS = ((native.KCMP_FILES, lib.CLONE_FILES, "fd table"),
                (native.KCMP_FS, lib.CLONE_FS, "root, working directory and umask"))


def shares_with_parent(parent: int, pid: int) -> int:
    """The CLONE_FILES / CLONE_FS pid shares with its parent (kcmp), as clone flags."""
    return sum(flag for kind, flag, _ in SHARED_KINDS if native.kcmp(parent, pid, kind) == 0)


def sharing_problems(tasks: list[procfs.TreeTask], threads: bool = True) -> list[str]:
    """Fd tables and file system information (root, working directory, umask) shared in a
    way the husks cannot be forked into: a thread with its own (unshare), or processes that
    share one without one of them being the parent of the others (a sharer whose parent
    left it with unshare or exec). A child sharing its parent's is carried (Husk.fork_child).
    kcmp orders what it compares: the sharers of one table sort side by side."""
    problems = []
    live = [t for t in tasks if not t.zombie]
    for kind, _, what in SHARED_KINDS:
        if threads:
            for t in live:
                try:
                    for tid in procfs.threads(t.pid)[1:]:
                        if native.kcmp(t.pid, tid, kind) != 0:
                            problems.append(f"pid {t.pid} thread {tid}: has its own {what}, "
                                            "apart from its process's (unshare): not carried")
                except ProcessGone:
                    continue
        order = {0: 0, 1: -1, 2: 1, 3: 1}
        try:
            ranked = sorted(live, key=functools.cmp_to_key(
                lambda a, b: order[native.kcmp(a.pid, b.pid, kind)]))
        except ProcessGone:
            continue
        groups: list[list[procfs.TreeTask]] = []
        for t in ranked:
            if groups and native.kcmp(groups[-1][0].pid, t.pid, kind) == 0:
                groups[-1].append(t)
            else:
                groups.append([t])
        for group in groups:
            members = {t.pid for t in group}
            tops = [t.pid for t in group if t.parent not in members]
            if len(tops) > 1:
                problems.append(f"pids {', '.join(map(str, sorted(members)))} share one {what} "
                                f"(clone {CLONE_NAMES[kind]})"
                                f" but not through their parents ({', '.join(map(str, tops))} "
                                "do not share their parent's): not carried")
    return problems


# ---- who may be migrated ------------------------------------------------------------------

HELPER_COMMS = {"prerestore-husk": "husk", "prerestore-init": "pid namespace init"}
DAEMONS = {b"prerestore.source.trackerd": "tracker daemon",
           b"prerestore.restore.daemon": "stage daemon"}


def prerestore_role(pid: int) -> str | None:
    """What part of prerestore the process is ("husk", "stage daemon", "command"...), or None.
    Known by its comm (the husk program) or its argv (`python -m prerestore.x`, the
    `prerestore` script)."""
    comm = procfs.comm(pid)
    if comm in HELPER_COMMS:
        return HELPER_COMMS[comm]
    argv = procfs.cmdline(pid)
    for i, arg in enumerate(argv[:3]):
        if os.path.basename(arg) == b"prerestore":
            return "command"
        if arg == b"-m" and i + 1 < len(argv):
            module = argv[i + 1]
            if module == b"prerestore" or module.startswith(b"prerestore."):
                return DAEMONS.get(module, "command")
    return None


def check_target(pid: int) -> None:
    """Refuse, by name, a root that must never be seized: the init of our pid namespace (the
    host's, usually), a kernel thread, this very process or any in its parent chain (the tree
    would hold the tool that freezes it), a process of prerestore's own (a daemon, a husk, a
    running command). Raises UnsupportedState; ProcessGone becomes a plain "no process"."""
    if pid <= 0:
        raise UnsupportedState(f"pid {pid}: not a process id (a positive number)")
    try:
        name = procfs.comm(pid)
        if pid == 1:
            raise UnsupportedState(f"pid 1 ({name}) is the init of this host (or of this pid "
                                   "namespace): it cannot be migrated")
        if procfs.is_kernel_thread(pid):
            raise UnsupportedState(f"pid {pid} ({name}) is a kernel thread: it cannot be "
                                   "migrated")
        if pid == os.getpid():
            raise UnsupportedState(f"pid {pid} is this prerestore process itself: it cannot "
                                   "migrate itself")
        if pid in procfs.ancestors(os.getpid()):
            raise UnsupportedState(f"pid {pid} ({name}) runs this prerestore (it is in its "
                                   "parent chain): its tree would hold prerestore itself")
        role = prerestore_role(pid)
    except ProcessGone:
        raise NoSuchProcess(3, "find the process", pid) from None
    if role:
        raise UnsupportedState(f"pid {pid} ({name}) is a prerestore {role}: prerestore does "
                               "not migrate its own processes")


def tree_helpers(tasks: list[procfs.TreeTask]) -> list[str]:
    """Processes of prerestore's own inside the tree (a tracker daemon started from a shell
    of the tree, a husk): refused by name, like the root itself would be."""
    problems = []
    for t in tasks[1:]:
        if t.zombie:
            continue
        try:
            role = prerestore_role(t.pid)
        except ProcessGone:
            continue
        if role or t.pid == os.getpid():
            problems.append(f"pid {t.pid} in the tree is a prerestore {role or 'command'}: "
                            "prerestore does not migrate its own processes")
    return problems


def cgroup_problems(tasks: list[procfs.TreeTask]) -> list[str]:
    """Processes whose cgroup membership cannot be carried (kernel/cgroup.py
    source_problems), each distinct cgroup looked at once."""
    problems, seen = [], set()
    for t in tasks:
        if t.zombie:
            continue
        try:
            rel = procfs.cgroup_v2(t.pid)
        except ProcessGone:
            continue
        if rel not in seen:
            seen.add(rel)
            problems += cgroup.source_problems(t.pid, rel)
    return problems


def _kernel_view(m: procfs.Mount) -> bool:
    """A mount at or under /proc or /sys: the kernel's view of the namespaces of whoever
    mounted it (a pid namespace's proc; `ip netns exec` mounts the sysfs of its network
    namespace, and a cgroup2 on it). Not the tree's files: the restored tree sees the
    destination's, as it would on another host."""
    return m.point in ("/proc", "/sys") or m.point.startswith(("/proc/", "/sys/"))


def mount_ns_problems(tasks: list[procfs.TreeTask]) -> list[str]:
    """Processes in another mount namespace than ours. Their paths (files, cwd, mappings,
    sockets) are read and reopened here, in ours: only a namespace that mounts the same
    (mount point, root, type, source: `ip netns exec`'s copy, a container sharing the host's
    filesystems) is taken; mounts on /proc and /sys are kernel views (_kernel_view). Its
    /proc may be ours, or a proc of the tree's own pid namespace (`unshare --pid
    --mount-proc`, a tree restored into a new pid namespace): a tree restored into a new
    pid namespace gets such a /proc again (husk.mount_proc_calls). Anything else is refused
    by name."""
    try:
        mine = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return []
    ours: list[tuple[procfs.Mount, str]] = []        # read once one differs
    seen: dict[str, list[str]] = {}
    problems = []
    for t in tasks:
        if t.zombie:
            continue
        try:
            ns = procfs.readlink(t.pid, "ns/mnt")
            if ns == mine:
                continue
            if ns in seen:
                problems += [p.replace("{pid}", str(t.pid)) for p in seen[ns]]
                continue
            theirs = procfs.mounts(t.pid)
            ours = ours or procfs.mounts("self")
            our_proc = [dev for m, dev in ours if m.point == "/proc" and m.fstype == "proc"]
            found = []
            here = collections.Counter(m for m, _ in ours if not _kernel_view(m))
            there = collections.Counter(m for m, _ in theirs if not _kernel_view(m))
            only = sorted((here - there).keys()) + sorted((there - here).keys())
            if only:
                m = only[0]
                side = "prerestore's only" if here[m] > there[m] else "its own only"
                found.append(f"pid {{pid}} is in a mount namespace ({ns}) that mounts otherwise "
                             f"than prerestore's ({m.fstype} {m.source} on {m.point}: in "
                             f"{side}; {len(only)} such): its files would be reopened in "
                             "prerestore's; not carried (run prerestore in that mount "
                             f"namespace: nsenter --mount --target {t.pid} prerestore ...)")
            else:
                procs = [dev for m, dev in theirs if m.point == "/proc" and m.fstype == "proc"]
                if procs and procs[-1] not in our_proc[-1:] and not _own_proc(t.pid):
                    found.append(f"pid {{pid}}: its /proc (in mount namespace {ns}) is a proc of "
                                 "another pid namespace than its own and prerestore's: not "
                                 "carried")
            seen[ns] = found
            problems += [p.replace("{pid}", str(t.pid)) for p in found]
        except (ProcessGone, OSError):
            continue
    return problems


def _own_proc(pid: int) -> bool:
    """Is the /proc that pid sees a proc of its own pid namespace? Its own entry there, by
    its pid in that namespace, is the very process (same start time)."""
    try:
        inner = procfs.ns_pids(pid)[-1]
        with open(f"/proc/{pid}/root/proc/{inner}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()[19] == procfs.stat_fields(pid)[22].encode()
    except (OSError, ValueError, IndexError, ProcessGone):
        return False


def find_tree_unsupported(root: int, same_host: bool = False,
                          external_unix: frozenset[bytes] = frozenset(),
                          external_fds: frozenset[str] = frozenset()) -> list[str]:
    tasks = procfs.tree(root)
    problems = tree_helpers(tasks) + tree_problems(tasks) + ptys.pty_problems(tasks, same_host)
    problems += sysv.problems(tasks, same_host)
    problems += sharing_problems(tasks)
    problems += cgroup_problems(tasks) + mount_ns_problems(tasks)
    if not same_host:
        problems += inner_ends(tasks, external_unix, external_fds)
    members: set[int] | None = None

    def tree_pids() -> set[int]:
        nonlocal members
        if members is None:
            members = tree_members(tasks)
        return members
    for t in tasks:
        if t.zombie:
            continue
        try:
            mine = find_unsupported(t.pid, same_host, tree_pids, external_fds)
        except ProcessGone:
            continue
        problems += [p if t.pid == root else f"pid {t.pid}: {p}" for p in mine]
    return problems


def check_supported(pid: int, same_host: bool = False,
                    external_unix: frozenset[bytes] = frozenset(), looks: int = 4,
                    external_fds: frozenset[str] = frozenset()) -> None:
    """Refuse, naming every reason, a tree this version cannot migrate (before anything is
    frozen). external_unix: the names through which unix connections may leave the tree
    (see unixsock).

    The tree runs while we look: a connection accepted between the listing of its fds and
    the kernel's table of sockets looks like one to a stranger, a client may be caught
    between connect() and its server's accept(). A problem must be there, the same, on
    `looks` looks in a row (a busy tree shows a different passing one at each look); the
    frozen tree is checked again exactly (unixsock.capture)."""
    check_target(pid)
    lasting: set[str] | None = None
    for look in range(looks):
        problems = find_tree_unsupported(pid, same_host, external_unix, external_fds)
        lasting = set(problems) if lasting is None else lasting & set(problems)
        if not lasting:
            return
        if look < looks - 1:
            time.sleep(0.01 * (look + 1))
    raise UnsupportedState(f"cannot migrate pid {pid}: " +
                           "; ".join(p for p in problems if p in lasting))


def external_names(names) -> frozenset[bytes]:
    """--external-unix values ("/path", "@abstract", or bytes as sun_path holds them)."""
    return frozenset(n if isinstance(n, bytes) else sockdiag.parse_name(n) for n in names or ())
