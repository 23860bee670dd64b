"""Parsers for /proc/PID files. They work on bytes, tolerate odd names (a comm with ') ' in it,
paths with spaces) and raise ProcessGone when the process has vanished."""
from __future__ import annotations

import errno
import functools
import os
import stat as stat_mod
import struct
from typing import NamedTuple

import msgpack

from ..errors import ProcessGone, UnsupportedState
from . import native
from ..model import (FILE_IDENTITY, Credentials, FileDescriptor, MmFields, Vma, PROT_READ,
                     PROT_WRITE, PROT_EXEC)


def _read(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(errno.ESRCH, f"read /proc/{pid}/{name}", pid) from None


def open_file(pid: int, name: str, flags: int) -> int:
    """os.open of /proc/PID/name (close-on-exec); ProcessGone if the process has vanished (the
    kernel says ESRCH once it is exiting, ENOENT once it is reaped)."""
    try:
        return os.open(f"/proc/{pid}/{name}", flags | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(errno.ESRCH, f"open /proc/{pid}/{name}", pid) from None


def stat_file(pid: int, name: str, *, follow: bool = True) -> os.stat_result:
    """os.stat (or lstat) of /proc/PID/name; ProcessGone if the process has vanished."""
    try:
        return os.stat(f"/proc/{pid}/{name}", follow_symlinks=follow)
    except ProcessLookupError:
        raise ProcessGone(errno.ESRCH, f"stat /proc/{pid}/{name}", pid) from None
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            raise ProcessGone(errno.ESRCH, f"stat /proc/{pid}/{name}", pid) from None
        raise


_PERMS = {}
for _r in "r-":
    for _w in "w-":
        for _x in "x-":
            for _s in "sp":
                _PERMS[f"{_r}{_w}{_x}{_s}".encode()] = (
                    (PROT_READ if _r == "r" else 0) | (PROT_WRITE if _w == "w" else 0)
                    | (PROT_EXEC if _x == "x" else 0), _s == "s")


def parse_maps(data: bytes) -> list[Vma]:
    """Lines of "start-end perms offset dev inode      path"; the path may contain spaces.
    Kept lean: it runs on the downtime path."""
    out = []
    for line in data.splitlines():
        parts = line.split(None, 5)
        start, _, end = parts[0].partition(b"-")
        prot, shared = _PERMS[parts[1]]
        out.append(Vma(int(start, 16), int(end, 16), prot, shared, int(parts[2], 16),
                       parts[5].decode(errors="surrogateescape") if len(parts) > 5 else "",
                       int(parts[4]), parts[3].decode()))
    return out


def maps(pid: int) -> list[Vma]:
    return parse_maps(_read(pid, "maps"))


def maps_raw(pid: int) -> bytes:
    return _read(pid, "maps")


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in _read(pid, "status").decode(errors="replace").splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


# mountinfo's per-mount options -> mount(2) flags
_MOUNT_FLAGS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1 << 10,
                "nodiratime": 1 << 11, "relatime": 1 << 21, "strictatime": 1 << 24}
_PROC_OPTIONS = ("hidepid", "gid", "subset")


@functools.lru_cache(maxsize=1)
def proc_mount_options() -> tuple[int, str]:
    """How our /proc is mounted: its mount(2) flags and the proc options (hidepid=, gid=,
    subset=) a new proc is mounted with to look the same. Default: nosuid,nodev,noexec.
    Read once (a restorer's own /proc does not change; it is asked in the final step)."""
    found = (2 | 4 | 8, "")
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:                      # the last one on /proc: the one on top
                fields = line.split()
                sep = fields.index("-")
                if fields[4] == "/proc" and fields[sep + 1] == "proc":
                    found = (sum(_MOUNT_FLAGS.get(o, 0) for o in fields[5].split(",")),
                             ",".join(o for o in fields[sep + 3].split(",")
                                      if o.split("=")[0] in _PROC_OPTIONS))
    except (OSError, ValueError, IndexError):
        pass
    return found


class Mount(NamedTuple):
    """A mount as /proc/PID/mountinfo shows it, without what differs between two equal
    views (ids, device numbers, propagation)."""
    point: str
    root: str
    fstype: str
    source: str


def mounts(pid: int | str) -> list[tuple[Mount, str]]:
    """The mounts of the process's mount namespace as it sees them, in mount order, each with
    its device (major:minor)."""
    out = []
    for line in _read(pid, "mountinfo").decode(errors="surrogateescape").splitlines():
        fields = line.split()
        sep = fields.index("-")
        out.append((Mount(fields[4], fields[3], fields[sep + 1], fields[sep + 2]), fields[2]))
    return out


def cgroup_v2(pid: int) -> str | None:
    """The process's cgroup v2, as /proc/PID/cgroup's "0::PATH" line shows it: a path
    relative to the cgroup root of our cgroup namespace ("/", "/system.slice/x.service").
    None: no v2 line (a kernel without cgroup v2)."""
    for line in _read(pid, "cgroup").decode(errors="replace").splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat numbered as in proc(5): [1] is pid, [2] comm, [3] state..."""
    data = _read(pid, "stat")
    lpar, rpar = data.index(b"("), data.rindex(b")")
    rest = data[rpar + 2:].split()
    return ["", data[:lpar].strip().decode(), data[lpar + 1:rpar].decode(errors="replace")] + \
        [x.decode() for x in rest]


def mm_fields(fields: list[str], brk: int) -> MmFields:
    f = [int(x) if x.isdigit() else 0 for x in fields[:53]] + [0] * 4
    return MmFields(start_code=f[26], end_code=f[27], start_data=f[45], end_data=f[46],
                    start_brk=f[47], brk=brk, start_stack=f[28], arg_start=f[48], arg_end=f[49],
                    env_start=f[50], env_end=f[51])


def threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(errno.ESRCH, f"list /proc/{pid}/task", pid) from None


def children(pid: int) -> list[int]:
    out = []
    for tid in threads(pid):
        try:
            out += [int(x) for x in _read(pid, f"task/{tid}/children").split()]
        except ProcessGone:
            pass
    return out


class TreeTask(NamedTuple):
    """A process of a tree as /proc/PID/stat shows it."""
    pid: int
    parent: int
    state: str
    pgid: int
    sid: int
    starttime: int
    exit_signal: int
    exit_code: int
    tty_nr: int = 0         # its controlling terminal's device number (0: none)
    tpgid: int = -1         # that terminal's foreground process group

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")

    @property
    def ctty_pty(self) -> int:
        """The number N of its controlling terminal if that is a pty slave /dev/pts/N, else
        -1 (no controlling terminal: see tty_nr)."""
        return os.minor(self.tty_nr) if self.tty_nr and \
            os.major(self.tty_nr) == PTY_SLAVE_MAJOR else -1


def ns_pids(pid: int | str) -> list[int]:
    """NSpid: the pid in each pid namespace from ours down to the process's own."""
    for line in _read(pid, "status").splitlines():
        if line.startswith(b"NSpid:"):
            return [int(x) for x in line.split()[1:]]
    return [int(pid)]


def tree_task(pid: int) -> TreeTask:
    f = stat_fields(pid)
    return TreeTask(pid, int(f[4]), f[3], int(f[5]), int(f[6]), int(f[22]), int(f[38]),
                    int(f[52]) if len(f) > 52 else 0, int(f[7]), int(f[8]))


PF_KTHREAD = 0x00200000        # /proc/PID/stat field 9 (flags): a kernel thread


def is_kernel_thread(pid: int) -> bool:
    return bool(int(stat_fields(pid)[9]) & PF_KTHREAD)


def cmdline(pid: int) -> list[bytes]:
    """The process's argv (empty for a kernel thread or a zombie)."""
    return _read(pid, "cmdline").split(b"\0")[:-1]


def ancestors(pid: int) -> list[int]:
    """pid, its parent, its parent's parent... up to the init of our pid namespace."""
    out = [pid]
    while out[-1] > 1:
        parent = int(stat_fields(out[-1])[4])
        if parent <= 0 or parent in out:
            break
        out.append(parent)
    return out


def tree(root: int) -> list[TreeTask]:
    """The process tree under root (root first, every parent before its children); tasks that
    vanish while we look are left out. Raises ProcessGone if root itself is gone."""
    out = [tree_task(root)]
    i = 0
    while i < len(out):
        if not out[i].zombie:
            try:
                kids = children(out[i].pid)
            except ProcessGone:
                if i == 0:
                    raise
                kids = []           # it exited (and was reaped) since it was listed
            for kid in kids:
                try:
                    t = tree_task(kid)
                except ProcessGone:
                    continue
                if t.parent == out[i].pid:     # else reparented (out of the tree) meanwhile
                    out.append(t)
        i += 1
    return out


def auxv(pid: int) -> bytes:
    return _read(pid, "auxv")


def comm(pid: int) -> str:
    return _read(pid, "comm").decode(errors="replace").rstrip("\n")


def readlink(pid: int, name: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/{name}")
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(errno.ESRCH, f"readlink /proc/{pid}/{name}", pid) from None


def fdinfo_text(pid: int, fd: int) -> str:
    return _read(pid, f"fdinfo/{fd}").decode(errors="replace")


def parse_fdinfo(text: str) -> dict[str, str]:
    """The fields of an fdinfo (the first of a repeated key: epoll's tfd, inotify's wd lines
    are read from the text itself)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out.setdefault(key.strip(), value.strip())
    return out


def fdinfo(pid: int, fd: int) -> dict[str, str]:
    return parse_fdinfo(fdinfo_text(pid, fd))


# Kernel objects an image can carry (the restorer makes them anew): their /proc fdinfo says
# everything there is to know about them.
CARRIED_ANON = {"anon_inode:[eventfd]": "eventfd", "anon_inode:[timerfd]": "timerfd",
                "anon_inode:[signalfd]": "signalfd", "anon_inode:[eventpoll]": "epoll"}
TIMERFD = struct.Struct("=iqqqqQ")     # clockid, value s/ns, interval s/ns, ticks
EPOLL_ITEM = struct.Struct("=iIQ")     # target fd, events, data


def describe_anon(pid: int, fd: int, what: str, text: str | None = None
                  ) -> FileDescriptor | None:
    """An eventfd (offset: its counter; data b"S" if in semaphore mode), timerfd (data:
    TIMERFD), signalfd (offset: its mask) or epoll (data: EPOLL_ITEMs, its registrations) from
    fdinfo (its text, if read already); None for other kinds."""
    kind = CARRIED_ANON.get(what)
    if kind is None:
        return None
    raw = text if text is not None else fdinfo_text(pid, fd)
    info = parse_fdinfo(raw)
    flags = int(info.get("flags", "0"), 8)
    if kind == "eventfd":
        return FileDescriptor(fd, kind, what, flags, int(info["eventfd-count"], 16),
                              (0, int(info.get("eventfd-id", "0"), 16)),
                              data=b"S" if info.get("eventfd-semaphore") == "1" else b"")
    if kind == "signalfd":
        return FileDescriptor(fd, kind, what, flags, int(info["sigmask"], 16))
    if kind == "timerfd":
        value = [int(x) for x in info["it_value"].strip("()").split(",")]
        interval = [int(x) for x in info["it_interval"].strip("()").split(",")]
        return FileDescriptor(fd, kind, what, flags, 0, data=TIMERFD.pack(
            int(info["clockid"]), *value, *interval, int(info["ticks"])))
    items = []
    for line in raw.splitlines():
        if line.startswith("tfd:"):
            f = line.split()
            items.append(EPOLL_ITEM.pack(int(f[1]), int(f[3], 16), int(f[5], 16)))
    return FileDescriptor(fd, kind, what, flags, 0, data=b"".join(items))


def describe_fifo(pid: int, fd: int, path: str, flags: int) -> FileDescriptor:
    """A named FIFO: its path, and in data (msgpack) its mode and owner, to make it again where
    it is missing, and whether it was deleted while open (then the restorer makes a FIFO of its
    own and unlinks it). The bytes queued in it and its capacity are added once the tree is
    frozen (source.capture.capture_pipes)."""
    st = os.stat(f"/proc/{pid}/fd/{fd}")
    deleted = st.st_nlink == 0
    if deleted and path.endswith(" (deleted)"):
        path = path[:-len(" (deleted)")]
    meta = {"mode": stat_mod.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
            "deleted": deleted, "queued": b""}
    return FileDescriptor(fd, "fifo", path, flags, 0, (st.st_dev, st.st_ino),
                          data=msgpack.packb(meta, use_bin_type=True))


INOTIFY = "anon_inode:inotify"
IN_DONT_FOLLOW, IN_MASK_ADD, IN_MASK_CREATE = 0x02000000, 0x20000000, 0x10000000


def parse_inotify_watches(fdinfo_text: str) -> list[dict]:
    """The "inotify wd:... ino:... sdev:... mask:... fhandle-type:... f_handle:..." lines of an
    inotify fd's fdinfo (numbers in hex, sdev a kernel dev_t: major << 20 | minor), by wd."""
    out = []
    for line in fdinfo_text.splitlines():
        if not line.startswith("inotify "):
            continue
        f = dict(item.split(":", 1) for item in line.split()[1:] if ":" in item)
        sdev = int(f["sdev"], 16)
        out.append({"wd": int(f["wd"], 16), "ino": int(f["ino"], 16),
                    "dev": os.makedev(sdev >> 20, sdev & 0xFFFFF), "mask": int(f["mask"], 16),
                    "handle_type": int(f["fhandle-type"], 16),
                    "handle": bytes.fromhex(f["f_handle"])})
    return sorted(out, key=lambda w: w["wd"])


def _unescape_mount_path(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as \ooo (octal)."""
    raw = field.encode(errors="surrogateescape")
    out, i = bytearray(), 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode(errors="surrogateescape")


def mounts_by_device(pid: int) -> dict[int, list[tuple[str, str]]]:
    """The process's mounts by device: [(root of the mount in its filesystem, mount point)]."""
    out: dict[int, list[tuple[str, str]]] = {}
    for line in _read(pid, "mountinfo").decode(errors="surrogateescape").splitlines():
        f = line.split()
        major, minor = f[2].split(":")
        out.setdefault(os.makedev(int(major), int(minor)), []).append(
            (_unescape_mount_path(f[3]), _unescape_mount_path(f[4])))
    return out


# Paths found for watched inodes, by (dev, ino): the check before the freeze finds them, the
# look at the frozen tree only makes sure each still leads there (one lstat, not four calls).
_watched: dict[tuple[int, int], str] = {}


def watched_path(pid: int, watch: dict, mounts) -> str:
    """The path of the inode an inotify watch is on: its file handle opened through a mount of
    its filesystem (a mount of the whole filesystem first; mounts: a function giving
    mounts_by_device), the path the kernel gives that open file, checked to lead to that very
    inode."""
    key = (watch["dev"], watch["ino"])
    known = _watched.get(key)
    if known is not None:
        try:
            st = os.stat(known, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == key:
                return known
        except OSError:
            pass
    if len(_watched) > 1 << 16:
        _watched.clear()
    path = _find_watched_path(pid, watch, mounts())
    _watched[key] = path
    return path


def _find_watched_path(pid: int, watch: dict, mounts: dict[int, list[tuple[str, str]]]) -> str:
    candidates = sorted(mounts.get(watch["dev"], []), key=lambda m: m[0] != "/")
    for _, mount_point in candidates:
        try:
            mount_fd = os.open(f"/proc/{pid}/root{mount_point}", os.O_RDONLY | os.O_DIRECTORY |
                               os.O_CLOEXEC)      # (open_by_handle_at refuses an O_PATH one)
        except OSError:
            continue
        try:
            fd = native.open_by_handle(mount_fd, watch["handle_type"], watch["handle"],
                                       os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        finally:
            os.close(mount_fd)
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            continue
        finally:
            os.close(fd)
        if (st.st_dev, st.st_ino) == (watch["dev"], watch["ino"]):
            return path
    raise UnsupportedState(
        f"inotify watch {watch['wd']} is on inode {watch['ino']} of device "
        f"{os.major(watch['dev'])}:{os.minor(watch['dev'])}, which no path leads to (deleted, "
        "not reachable through a mount, or its name is no longer cached)")


def describe_inotify(pid: int, fd: int, flags: int, text: str | None = None
                     ) -> FileDescriptor:
    """An inotify instance: data is its watches as msgpack [[wd, mask, path], ...] by wd, each
    watched inode found again by path (watched_path). Events queued in it are not carried."""
    watches = parse_inotify_watches(text if text is not None else fdinfo_text(pid, fd))
    mounts = functools.cache(lambda: mounts_by_device(pid))   # read only if a path is new
    items = []
    for w in watches:
        try:
            path = watched_path(pid, w, mounts)
        except UnsupportedState as e:
            raise UnsupportedState(f"fd {fd}: {e}") from None
        items.append([w["wd"], w["mask"] & ~(IN_MASK_ADD | IN_MASK_CREATE), path])
    return FileDescriptor(fd, "inotify", INOTIFY, flags, 0,
                          data=msgpack.packb(items, use_bin_type=True,
                                             unicode_errors="surrogateescape"))


DELETED_MAX = 64 << 20      # the most content of a deleted file an image carries


def describe_deleted(pid: int, fd: int, path: str, flags: int, text: str | None = None
                     ) -> FileDescriptor:
    """A regular file deleted while open: its content travels in the image (data), and the
    restorer makes a new unlinked file of it (offset: the fd's position)."""
    info = parse_fdinfo(text if text is not None else fdinfo_text(pid, fd))
    src = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(src).st_size
        if size > DELETED_MAX:
            raise UnsupportedState(f"pid {pid} fd {fd}: deleted file {path} of {size} bytes "
                                   f"(at most {DELETED_MAX} are carried)")
        data = os.pread(src, size, 0)
    finally:
        os.close(src)
    return FileDescriptor(fd, "deleted", path, flags, int(info.get("pos", "0")), data=data)


def fd_numbers(pid: int) -> list[int]:
    try:
        return sorted(int(x) for x in os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(errno.ESRCH, f"list /proc/{pid}/fd", pid) from None


def describe_fd(pid: int, fd: int) -> tuple[str, FileDescriptor | None]:
    """(what it is, the FileDescriptor if it is a supported kind, else None)."""
    what, desc, _ = describe_fd_text(pid, fd)
    return what, desc


def describe_fd_text(pid: int, fd: int, text: str | None = None
                     ) -> tuple[str, FileDescriptor | None, str]:
    """describe_fd, and the text of its fdinfo (read once, or given: the final step describes
    the kinds it carries from it)."""
    target = readlink(pid, f"fd/{fd}")
    text = text if text is not None else fdinfo_text(pid, fd)
    info = parse_fdinfo(text)
    flags = int(info.get("flags", "0"), 8)
    offset = int(info.get("pos", "0"))
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except (FileNotFoundError, ProcessLookupError):
        return target, None, text
    if flags & O_PATH:
        # a place in the file system, not an open file (nothing is read or written through
        # it, it has no offset): opened again by its path with the same flags, whatever
        # its inode is (O_NOFOLLOW: the symlink itself). One that has no path (a deleted
        # file, an object with no name) cannot be.
        if target.startswith("/") and not target.endswith(" (deleted)"):
            return target, FileDescriptor(fd, "path", target, flags, 0,
                                          (st.st_dev, st.st_ino)), text
        return f"O_PATH fd of {target}", None, text
    if target in PIDFD_LINKS:
        # the process it refers to, by our pid namespace's number (-1: it has ended; 0: not
        # in our namespace); carried if it is of the tree (checked by the caller, who knows
        # the tree)
        return target, FileDescriptor(fd, "pidfd", target, flags, 0,
                                      target_pid=int(info.get("Pid", "0"))), text
    if stat_mod.S_ISFIFO(st.st_mode) and not target.startswith("pipe:"):
        return f"fifo {target}", None, text
    if target.endswith(" (deleted)"):
        return f"deleted file {target[:-10]}", None, text
    if stat_mod.S_ISREG(st.st_mode) and target.startswith("/"):
        # its identity, for the destination to check it opens the same file: not of the
        # kernel's views (/proc, /sys), which are no storage and differ from host to host
        kernel_view = target.startswith(("/proc/", "/sys/"))
        return target, FileDescriptor(fd, "file", target, flags, offset,
                                      (st.st_dev, st.st_ino),
                                      data=b"" if kernel_view else
                                      FILE_IDENTITY.pack(st.st_size, st.st_mtime_ns)), text
    if stat_mod.S_ISCHR(st.st_mode) and target in ("/dev/null", "/dev/zero", "/dev/urandom",
                                                    "/dev/random", "/dev/full"):
        return target, FileDescriptor(fd, "chr", target, flags, offset,
                                      (st.st_dev, st.st_ino)), text
    end = _pty_end(st, info)
    if end is not None:
        # made anew if its master is in the tree, else handed over on one host (see
        # source.ptys, which looks at the tree's ptys as a whole)
        return target, FileDescriptor(fd, f"pty-{end[0]}", target, flags, 0,
                                      (0, end[1])), text
    if stat_mod.S_ISDIR(st.st_mode):
        return f"directory {target}", None, text
    return target, None, text


O_PATH = 0o10000000
PIDFD_LINKS = ("anon_inode:[pidfd]", "pidfd:[pidfd]")
PIDFD_THREAD = 0o200          # O_EXCL: a pidfd of a thread (Linux 6.9+)
def fd_locks(fdinfo_text: str) -> set[str]:
    """The kinds of the locks an open file holds, as its fdinfo "lock:" lines name them
    ("POSIX", "FLOCK", "OFDLCK", "LEASE"...)."""
    out = set()
    for line in fdinfo_text.splitlines():
        if line.startswith("lock:"):
            words = line.split()
            if len(words) > 2:
                out.add(words[2])
    return out


PTY_SLAVE_MAJOR = 136          # UNIX98 pty slaves: /dev/pts/N is 136:N
PTMX = (5, 2)                  # /dev/ptmx (and /dev/pts/ptmx): opening it makes a pair


def pty_end(pid: int, fd: int) -> tuple[str, int] | None:
    """("master", N) or ("slave", N) if the fd is an end of the pty pair /dev/pts/N, else None."""
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(errno.ESRCH, f"stat /proc/{pid}/fd/{fd}", pid) from None
    return _pty_end(st, lambda: fdinfo(pid, fd))


def _pty_end(st: os.stat_result, info) -> tuple[str, int] | None:
    """info: the fd's fdinfo, or a function that reads it (only a master needs it: its number
    is its "tty-index")."""
    if not stat_mod.S_ISCHR(st.st_mode):
        return None
    if os.major(st.st_rdev) == PTY_SLAVE_MAJOR:
        return "slave", os.minor(st.st_rdev)
    if (os.major(st.st_rdev), os.minor(st.st_rdev)) == PTMX:
        number = (info() if callable(info) else info).get("tty-index")
        return ("master", int(number)) if number is not None else None
    return None


# Kernel objects that live on their own, not tied to the process's mm or task: on the same host
# the restored process can be handed the very same open file description.
HANDOVER_ANON = ("[eventfd]", "[eventpoll]", "[signalfd]", "[timerfd]", "inotify")


def credentials(status_fields: dict[str, str]) -> Credentials:
    """The credentials in a parsed /proc/PID/status (or /proc/PID/task/TID/status)."""
    ids = lambda key: tuple(int(x) for x in status_fields[key].split()[:3])  # noqa: E731
    fs = lambda key: int(status_fields[key].split()[3])  # noqa: E731
    cap = lambda key: int(status_fields.get(key, "0"), 16)  # noqa: E731
    return Credentials(uids=ids("Uid"), gids=ids("Gid"), fsuid=fs("Uid"), fsgid=fs("Gid"),
                       groups=[int(g) for g in status_fields.get("Groups", "").split()],
                       cap_inheritable=cap("CapInh"), cap_permitted=cap("CapPrm"),
                       cap_effective=cap("CapEff"), cap_bounding=cap("CapBnd"),
                       cap_ambient=cap("CapAmb"),
                       no_new_privs=status_fields.get("NoNewPrivs", "0") == "1")


def can_hand_over(pid: int, fd: int, what: str) -> bool:
    """Pipes, sockets, FIFOs, deleted files, eventfd/epoll/signalfd/timerfd/inotify: yes;
    io_uring, userfaultfd, pidfds, perf events and the like (bound to a task or an mm): no."""
    if what.startswith(("pipe:", "socket:")):
        return True
    if what.startswith("anon_inode:"):
        return what[len("anon_inode:"):] in HANDOVER_ANON
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat_mod.S_ISFIFO(st.st_mode) or stat_mod.S_ISREG(st.st_mode) or \
        stat_mod.S_ISDIR(st.st_mode) or stat_mod.S_ISCHR(st.st_mode)


def umask(pid: int) -> int:
    return int(status(pid).get("Umask", "0022"), 8)


@functools.lru_cache(maxsize=1)
def boot_id() -> str:
    """Identifies this boot: monotonic timestamps compare only within one. (Read once: it
    cannot change under a running process, and the final step asks for it.)"""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def memory_and_swap() -> int:
    """Bytes of RAM plus swap on this host (/proc/meminfo MemTotal + SwapTotal)."""
    total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("MemTotal", "SwapTotal"):
                total += int(value.split()[0]) * 1024
    return total


def oom_score_adj(pid: int) -> int:
    return int(_read(pid, "oom_score_adj"))


def loginuid(pid: int) -> int:
    """The audit login uid (4294967295: never set)."""
    return int(_read(pid, "loginuid"))


def personality(pid: int) -> int:
    return int(_read(pid, "personality"), 16)


class TimerEntry(NamedTuple):
    """One timer of /proc/PID/timers: id, clock, signal, sigev_value, sigev_notify (with
    SIGEV_THREAD_ID), and the pid or tid it signals (in our pid namespace)."""
    id: int
    clock: int
    signo: int
    value: int
    notify: int
    target: int


_NOTIFY = {"signal": 0, "none": 1, "thread": 0}     # glibc's SIGEV_THREAD is a tid target


def timers(pid: int) -> list[TimerEntry]:
    out: list[TimerEntry] = []
    cur: dict[str, str] = {}
    for line in _read(pid, "timers").decode().splitlines() + ["ID: end"]:
        key, _, value = line.partition(": ")
        if key == "ID" and cur:
            signo, sival = cur["signal"].split("/")
            how, _, who = cur["notify"].partition("/")
            kind, _, target = who.partition(".")
            out.append(TimerEntry(int(cur["ID"]), int(cur["ClockID"]), int(signo),
                                  int(sival, 16), _NOTIFY[how] | (4 if kind == "tid" else 0),
                                  int(target)))
            cur = {}
        cur[key] = value
    return out
