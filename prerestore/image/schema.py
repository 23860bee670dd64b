"""The one image schema: a round directory holds `round.img` (metadata) and `pages.img` (the
bytes of every page range listed in the metadata, back to back).

round.img = MAGIC (8 bytes) | version u32 | body length u64 | crc32(body) u32 | body
body      = msgpack map, described field by field by the encode_*/decode_* pairs below.

Readers refuse another magic ("not a prerestore image"), another version (naming both), a
short file ("truncated"), a bad checksum ("corrupt") and a pages file shorter than the ranges
the metadata lists. New fields are added as optional map keys within a version; a change that
old readers would misread bumps VERSION.

The messages of the host-to-host wire (transport/channel.py carries them, authenticated) are
checked here too, before anything acts on them (see "wire messages" at the end)."""
from __future__ import annotations

import os
import stat
import struct
import zlib

import msgpack

from ..errors import ImageError, ProtocolError
from ..kernel.native import first_bad_range
from ..model import (FILE_IDENTITY, IPC_PLACES, RANGE, UNIX_STATES, VMFLAG_ALL,
                     AddressSpaceRound, Credentials, FileDescriptor, MmFields, PosixTimer,
                     ProcessState, Round, SeccompFilter, SigAction, SysvIpc, SysvMsg, SysvSem,
                     SysvShm, ThreadState, UnixSocketState, VisibleState, Vma, Zombie,
                     ranges_bytes)

MCL_FUTURE_BITS = 2 | 4     # MCL_FUTURE | MCL_ONFAULT
MAGIC = b"PRRSTIMG"
VERSION = 4          # 2: process trees (task tree fields, states, zombies)
                     # 3: unix sockets carry a state map of their own (fd field 9)
                     # 4: threads' scheduling and CPUs; oom_score_adj, personality, THP
HEADER = struct.Struct("=8sIQI")
ROUND_FILE = "round.img"
PAGES_FILE = "pages.img"


# ---- model <-> plain maps ------------------------------------------------------------------

def _vma(v: Vma) -> list:
    return [v.start, v.end, v.prot, v.shared, v.offset, v.path, v.inode, v.dev]


def _task(t: AddressSpaceRound) -> dict:
    return {"pid": t.pid, "layout": [_vma(v) for v in t.layout], "fresh": t.fresh,
            "pages": t.pages, "zap": t.zap, "pages_offset": t.pages_offset,
            "pages_from": t.pages_from, "tids": t.tids, "parent": t.parent, "sid": t.sid,
            "pgid": t.pgid, "starttime": t.starttime, "first": t.first,
            "exit_signal": t.exit_signal, "source_pid": t.source_pid, "ctty": t.ctty,
            "shares": t.shares, "vmflags": [list(f) for f in t.vmflags],
            "cgroup": t.cgroup}


def _thread(t: ThreadState) -> dict:
    return {"tid": t.tid, "regs": t.regs, "xstate": t.xstate, "sigmask": t.sigmask,
            "rseq": list(t.rseq) if t.rseq else None, "robust_list": list(t.robust_list),
            "clear_child_tid": t.clear_child_tid, "sigaltstack": list(t.sigaltstack),
            "pending": t.pending, "sched": list(t.sched) if t.sched else None, "cpus": t.cpus,
            "creds": vars(t.creds) if t.creds else None, "name": t.name,
            "timerslack": t.timerslack, "tsc": t.tsc, "spec": list(t.spec),
            "mce_kill": t.mce_kill} | \
        ({"seccomp": t.seccomp} if t.seccomp else {})


def _state(s: ProcessState) -> dict:
    return {"pid": s.pid, "comm": s.comm, "exe": s.exe, "cwd": s.cwd, "umask": s.umask,
            "mm": vars(s.mm), "auxv": s.auxv,
            "rlimits": {r: list(v) for r, v in s.rlimits.items()},
            "sigactions": {n: [a.handler, a.flags, a.restorer, a.mask]
                           for n, a in s.sigactions.items()},
            "fds": [[f.fd, f.kind, f.path, f.flags, f.offset, list(f.dev_inode),
                     list(f.same_as) if f.same_as else None, f.data,
                     _unix(f.unix) if f.unix else None, *_fd_extra(f)] for f in s.fds],
            "threads": [_thread(t) for t in s.threads], "shared_pending": s.shared_pending,
            "cpus": s.cpus, "creds": vars(s.creds) if s.creds else None,
            "dumpable": s.dumpable, "pdeathsig": s.pdeathsig,
            "child_subreaper": s.child_subreaper, "tty_pgrp": s.tty_pgrp,
            "oom_score_adj": s.oom_score_adj, "personality": s.personality,
            "thp_disable": s.thp_disable, "stopped": s.stopped, "root": s.root,
            "deleted_dirs": {k: list(v) for k, v in s.deleted_dirs.items()},
            "mlock_future": s.mlock_future,
            "timers": [[t.id, t.clock, t.signo, t.value, t.notify, t.thread, *t.interval,
                        *t.remaining, t.overrun] for t in s.timers],
            "itimers": [list(i) for i in s.itimers], "securebits": s.securebits,
            "mdwe": s.mdwe, "memory_merge": s.memory_merge, "membarrier": s.membarrier,
            "loginuid": s.loginuid} | \
        ({"seccomp_filters": [[f.program, f.flags] for f in s.seccomp_filters]}
         if s.seccomp_filters else {})


def _fd_extra(f: FileDescriptor) -> list:
    """An fd's state beyond its file (an optional trailing map, only what is not the default:
    most fds have none)."""
    extra = {}
    if f.owner != (0, 0):
        extra["owner"] = list(f.owner)
    if f.signal:
        extra["signal"] = f.signal
    if f.target_pid:
        extra["pid"] = f.target_pid
    if f.closed_targets:
        extra["closed_targets"] = [[t, h] for t, h in sorted(f.closed_targets.items())]
    return [extra] if extra else []


def _unix(u: UnixSocketState) -> dict:
    return {"type": u.type, "state": u.state, "name": u.name, "peer": u.peer,
            "listener": u.listener, "peer_name": u.peer_name, "backlog": u.backlog,
            "accept_queue": u.accept_queue, "shutdown": u.shutdown,
            "queue": [[sender, data] for sender, data in u.queue], "base": u.base,
            "file": list(u.file) if u.file else None, "sndbuf": u.sndbuf, "rcvbuf": u.rcvbuf,
            "passcred": u.passcred, "peek_off": u.peek_off}


UNIX_TYPES = (1, 2, 5)            # SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
SUN_PATH_MAX = 108


def _decode_unix(m, where: str) -> UnixSocketState:
    """A unix socket's state, every field checked: a bad one is named (ValueError)."""
    if not isinstance(m, dict):
        raise ValueError(f"{where}: unix socket state is not a map")

    def get(key, kind, default=None, ok=lambda v: True, what=""):
        value = m.get(key, default)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds) \
                or not ok(value):
            raise ValueError(f"{where}: unix socket field {key!r} is {value!r:.60}"
                             f"{', expected ' + what if what else ''}")
        return value

    nat = lambda v: v >= 0  # noqa: E731
    queue = get("queue", list, [], what="a list of [sender, bytes]")
    for item in queue:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes) and
                isinstance(item[1], bytes) and len(item[0]) <= SUN_PATH_MAX):
            raise ValueError(f"{where}: unix socket field 'queue' holds {item!r:.60}, expected "
                             "[sender name, bytes]")
    fattr = get("file", (list, type(None)), None,
                lambda v: v is None or (len(v) == 3 and all(isinstance(x, int) and x >= 0
                                                             for x in v)), "[mode, uid, gid]")
    accept_queue = get("accept_queue", list, [],
                       lambda v: all(isinstance(x, int) and x > 0 for x in v), "inodes")
    return UnixSocketState(
        type=get("type", int, ok=lambda v: v in UNIX_TYPES, what="1, 2 or 5"),
        state=get("state", str, ok=lambda v: v in UNIX_STATES, what=" or ".join(UNIX_STATES)),
        name=get("name", bytes, b"", lambda v: len(v) <= SUN_PATH_MAX, "a sun_path"),
        peer=get("peer", int, 0, nat), listener=get("listener", int, 0, nat),
        peer_name=get("peer_name", bytes, b"", lambda v: len(v) <= SUN_PATH_MAX, "a sun_path"),
        backlog=get("backlog", int, 0, nat), accept_queue=list(accept_queue),
        shutdown=get("shutdown", int, 0, lambda v: 0 <= v <= 3, "0 to 3"),
        queue=[(sender, data) for sender, data in queue], base=get("base", str, ""),
        file=tuple(fattr) if fattr else None, sndbuf=get("sndbuf", int, 0, nat),
        rcvbuf=get("rcvbuf", int, 0, nat), passcred=get("passcred", bool, False),
        peek_off=get("peek_off", int, -1, lambda v: v >= -1))


def _check_unix(states: list[ProcessState]) -> None:
    """The unix sockets of a final round refer to one another consistently: a connected one
    to a socket of the image, a pending one to a listener that lists it, an accepted one to
    a listener."""
    socks: dict[int, tuple[str, UnixSocketState]] = {}
    for s in states:
        for f in s.fds:
            if f.kind == "unix" and not f.same_as:
                if f.unix is None:
                    raise ValueError(f"pid {s.pid} fd {f.fd}: unix socket without its state")
                socks[f.dev_inode[1]] = (f"pid {s.pid} fd {f.fd}", f.unix)
    for ino, (where, u) in socks.items():
        peer = socks.get(u.peer, ("", None))[1]
        lst = socks.get(u.peer if u.state == "pending" else u.listener, ("", None))[1]
        if u.state == "connected" and (peer is None or peer.type != u.type):
            raise ValueError(f"{where}: unix socket [{ino}] is connected to [{u.peer}], which "
                             "is not a unix socket of its type in the image")
        if u.state == "pending" and (lst is None or lst.state != "listening" or
                                     ino not in lst.accept_queue):
            raise ValueError(f"{where}: unix socket [{ino}] waits to be accepted by "
                             f"[{u.peer}], which is not a listener that lists it")
        if u.listener and (lst is None or lst.state != "listening" or lst.name != u.name):
            raise ValueError(f"{where}: unix socket [{ino}] was accepted from [{u.listener}], "
                             "which is not a listener of its name in the image")
        for client in u.accept_queue:
            c = socks.get(client, ("", None))[1]
            if u.state != "listening" or c is None or c.state != "pending" or c.peer != ino:
                raise ValueError(f"{where}: unix socket [{ino}] lists [{client}] in its accept "
                                 "queue, which is not a client of it waiting in the image")


# ---- checked decoding ------------------------------------------------------------------------
# Every field is checked on read for its type and range, and a bad one is named by its place in
# the image (`tasks[0].layout[3].prot: expected int 0..7, got None`): an image that passes the
# checksum may still come from a buggy or hostile writer, and what it says is given to
# mmap, ptrace and prctl in the husk.

class _Bad(ValueError):
    """A field of the metadata is wrong; the message names it."""


_MISSING = object()
U64 = (0, 2**64 - 1)
U32 = (0, 2**32 - 1)
PID = (1, 4194304)              # PID_MAX_LIMIT
PAGE = 4096
SIGNALS = (1, 64)
RLIMIT_COUNT = 16
SIGINFO_SIZE = 128
FD_KINDS = ("file", "chr", "dir", "deleted", "pipe", "fifo", "unix", "tcp", "udp", "eventfd",
            "timerfd", "signalfd", "epoll", "inotify", "pty-master", "pty-slave", "handover",
            "path", "pidfd", "inherit")
ROUND_KINDS = ("predump", "dump")
PAGE_SOURCES = ("file", "pid")
MM_FIELDS = tuple(MmFields.__dataclass_fields__)
CRED_CAPS = ("cap_inheritable", "cap_permitted", "cap_effective", "cap_bounding",
             "cap_ambient")
REG_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
             "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
             "gs_base", "ds", "es", "fs", "gs")      # user_regs_struct (kernel.native's too)


def _show(value) -> str:
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return text if value is None or isinstance(value, (bool, int, float)) else \
        f"{type(value).__name__} {text}"


def _bad(path: str, what: str, value) -> _Bad:
    return _Bad(f"{path}: expected {what}, got {_show(value)}")


def _field(m: dict, key, path: str, default=_MISSING):
    if key in m:
        return m[key]
    if default is _MISSING:
        raise _Bad(f"{path}.{key}: missing")
    return default


def _int(value, path: str, span: tuple[int, int] = U64, what: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or \
            not span[0] <= value <= span[1]:
        raise _bad(path, what or f"int {span[0]}..{span[1]}", value)
    return value


def _pid(value, path: str) -> int:
    return _int(value, path, PID, "a pid (int 1..4194304)")


def _of(value, kinds, path: str, what: str):
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise _bad(path, what, value)
    return value


def _list(value, path: str, length: int | None = None, what: str = "a list") -> list:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise _bad(path, what if length is None else f"a list of {length}", value)
    return value


def _map(value, path: str) -> dict:
    return _of(value, dict, path, "a map")


def _ints(value, path: str, spans: tuple) -> tuple:
    """A list of len(spans) ints, each within its span."""
    # the common case first, without building a path per field (the final image is decoded
    # inside the downtime): only a bad value pays for naming it
    if type(value) is list and len(value) == len(spans):
        for v, (lo, hi) in zip(value, spans):
            if type(v) is not int or not lo <= v <= hi:
                break
        else:
            return tuple(value)
    _list(value, path, len(spans))
    return tuple(_int(v, f"{path}[{i}]", span) for i, (v, span) in enumerate(zip(value, spans)))


def _enum(value, path: str, allowed: tuple):
    if not isinstance(value, str) or value not in allowed:
        raise _bad(path, "one of " + ", ".join(allowed), value)
    return value


def _ranges(value, path: str) -> bytes:
    """Packed page ranges: whole (start, end) pairs, page-aligned, start < end."""
    raw = _of(value, bytes, path, "packed (start, end) ranges")
    if len(raw) % RANGE.size:
        raise _bad(path, f"whole {RANGE.size}-byte ranges", f"{len(raw)} bytes")
    i = first_bad_range(raw)                 # native: a final image's ranges can be many
    if i >= 0:
        s, e = RANGE.unpack_from(raw, i * RANGE.size)
        raise _Bad(f"{path}[{i}]: expected a page-aligned range with start < end, got "
                   f"{s:#x}-{e:#x}")
    return raw


_VMA_TYPES = (int, int, int, bool, int, str, int, str)
# policy (SCHED_OTHER..SCHED_EXT), flags, nice, priority, runtime, deadline, period
SCHED_SPANS = ((0, 7), (0, 0xff), (-20, 19), (0, 99), U64, U64, U64)
_REG_TYPES = [int] * len(REG_NAMES)


def _decode_vma(v, path: str) -> Vma:
    if type(v) is list and tuple(map(type, v)) == _VMA_TYPES and \
            0 <= v[0] < v[1] <= U64[1] and not v[0] % PAGE and not v[1] % PAGE and \
            0 <= v[2] <= 7 and 0 <= v[4] <= 2**63 - 1 and 0 <= v[6] <= U64[1]:
        return Vma(*v)                   # the common case, checked without naming anything
    _list(v, path, 8, "a list of 8 [start, end, prot, shared, offset, path, inode, dev]")
    start = _int(v[0], f"{path}.start")
    end = _int(v[1], f"{path}.end")
    if start % PAGE or end % PAGE or start >= end:
        raise _Bad(f"{path}: expected page-aligned bounds with start < end, got "
                   f"{start:#x}-{end:#x}")
    return Vma(start, end, _int(v[2], f"{path}.prot", (0, 7)),
               _of(v[3], bool, f"{path}.shared", "bool"),
               _int(v[4], f"{path}.offset", (0, 2**63 - 1)),
               _of(v[5], str, f"{path}.path", "str"),
               _int(v[6], f"{path}.inode"), _of(v[7], str, f"{path}.dev", "str"))


def _vmflags(value, path: str) -> list[tuple[int, int, int]]:
    """(start, end, VMFLAG bits) of VMAs, page-aligned, in order, no overlap."""
    out = [_ints(v, f"{path}[{i}]", (U64, U64, (0, VMFLAG_ALL)))
           for i, v in enumerate(_list(value, path))]
    prev = 0
    for i, (start, end, _) in enumerate(out):
        if start % PAGE or end % PAGE or not prev <= start < end:
            raise _Bad(f"{path}[{i}]: expected page-aligned bounds in order, got "
                       f"{start:#x}-{end:#x}")
        prev = end
    return out


def _decode_task(t, path: str) -> AddressSpaceRound:
    _map(t, path)
    get = lambda key, default=_MISSING: _field(t, key, path, default)  # noqa: E731
    layout = [_decode_vma(v, f"{path}.layout[{i}]")
              for i, v in enumerate(_list(get("layout"), f"{path}.layout"))]
    for i in range(1, len(layout)):
        if layout[i].start < layout[i - 1].end:
            raise _Bad(f"{path}.layout[{i}]: starts at {layout[i].start:#x}, inside or before "
                       f"the one before it (ends {layout[i - 1].end:#x})")
    return AddressSpaceRound(
        pid=_pid(get("pid"), f"{path}.pid"), layout=layout,
        fresh=_ranges(get("fresh"), f"{path}.fresh"),
        pages=_ranges(get("pages"), f"{path}.pages"),
        zap=_ranges(get("zap"), f"{path}.zap"),
        pages_offset=_int(get("pages_offset"), f"{path}.pages_offset", (0, 2**63 - 1)),
        pages_from=_enum(get("pages_from"), f"{path}.pages_from", PAGE_SOURCES),
        tids=[_pid(x, f"{path}.tids[{i}]")
              for i, x in enumerate(_list(get("tids"), f"{path}.tids"))],
        parent=_int(get("parent"), f"{path}.parent", (0, PID[1])),
        sid=_int(get("sid"), f"{path}.sid", (0, PID[1])),
        pgid=_int(get("pgid"), f"{path}.pgid", (0, PID[1])),
        starttime=_int(get("starttime"), f"{path}.starttime"),
        first=_of(get("first"), bool, f"{path}.first", "bool"),
        exit_signal=_int(get("exit_signal"), f"{path}.exit_signal", (0, SIGNALS[1])),
        source_pid=_int(get("source_pid"), f"{path}.source_pid", (0, PID[1])),
        ctty=_int(get("ctty", -1), f"{path}.ctty", (-1, 2**20)),
        shares=_shares(get("shares", 0), f"{path}.shares"),
        vmflags=_vmflags(get("vmflags", []), f"{path}.vmflags"),
        cgroup=_cgroup_path(get("cgroup", ""), f"{path}.cgroup"))


SHAREABLE = 0x200 | 0x400                 # CLONE_FS | CLONE_FILES


def _shares(value, path: str) -> int:
    value = _int(value, path, (0, SHAREABLE))
    if value & ~SHAREABLE:
        raise _bad(path, "CLONE_FS (0x200) and/or CLONE_FILES (0x400)", value)
    return value


def _cgroup_path(value, path: str) -> str:
    """"" or an absolute cgroup path without "." or ".." parts (it is joined to a directory
    of the destination's cgroup tree), at most 4096 bytes, no NUL."""
    _of(value, str, path, "a cgroup path (str)")
    if value and (not value.startswith("/") or len(value.encode(errors="surrogateescape")) >
                  4096 or "\0" in value or any(p in (".", "..") for p in value.split("/"))):
        raise _bad(path, "a cgroup path (\"/\" then names, no \".\" or \"..\")", value)
    return value


def _siginfos(value, path: str) -> list[bytes]:
    for i, x in enumerate(_list(value, path)):
        if not isinstance(x, bytes) or len(x) != SIGINFO_SIZE:
            raise _bad(f"{path}[{i}]", f"a {SIGINFO_SIZE}-byte siginfo", x)
    return value


def _decode_thread(t, path: str) -> ThreadState:
    _map(t, path)
    get = lambda key, default=_MISSING: _field(t, key, path, default)  # noqa: E731
    regs = _map(get("regs"), f"{path}.regs")
    values = [regs.get(name) for name in REG_NAMES]
    if list(map(type, values)) != _REG_TYPES or min(values) < 0 or max(values) > U64[1]:
        for name in REG_NAMES:          # name the bad one
            _int(_field(regs, name, f"{path}.regs"), f"{path}.regs.{name}")
    rseq, sched = get("rseq"), get("sched")
    return ThreadState(
        tid=_pid(get("tid"), f"{path}.tid"), regs=dict(zip(REG_NAMES, values)),
        xstate=_of(get("xstate"), bytes, f"{path}.xstate", "bytes"),
        sigmask=_int(get("sigmask"), f"{path}.sigmask"),
        rseq=None if rseq is None else _ints(rseq, f"{path}.rseq", (U64, U32, U32)),
        robust_list=_ints(get("robust_list"), f"{path}.robust_list", (U64, U64)),
        clear_child_tid=_int(get("clear_child_tid"), f"{path}.clear_child_tid"),
        sigaltstack=_ints(get("sigaltstack"), f"{path}.sigaltstack", (U64, U32, U64)),
        pending=_siginfos(get("pending", []), f"{path}.pending"),
        sched=None if sched is None else _ints(sched, f"{path}.sched", SCHED_SPANS),
        cpus=[_int(c, f"{path}.cpus[{i}]", (0, 8191))
              for i, c in enumerate(_list(get("cpus"), f"{path}.cpus"))],
        creds=_creds(get("creds"), f"{path}.creds"),
        name=_comm(get("name", ""), f"{path}.name"),
        timerslack=_int(get("timerslack", 0), f"{path}.timerslack", U64),
        tsc=_int(get("tsc", 0), f"{path}.tsc", (0, 2)),
        spec=_ints(get("spec", [0, 0, 0]), f"{path}.spec", (SPEC,) * 3),
        mce_kill=_int(get("mce_kill", 2), f"{path}.mce_kill", (0, 2)),
        seccomp=[_int(x, f"{path}.seccomp[{i}]", (0, SECCOMP_MAX_FILTERS - 1))
                 for i, x in enumerate(_list(get("seccomp", []), f"{path}.seccomp"))])


def _comm(value, path: str) -> str:
    """A task's name: at most 15 bytes (TASK_COMM_LEN), no NUL."""
    if not isinstance(value, str) or "\0" in value or \
            len(value.encode(errors="surrogateescape")) > 15:
        raise _bad(path, "a task name of at most 15 bytes", value)
    return value


# Seccomp: a thread's filters (the kernel bounds the instructions of a thread's whole list,
# MAX_INSNS_PER_PATH, 4 more counted per filter, so no thread has more filters than this);
# one filter's program is 1..BPF_MAXINSNS instructions of 8 bytes; the flags kept of it
SECCOMP_MAX_INSNS = 32768                 # MAX_INSNS_PER_PATH
SECCOMP_MAX_FILTERS = SECCOMP_MAX_INSNS // 5
SECCOMP_FLAGS = (0, 0x2)                  # SECCOMP_FILTER_FLAG_LOG


def _seccomp_filter(f, path: str) -> SeccompFilter:
    program, flags = _list(f, path, 2, "a list of 2 [program, flags]")
    program = _of(program, bytes, f"{path}.program", "bytes")
    if not program or len(program) % 8 or len(program) > 8 * 4096:
        raise _bad(f"{path}.program", "1 to 4096 whole 8-byte BPF instructions",
                   f"{len(program)} bytes")
    flags = _int(flags, f"{path}.flags", SECCOMP_FLAGS)
    if flags & ~SECCOMP_FLAGS[1]:
        raise _bad(f"{path}.flags", "SECCOMP_FILTER_FLAG_LOG (2) or 0", flags)
    return SeccompFilter(program, flags)


# F_GETOWN_EX types: F_OWNER_TID, F_OWNER_PID, F_OWNER_PGRP
FD_OWNER_TYPES = (0, 2)
FD_EXTRA_KEYS = {"owner", "signal", "pid", "closed_targets"}


def _decode_fd(f, path: str, where: str) -> FileDescriptor:
    if not isinstance(f, list) or len(f) not in (8, 9, 10):
        raise _bad(path, "a list of 8 to 10 [fd, kind, path, flags, offset, dev_inode, "
                         "same_as, data, unix, extra]", f)
    fd = _int(f[0], f"{path}.fd", (0, 2**31 - 1))
    same_as = f[6]
    unix = f[8] if len(f) > 8 else None
    if f[1] == "file" and isinstance(f[7], bytes) and len(f[7]) not in (0, FILE_IDENTITY.size):
        raise _bad(f"{path}.data", f"a regular file's identity ({FILE_IDENTITY.size} bytes: "
                                   "size, mtime) or nothing", f[7])
    extra = _map(f[9], f"{path}.extra") if len(f) > 9 else {}
    unknown = set(extra) - FD_EXTRA_KEYS
    if unknown:
        raise _bad(f"{path}.extra", "keys among " + ", ".join(sorted(FD_EXTRA_KEYS)),
                   sorted(map(str, unknown)))
    owner = extra.get("owner", [0, 0])
    return FileDescriptor(
        fd, _enum(f[1], f"{path}.kind", FD_KINDS), _of(f[2], str, f"{path}.path", "str"),
        _int(f[3], f"{path}.flags", U32), _int(f[4], f"{path}.offset"),
        _ints(f[5], f"{path}.dev_inode", (U64, U64)),
        None if same_as is None else _ints(same_as, f"{path}.same_as", (PID, (0, 2**31 - 1))),
        _of(f[7], bytes, f"{path}.data", "bytes"),
        None if unix is None else _decode_unix(unix, f"{where} fd {fd}"),
        owner=_ints(owner, f"{path}.extra.owner", (FD_OWNER_TYPES, (0, PID[1]))),
        signal=_int(extra.get("signal", 0), f"{path}.extra.signal", (0, SIGNALS[1])),
        target_pid=_pid(_field(extra, "pid", f"{path}.extra"), f"{path}.extra.pid")
        if f[1] == "pidfd" else
        _int(extra.get("pid", 0), f"{path}.extra.pid", (0, 0), "no pid (not a pidfd)"),
        closed_targets=dict(
            _ints(pair, f"{path}.extra.closed_targets[{i}]", ((0, 2**31 - 1),) * 2)
            for i, pair in enumerate(_list(extra.get("closed_targets", []),
                                           f"{path}.extra.closed_targets"))))


def _creds(m, path: str) -> Credentials | None:
    if m is None:
        return None
    _map(m, path)
    get = lambda key: _field(m, key, path)  # noqa: E731
    return Credentials(
        uids=_ints(get("uids"), f"{path}.uids", (U32,) * 3),
        gids=_ints(get("gids"), f"{path}.gids", (U32,) * 3),
        groups=[_int(g, f"{path}.groups[{i}]", U32)
                for i, g in enumerate(_list(get("groups"), f"{path}.groups"))],
        **{c: _int(get(c), f"{path}.{c}") for c in CRED_CAPS},
        no_new_privs=_of(get("no_new_privs"), bool, f"{path}.no_new_privs", "bool"),
        fsuid=_int(get("fsuid"), f"{path}.fsuid", (-1, U32[1])),
        fsgid=_int(get("fsgid"), f"{path}.fsgid", (-1, U32[1])))


def _decode_state(s, path: str) -> ProcessState:
    _map(s, path)
    get = lambda key, default=_MISSING: _field(s, key, path, default)  # noqa: E731
    pid = _pid(get("pid"), f"{path}.pid")
    mm = _map(get("mm"), f"{path}.mm")
    rlimits = _map(get("rlimits"), f"{path}.rlimits")
    sigactions = _map(get("sigactions"), f"{path}.sigactions")
    auxv = _of(get("auxv"), bytes, f"{path}.auxv", "bytes")
    if len(auxv) % 16:
        raise _bad(f"{path}.auxv", "whole (type, value) pairs", f"{len(auxv)} bytes")
    threads = _list(get("threads"), f"{path}.threads")
    if not threads:
        raise _bad(f"{path}.threads", "at least one thread", threads)
    filters = [_seccomp_filter(f, f"{path}.seccomp_filters[{i}]") for i, f in
               enumerate(_list(get("seccomp_filters", []), f"{path}.seccomp_filters"))]
    decoded = [_decode_thread(t, f"{path}.threads[{i}]") for i, t in enumerate(threads)]
    for i, t in enumerate(decoded):
        for j, x in enumerate(t.seccomp):
            if x >= len(filters):
                raise _bad(f"{path}.threads[{i}].seccomp[{j}]",
                           f"an index of seccomp_filters (0..{len(filters) - 1})", x)
        insns = sum(len(filters[x].program) // 8 + 4 for x in t.seccomp) - 4
        if insns > SECCOMP_MAX_INSNS:
            raise _bad(f"{path}.threads[{i}].seccomp", f"filters of at most "
                       f"{SECCOMP_MAX_INSNS} instructions in all (the kernel's bound, 4 "
                       "counted for each filter before the last)", f"{insns}")
    return ProcessState(
        pid=pid, comm=_of(get("comm"), str, f"{path}.comm", "str"),
        exe=_of(get("exe"), str, f"{path}.exe", "str"),
        cwd=_of(get("cwd"), str, f"{path}.cwd", "str"),
        umask=_int(get("umask"), f"{path}.umask", (0, 0o777)),
        mm=MmFields(**{k: _int(_field(mm, k, f"{path}.mm"), f"{path}.mm.{k}")
                       for k in MM_FIELDS}),
        auxv=auxv,
        rlimits={_int(r, f"{path}.rlimits key", (0, RLIMIT_COUNT - 1)):
                 _ints(v, f"{path}.rlimits[{r}]", (U64, U64)) for r, v in rlimits.items()},
        sigactions={_int(n, f"{path}.sigactions key", SIGNALS):
                    SigAction(*_ints(a, f"{path}.sigactions[{n}]", (U64,) * 4))
                    for n, a in sigactions.items()},
        fds=[_decode_fd(f, f"{path}.fds[{i}]", f"pid {pid}")
             for i, f in enumerate(_list(get("fds"), f"{path}.fds"))],
        threads=decoded, seccomp_filters=filters,
        shared_pending=_siginfos(get("shared_pending"), f"{path}.shared_pending"),
        cpus=[_int(c, f"{path}.cpus[{i}]", (0, 8191))
              for i, c in enumerate(_list(get("cpus"), f"{path}.cpus"))],
        creds=_creds(get("creds"), f"{path}.creds"),
        dumpable=_int(get("dumpable"), f"{path}.dumpable", (0, 2)),
        pdeathsig=_int(get("pdeathsig"), f"{path}.pdeathsig", (0, SIGNALS[1])),
        child_subreaper=_of(get("child_subreaper"), bool, f"{path}.child_subreaper", "bool"),
        tty_pgrp=_int(get("tty_pgrp", 0), f"{path}.tty_pgrp", (0, PID[1])),
        oom_score_adj=_int(get("oom_score_adj"), f"{path}.oom_score_adj", (-1000, 1000)),
        personality=_int(get("personality"), f"{path}.personality", U32),
        thp_disable=_of(get("thp_disable"), bool, f"{path}.thp_disable", "bool"),
        mlock_future=_int(get("mlock_future", 0), f"{path}.mlock_future", (0, MCL_FUTURE_BITS)),
        stopped=_of(get("stopped"), bool, f"{path}.stopped", "bool"),
        root=_absolute(get("root", "/"), f"{path}.root"),
        deleted_dirs=_deleted_dirs(get("deleted_dirs", {}), f"{path}.deleted_dirs"),
        timers=[_decode_timer(t, f"{path}.timers[{i}]", len(threads))
                for i, t in enumerate(_list(get("timers"), f"{path}.timers"))],
        itimers=[_ints(v, f"{path}.itimers[{i}]", (I64P, US, I64P, US))
                 for i, v in enumerate(_list(get("itimers"), f"{path}.itimers", 3)
                                       if get("itimers") else [])],
        securebits=_bits(get("securebits", 0), f"{path}.securebits", SECUREBITS),
        mdwe=_int(get("mdwe", 0), f"{path}.mdwe", (0, 3)),
        memory_merge=_of(get("memory_merge", False), bool, f"{path}.memory_merge", "bool"),
        membarrier=_bits(get("membarrier", 0), f"{path}.membarrier", MEMBARRIER_REGISTRATIONS),
        loginuid=_int(get("loginuid", -1), f"{path}.loginuid", (-1, U32[1])))


# PR_GET_SPECULATION_CTRL values (PR_SPEC_PRCTL..PR_SPEC_DISABLE_NOEXEC bits); membarrier
# registrations (MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED, _PRIVATE_EXPEDITED, _SYNC_CORE,
# _RSEQ: bits 2, 4, 6, 8)
SPEC = (0, 0x1F)
MEMBARRIER_REGISTRATIONS = 4 | 16 | 64 | 256
SECUREBITS = 0xFFF          # SECBIT_NOROOT .. SECBIT_EXEC_DENY_INTERACTIVE_LOCKED (6.14)


def _bits(value, path: str, allowed: int) -> int:
    """An int made of the bits of `allowed` only."""
    if type(value) is not int or value < 0 or value & ~allowed:
        raise _bad(path, f"bits of {allowed:#x}", value)
    return value


def _absolute(value, path: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _bad(path, "an absolute path", value)
    return value


def _deleted_dirs(m, path: str) -> dict[str, tuple[int, int, int]]:
    """A deleted working directory or root: "cwd"/"root" -> (mode, uid, gid)."""
    out = {}
    for key, value in _map(m, path).items():
        if key not in ("cwd", "root"):
            raise _bad(f"{path} key", '"cwd" or "root"', key)
        out[key] = _ints(value, f"{path}.{key}", ((0, 0o7777), U32, U32))
    return out


# timer_create's clocks (CLOCK_REALTIME..CLOCK_TAI), sigev_notify values (SIGEV_SIGNAL,
# SIGEV_NONE, SIGEV_THREAD_ID | SIGEV_SIGNAL), seconds and sub-second parts
TIMER_CLOCKS, TIMER_NOTIFY = (0, 11), (0, 6)
I64P, NS, US = (0, 2**63 - 1), (0, 999_999_999), (0, 999_999)


def _decode_timer(t, path: str, threads: int) -> PosixTimer:
    tid, clock, signo, value, notify, thread, i_s, i_ns, r_s, r_ns, overrun = _ints(
        t, path, ((0, 2**31 - 1), TIMER_CLOCKS, (0, SIGNALS[1]), U64, TIMER_NOTIFY,
                  (0, max(0, threads - 1)), I64P, NS, I64P, NS, (0, 2**31 - 1)))
    if notify not in (0, 1, 4):
        raise _bad(f"{path}.notify", "SIGEV_SIGNAL (0), SIGEV_NONE (1) or SIGEV_THREAD_ID (4)",
                   notify)
    return PosixTimer(tid, clock, signo, value, notify, thread, (i_s, i_ns), (r_s, r_ns),
                      overrun)


def _check_states(states: list[ProcessState], tasks: list[AddressSpaceRound]) -> None:
    """Pids and fds named across the states exist: a state per task at most, once each; a
    shared open file description names an fd met before it."""
    known = {t.pid for t in tasks}
    seen: set[tuple[int, int]] = set()
    pids: set[int] = set()
    for i, s in enumerate(states):
        if s.pid not in known or s.pid in pids:
            raise _Bad(f"states[{i}].pid: {s.pid} is not a task of the round, or has two states")
        pids.add(s.pid)
        fds: set[int] = set()
        for j, f in enumerate(s.fds):
            if f.fd in fds:
                raise _Bad(f"states[{i}].fds[{j}].fd: {f.fd} is listed twice")
            fds.add(f.fd)
            if f.same_as and f.same_as not in seen:
                raise _Bad(f"states[{i}].fds[{j}].same_as: {list(f.same_as)} is not an fd "
                           "listed before it")
            seen.add((s.pid, f.fd))


def _stats(m, path: str) -> dict:
    """stats is free-form, but what is shown or computed from it has its type."""
    _map(m, path)
    for key in ("pages", "bytes"):
        if key in m:
            _int(m[key], f"{path}.{key}")
    if "frozen_at" in m:
        _of(m["frozen_at"], (int, float), f"{path}.frozen_at", "a number")
    for k, v in _map(m.get("phases_ms", {}), f"{path}.phases_ms").items():
        _of(k, str, f"{path}.phases_ms key", "str")
        _of(v, (int, float), f"{path}.phases_ms.{k}", "a number")
    return m


# ---- System V IPC (optional "ipc" key of a round) --------------------------------------------

S32 = (-2**31, 2**31 - 1)
IPC_ID = (0, 2**31 - 1)
# id, key, mode (permission bits, SHM_DEST, SHM_LOCKED), uid, gid, cuid, cgid
_IPC_HEAD = (IPC_ID, S32, (0, 0o7777), U32, U32, U32, U32)


def _ipc(ipc: SysvIpc) -> dict:
    head = lambda o: [o.id, o.key, o.mode, o.uid, o.gid, o.cuid, o.cgid]  # noqa: E731
    return {"place": ipc.place, "same_objects": ipc.same_objects,
            "shm": [head(o) + [o.size, o.name_key, [[off, d] for off, d in o.pages],
                               [list(r) for r in o.readonly]] for o in ipc.shm],
            "sem": [head(o) + [o.values] for o in ipc.sem],
            "msg": [head(o) + [o.qbytes, [[t, d] for t, d in o.messages]] for o in ipc.msg]}


def _decode_ipc(m, path: str) -> SysvIpc:
    _map(m, path)
    get = lambda key: _field(m, key, path)  # noqa: E731
    ipc = SysvIpc(_enum(get("place"), f"{path}.place", IPC_PLACES),
                  _of(get("same_objects"), bool, f"{path}.same_objects", "bool"))
    for i, o in enumerate(_list(get("shm"), f"{path}.shm")):
        where = f"{path}.shm[{i}]"
        _list(o, where, 11)
        head = _ints(o[:9], where, _IPC_HEAD + ((1, 2**63 - 1), S32))
        pages = []
        end = 0
        for j, p in enumerate(_list(o[9], f"{where}.pages")):
            off, data = _list(p, f"{where}.pages[{j}]", 2)
            _int(off, f"{where}.pages[{j}].offset", (end, head[7]))
            _of(data, bytes, f"{where}.pages[{j}].bytes", "bytes")
            if off + len(data) > head[7]:
                raise _bad(f"{where}.pages[{j}]", f"bytes within the segment's {head[7]}",
                           off + len(data))
            end = off + len(data)
            pages.append((off, data))
        readonly = [_ints(r, f"{where}.readonly[{j}]", (PID, U64))
                    for j, r in enumerate(_list(o[10], f"{where}.readonly"))]
        ipc.shm.append(SysvShm(*head, pages, readonly))
    for i, o in enumerate(_list(get("sem"), f"{path}.sem")):
        where = f"{path}.sem[{i}]"
        _list(o, where, 8)
        values = [_int(v, f"{where}.values[{j}]", (0, 32767))
                  for j, v in enumerate(_list(o[7], f"{where}.values"))]
        if not values:
            raise _bad(f"{where}.values", "at least one semaphore", values)
        ipc.sem.append(SysvSem(*_ints(o[:7], where, _IPC_HEAD), values))
    for i, o in enumerate(_list(get("msg"), f"{path}.msg")):
        where = f"{path}.msg[{i}]"
        _list(o, where, 9)
        head = _ints(o[:8], where, _IPC_HEAD + (U32,))
        messages = []
        for j, msg in enumerate(_list(o[8], f"{where}.messages")):
            mtype, data = _list(msg, f"{where}.messages[{j}]", 2)
            messages.append((_int(mtype, f"{where}.messages[{j}].type", (1, 2**63 - 1)),
                             _of(data, bytes, f"{where}.messages[{j}].bytes", "bytes")))
        ipc.msg.append(SysvMsg(*head, messages))
    for kind in ("shm", "sem", "msg"):
        ids = [o.id for o in getattr(ipc, kind)]
        if len(set(ids)) != len(ids):
            raise _Bad(f"{path}.{kind}: an id is listed twice")
    return ipc


def encode_round(r: Round) -> dict:
    return {"id": r.id, "index": r.index, "parent_id": r.parent_id, "parent_path": r.parent_path,
            "kind": r.kind, "source": r.source, "tasks": [_task(t) for t in r.tasks],
            "states": [_state(s) for s in r.states],
            "zombies": [[z.pid, z.parent, z.sid, z.pgid, z.exit_code] for z in r.zombies],
            "stats": r.stats} | \
        ({"visible": [[v.pid, v.fields, v.threads] for v in r.visible]} if r.visible else {}) | \
        ({"ipc": _ipc(r.ipc)} if r.ipc is not None else {})


def _texts(value, path: str) -> dict[str, str]:
    """A map of str field names to str values (a VisibleState's fields)."""
    m = _map(value, path)
    for k, v in m.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise _bad(f"{path}[{k!r}]", "str: str", v)
    return m


def _decode_visible(v, path: str) -> VisibleState:
    pid, fields, threads = _list(v, path, 3)
    threads = _map(threads, f"{path}[2]")
    return VisibleState(_pid(pid, f"{path}[0]"), _texts(fields, f"{path}[1]"),
                        {_pid(tid, f"{path}[2] key"): _texts(t, f"{path}[2][{tid}]")
                         for tid, t in threads.items()})


def _check_tree(tasks: list[AddressSpaceRound], zombies: list[Zombie]) -> None:
    """One root first, every other task after its parent, no pid twice."""
    seen: set[int] = set()
    for i, t in enumerate(tasks):
        if (t.parent == 0) != (i == 0):
            raise ValueError(f"task {t.pid}: the root of the tree must come first, and only it "
                             "has no parent")
        if t.parent and t.parent not in seen:
            raise ValueError(f"task {t.pid} comes before its parent {t.parent}")
        if t.pid in seen:
            raise ValueError(f"task {t.pid} is listed twice")
        seen.add(t.pid)
    for z in zombies:
        if z.parent not in seen or z.pid in seen:
            raise ValueError(f"zombie {z.pid}: its parent {z.parent} is not a task of the tree "
                             "(or its pid is a live task's)")


def decode_round(m, where: str = ROUND_FILE) -> Round:
    """The Round a decoded round.img body describes, every field checked (ImageError naming
    the field otherwise)."""
    try:
        _map(m, "metadata")
        get = lambda key, default=_MISSING: _field(m, key, "metadata", default)  # noqa: E731
        kind = _enum(get("kind"), "kind", ROUND_KINDS)
        tasks = [_decode_task(t, f"tasks[{i}]") for i, t in enumerate(_list(get("tasks"), "tasks"))]
        if not tasks:
            raise _bad("tasks", "at least one task", [])
        states = [_decode_state(s, f"states[{i}]")
                  for i, s in enumerate(_list(get("states"), "states"))]
        zombies = [Zombie(*_ints(z, f"zombies[{i}]", (PID, PID, (0, PID[1]), (0, PID[1]),
                                                      (0, 0xffff))))
                   for i, z in enumerate(_list(get("zombies"), "zombies"))]
        parent_id, parent_path = get("parent_id"), get("parent_path")
        if (parent_id is None) != (parent_path is None):
            raise _Bad("parent_id, parent_path: expected both or neither")
        if parent_id is not None:
            _of(parent_id, str, "parent_id", "str")
            _of(parent_path, str, "parent_path", "str")
            if not parent_path or "\0" in parent_path:
                raise _bad("parent_path", "a directory path", parent_path)
        _check_tree(tasks, zombies)
        _check_states(states, tasks)
        if kind == "dump" and sorted(s.pid for s in states) != sorted(t.pid for t in tasks):
            raise ValueError("the final round's process states do not match its tasks")
        _check_unix(states)
        # optional (a final round made for --verify): older images have none
        visible = [_decode_visible(v, f"visible[{i}]")
                   for i, v in enumerate(_list(get("visible", []), "visible"))]
        # optional: a tree with System V IPC of its own
        ipc = _decode_ipc(get("ipc"), "ipc") if "ipc" in m else None
        return Round(_of(get("id"), str, "id", "str"), _int(get("index"), "index", (0, 2**31)),
                     parent_id, parent_path, kind, _map(get("source"), "source"), tasks,
                     states, zombies, _stats(get("stats", {}), "stats"), visible, ipc)
    except _Bad as e:
        raise ImageError(f"{where}: {e}") from None
    except ValueError as e:
        raise ImageError(f"{where}: malformed metadata: {e}") from None


# ---- files ------------------------------------------------------------------------------------

def encode_image(r: Round) -> bytes:
    """The bytes of round.img for r."""
    # paths are kept byte-exact: non-UTF-8 names travel as surrogate escapes
    body = msgpack.packb(encode_round(r), use_bin_type=True, unicode_errors="surrogateescape")
    return HEADER.pack(MAGIC, VERSION, len(body), zlib.crc32(body)) + body


MAX_METADATA = 1 << 30       # round.img bodies are kilobytes to megabytes: a bigger length lies


def _check_header(head: bytes, where: str, available: int) -> int:
    """The body length the header of a round.img announces, checked against the `available`
    bytes that follow it."""
    if len(head) < HEADER.size:
        raise ImageError(f"{where}: truncated ({len(head)} bytes, header alone is {HEADER.size})")
    magic, version, length, _ = HEADER.unpack_from(head)
    if magic != MAGIC:
        raise ImageError(f"{where}: not a prerestore image (magic {magic!r})")
    if version != VERSION:
        raise ImageError(f"{where}: image format version {version}; this prerestore reads "
                         f"version {VERSION}")
    if length > MAX_METADATA:
        raise ImageError(f"{where}: corrupt (the header announces {length} bytes of metadata, "
                         f"more than the {MAX_METADATA >> 20} MiB limit)")
    if available < length:
        raise ImageError(f"{where}: truncated (metadata is {available} of {length} bytes)")
    return length


def decode_image(data: bytes, where: str) -> Round:
    """Check and decode the bytes of a round.img; `where` names it in errors."""
    length = _check_header(data[:HEADER.size], where, len(data) - HEADER.size)
    return _decode_body(data[HEADER.size:HEADER.size + length],
                        HEADER.unpack_from(data)[3], where)


def _decode_body(body: bytes, crc: int, where: str) -> Round:
    if zlib.crc32(body) != crc:
        raise ImageError(f"{where}: corrupt (metadata checksum mismatch)")
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=False,
                            unicode_errors="surrogateescape")
    except Exception as e:  # msgpack raises several types for garbage
        raise ImageError(f"{where}: corrupt metadata ({e})") from None
    if not isinstance(m, dict):
        raise ImageError(f"{where}: corrupt metadata (not a map)")
    return decode_round(m, where)


def write_round(directory: str, r: Round) -> None:
    tmp = os.path.join(directory, ROUND_FILE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(encode_image(r))
    os.rename(tmp, os.path.join(directory, ROUND_FILE))   # a round exists only once complete


_FILE_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISSOCK, "a socket"))


def open_image_file(path: str):
    """An image file opened for reading (symbolic links followed) once it is known to be a
    regular file: a device or a FIFO put in its place (/dev/urandom, /dev/zero) would be read
    without end, or block. Returns (file, size)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer before we can refuse it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ImageError(f"{path}: cannot open: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = next((name for test, name in _FILE_TYPES if test(st.st_mode)), "not a file")
        raise ImageError(f"{path}: {kind}, not a regular file: refused")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), st.st_size


def read_round(directory: str) -> Round:
    if not os.path.isdir(directory):
        raise ImageError(f"{directory}: " + ("not a directory: -D names an image directory"
                                             if os.path.exists(directory) else
                                             "no such image directory"))
    path = os.path.join(directory, ROUND_FILE)
    try:
        f, size = open_image_file(path)
    except FileNotFoundError:
        raise ImageError(f"{directory}: no {ROUND_FILE}: not an image directory "
                         "(or the round was never completed)") from None
    with f:
        head = f.read(HEADER.size)
        length = _check_header(head, path, size - len(head))
        body = f.read(length)
        if len(body) < length:          # shrunk as we read
            raise ImageError(f"{path}: truncated (metadata is {len(body)} of {length} bytes)")
    r = _decode_body(body, HEADER.unpack_from(head)[3], path)
    check_pages_file(directory, r)
    return r


def pages_size(r: Round) -> int:
    return sum(ranges_bytes(t.pages) for t in r.tasks)


def check_pages_file(directory: str, r: Round) -> None:
    """pages.img holds the pages of the round's tasks that come from the file, back to back in
    task order: exactly as many bytes as their ranges list, in a regular file."""
    want = 0
    for i, t in enumerate(r.tasks):
        if t.pages_from != "file":
            continue
        if t.pages_offset != want:
            raise ImageError(f"{os.path.join(directory, ROUND_FILE)}: tasks[{i}].pages_offset: "
                             f"expected {want} (the pages of the tasks before it), got "
                             f"{t.pages_offset}")
        want += ranges_bytes(t.pages)
    path = os.path.join(directory, PAGES_FILE)
    if not os.path.lexists(path) and not want:
        return
    open_pages(path, want, exact=True).close()


def open_pages(path: str, need: int, exact: bool = False):
    """A round's pages.img, open, refused by name unless it is a regular file of `need` bytes
    (at least, unless exact)."""
    try:
        f, have = open_image_file(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: missing: the metadata lists {need} bytes of pages") from None
    if have < need or (exact and have != need):
        f.close()
        raise ImageError(f"{path}: {'truncated' if have < need else 'overlong'}: {have} bytes, "
                         f"the metadata lists {need} bytes of pages")
    return f


def resolve_prev(images_dir: str, prev: str) -> str:
    """--prev-images-dir as CRIU reads it: a relative path is relative to the image directory
    (-D), not to the current one (scripts written for CRIU and runc pass `../1`). Absolute."""
    return os.path.normpath(os.path.join(os.path.abspath(images_dir), prev))


def parent_dir(directory: str, r: Round) -> str | None:
    if not r.parent_path:
        return None
    return os.path.normpath(os.path.join(directory, r.parent_path))


def read_chain(directory: str) -> list[tuple[str, Round]]:
    """The round in `directory` and its ancestors, oldest first; checks the links."""
    chain = []
    d: str | None = directory
    while d is not None:
        try:
            r = read_round(d)
        except ImageError as e:
            if not chain:
                raise
            raise ImageError(f"{chain[-1][0]}: its parent round (parent_path "
                             f"{chain[-1][1].parent_path}): {e}") from None
        if chain and chain[-1][1].parent_id != r.id:
            raise ImageError(f"{chain[-1][0]}: parent image {d} has id {r.id}, expected "
                             f"{chain[-1][1].parent_id} (mismatched parent)")
        chain.append((d, r))
        d = parent_dir(d, r)
        if len(chain) > 10000:
            raise ImageError(f"{directory}: parent chain loops")
    return chain[::-1]


# ---- wire messages ----------------------------------------------------------------------------
# source -> destination (remote.py):
#   begin  {pidns: bool, id: MIGRATION_ID (optional: older sources send none)}
#   round  {meta: bytes (a round.img), pages: int}, then `pages` bytes of DATA frames
#   final  {meta, pages}, the same
#   abort  {}            done {}
#   status {id}          alone on its connection: what became of migration `id`?
# destination -> source: {ok: true, stats: map} | {ok: false, error: str, kind: str} | for
#   status, {ok: true, outcome: one of OUTCOMES, detail: str}

OPS = ("begin", "round", "final", "abort", "done", "status")
OUTCOMES = ("running", "aborted", "pending", "unknown")
ID_CHARS = frozenset("0123456789abcdef")
ID_LENGTH = 32                     # 128 random bits, hex


def migration_id(value, path: str = "id") -> str:
    """A migration's id: 32 lowercase hex digits (it names a file on the destination)."""
    if not isinstance(value, str) or len(value) != ID_LENGTH or not set(value) <= ID_CHARS:
        raise _bad(path, f"{ID_LENGTH} hex digits", value)
    return value


def decode_request(msg: dict) -> dict:
    """A message from the source, its fields checked for its op (ProtocolError naming the
    field otherwise). Fields an op does not know are dropped."""
    try:
        op = _enum(_field(msg, "op", "message"), "op", OPS)
        out = {"op": op}
        if op == "begin":
            out["pidns"] = _of(msg.get("pidns"), (bool, type(None)), "begin.pidns",
                               "true or false")
            out["id"] = None if msg.get("id") is None else migration_id(msg["id"], "begin.id")
        elif op in ("round", "final"):
            out["meta"] = _of(_field(msg, "meta", op), bytes, f"{op}.meta", "bytes")
            out["pages"] = _int(_field(msg, "pages", op), f"{op}.pages")
        elif op == "status":
            out["id"] = migration_id(_field(msg, "id", "status"), "status.id")
        return out
    except _Bad as e:
        raise ProtocolError(f"bad message: {e}") from None


def decode_outcome(msg: dict) -> tuple[str, str]:
    """The destination's answer to status: (outcome, detail)."""
    try:
        if msg.get("ok") is not True:
            raise _Bad(f"status refused: {msg.get('kind', 'error')}: {msg.get('error')}")
        outcome = _enum(_field(msg, "outcome", "status reply"), "outcome", OUTCOMES)
        detail = _of(msg.get("detail", ""), str, "detail", "str")
        return outcome, detail[:400]
    except _Bad as e:
        raise ProtocolError(f"bad status reply: {e}") from None
