"""The one image schema: a round directory holds `round.img` (metadata) and `pages.img` (the
bytes of every page range listed in the metadata, back to back).

round.img = MAGIC (8 bytes) | version u32 | body length u64 | crc32(body) u32 | body
body      = msgpack map, described field by field by the encode_*/decode_* pairs below.

Readers refuse another magic ("not a prerestore image"), another version (naming both), a
short file ("truncated"), a bad checksum ("corrupt") and a pages file shorter than the ranges
the metadata lists. New fields are added as optional map keys within a version; a change that
old readers would misread bumps VERSION."""
from __future__ import annotations

import os
import struct
import zlib

import msgpack

from ..errors import ImageError
from ..model import (UNIX_STATES, AddressSpaceRound, Credentials, FileDescriptor, MmFields,
                     ProcessState, Round, SigAction, ThreadState, UnixSocketState, Vma, Zombie,
                     ranges_bytes)

MAGIC = b"PRRSTIMG"
VERSION = 3          # 2: process trees (task tree fields, states, zombies)
                     # 3: unix sockets carry a state map of their own (fd field 9)
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
            "exit_signal": t.exit_signal, "source_pid": t.source_pid, "ctty": t.ctty}


def _thread(t: ThreadState) -> dict:
    return {"tid": t.tid, "regs": t.regs, "xstate": t.xstate, "sigmask": t.sigmask,
            "rseq": list(t.rseq) if t.rseq else None, "robust_list": list(t.robust_list),
            "clear_child_tid": t.clear_child_tid, "sigaltstack": list(t.sigaltstack),
            "pending": t.pending}


def _state(s: ProcessState) -> dict:
    return {"pid": s.pid, "comm": s.comm, "exe": s.exe, "cwd": s.cwd, "umask": s.umask,
            "mm": vars(s.mm), "auxv": s.auxv,
            "rlimits": {r: list(v) for r, v in s.rlimits.items()},
            "sigactions": {n: [a.handler, a.flags, a.restorer, a.mask]
                           for n, a in s.sigactions.items()},
            "fds": [[f.fd, f.kind, f.path, f.flags, f.offset, list(f.dev_inode),
                     list(f.same_as) if f.same_as else None, f.data,
                     _unix(f.unix) if f.unix else None] for f in s.fds],
            "threads": [_thread(t) for t in s.threads], "shared_pending": s.shared_pending,
            "cpus": s.cpus, "creds": vars(s.creds) if s.creds else None,
            "dumpable": s.dumpable, "pdeathsig": s.pdeathsig,
            "child_subreaper": s.child_subreaper, "tty_pgrp": s.tty_pgrp}


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


def _creds(m: dict | None) -> Credentials | None:
    if m is None:
        return None
    return Credentials(**{**m, "uids": tuple(m["uids"]), "gids": tuple(m["gids"]),
                          "groups": list(m["groups"])})


def _decode_state(s: dict) -> ProcessState:
    return ProcessState(
        pid=s["pid"], comm=s["comm"], exe=s["exe"], cwd=s["cwd"], umask=s["umask"],
        mm=MmFields(**s["mm"]), auxv=s["auxv"],
        rlimits={int(r): tuple(v) for r, v in s["rlimits"].items()},
        sigactions={int(n): SigAction(*a) for n, a in s["sigactions"].items()},
        fds=[FileDescriptor(f[0], f[1], f[2], f[3], f[4], tuple(f[5]),
                            tuple(f[6]) if f[6] else None, f[7],
                            _decode_unix(f[8], f"pid {s['pid']} fd {f[0]}")
                            if len(f) > 8 and f[8] is not None else None)
             for f in s["fds"]],
        threads=[ThreadState(t["tid"], t["regs"], t["xstate"], t["sigmask"],
                             tuple(t["rseq"]) if t["rseq"] else None,
                             tuple(t["robust_list"]), t["clear_child_tid"],
                             tuple(t["sigaltstack"]), t["pending"])
                 for t in s["threads"]],
        shared_pending=s["shared_pending"], cpus=list(s["cpus"]),
        creds=_creds(s["creds"]), dumpable=s["dumpable"], pdeathsig=s["pdeathsig"],
        child_subreaper=bool(s["child_subreaper"]), tty_pgrp=_int(s, "tty_pgrp", 0))


def _int(m: dict, key: str, default: int) -> int:
    """An optional int field (added within this version)."""
    value = m.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"field {key!r} is {type(value).__name__}, expected int")
    return value


# ---- field types: a map from a file or a peer is checked before any object is built ---------

INT, STR, BYTES, BOOL, NONE = int, str, bytes, bool, type(None)
FLAG = (bool, int)                  # written as bool, read leniently (older images: 0/1)


def _typed(value, kinds, what: str):
    """value is one of kinds (bool counts as an int only where FLAG says so): else a
    ValueError that names the field."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join("None" if k is NONE else k.__name__ for k in kinds)
        raise ValueError(f"{what} is {value!r:.40} ({type(value).__name__}), expected {names}")
    return value


def _ints(value, what: str, n: int | None = None) -> None:
    """A list of ints (of length n if given)."""
    _typed(value, list, what)
    if n is not None and len(value) != n:
        raise ValueError(f"{what} has {len(value)} items, expected {n}")
    for i, x in enumerate(value):
        _typed(x, INT, f"{what}[{i}]")


def _fields(m, spec: dict, what: str) -> None:
    """Every key of spec that m has is of its kinds (missing keys: KeyError or defaults later)."""
    _typed(m, dict, what)
    for key, kinds in spec.items():
        if key in m:
            if kinds == "ints":
                _ints(m[key], f"{what} field {key!r}")
            else:
                _typed(m[key], kinds, f"{what} field {key!r}")


VMA_FIELDS = (("start", INT), ("end", INT), ("prot", INT), ("shared", FLAG), ("offset", INT),
              ("path", STR), ("inode", INT), ("dev", STR))
TASK_FIELDS = {"pid": INT, "layout": list, "fresh": BYTES, "pages": BYTES, "zap": BYTES,
               "pages_offset": INT, "pages_from": STR, "tids": "ints", "parent": INT,
               "sid": INT, "pgid": INT, "starttime": INT, "first": FLAG, "exit_signal": INT,
               "source_pid": INT, "ctty": INT}
STATE_FIELDS = {"pid": INT, "comm": STR, "exe": STR, "cwd": STR, "umask": INT, "mm": dict,
                "auxv": BYTES, "rlimits": dict, "sigactions": dict, "fds": list,
                "threads": list, "shared_pending": list, "cpus": "ints", "creds": (dict, NONE),
                "dumpable": INT, "pdeathsig": INT, "child_subreaper": FLAG, "tty_pgrp": INT}
THREAD_FIELDS = {"tid": INT, "regs": dict, "xstate": BYTES, "sigmask": INT,
                 "rseq": (list, NONE), "robust_list": "ints", "clear_child_tid": INT,
                 "sigaltstack": "ints", "pending": list}
FD_FIELDS = (("fd", INT), ("kind", STR), ("path", STR), ("flags", INT), ("offset", INT),
             ("dev_inode", list), ("same_as", (list, NONE)), ("data", BYTES),
             ("unix", (dict, NONE)))
CREDS_FIELDS = {"uids": "ints", "gids": "ints", "groups": "ints", "cap_inheritable": INT,
                "cap_permitted": INT, "cap_effective": INT, "cap_bounding": INT,
                "cap_ambient": INT, "no_new_privs": FLAG}


def _check_vma(v, what: str) -> None:
    _typed(v, list, what)
    if not 6 <= len(v) <= len(VMA_FIELDS):
        raise ValueError(f"{what} has {len(v)} fields, expected 6 to {len(VMA_FIELDS)}")
    for x, (name, kinds) in zip(v, VMA_FIELDS):
        _typed(x, kinds, f"{what} field {name!r}")
    if not 0 <= v[0] < v[1] < 1 << 64 or v[2] < 0 or v[4] < 0:
        raise ValueError(f"{what} is {v[0]:#x}-{v[1]:#x} prot {v[2]} offset {v[4]}: not a "
                         "mapping")


def _check_state(s, what: str) -> None:
    _fields(s, STATE_FIELDS, what)
    what = f"{what} (pid {s.get('pid')})"
    for key, value in s.get("mm", {}).items():
        _typed(value, INT, f"{what} mm field {key!r}")
    for r, limits in s.get("rlimits", {}).items():
        _ints(limits, f"{what} rlimit {r!r:.20}", 2)
    for n, action in s.get("sigactions", {}).items():
        _ints(action, f"{what} signal action {n!r:.20}", 4)
    for i, f in enumerate(s.get("fds", [])):
        where = f"{what} fd #{i}"
        _typed(f, list, where)
        if not 8 <= len(f) <= len(FD_FIELDS):
            raise ValueError(f"{where} has {len(f)} fields, expected 8 to {len(FD_FIELDS)}")
        for x, (name, kinds) in zip(f, FD_FIELDS):
            _typed(x, kinds, f"{where} field {name!r}")
        _ints(f[5], f"{where} field 'dev_inode'", 2)
        if f[6] is not None:
            _ints(f[6], f"{where} field 'same_as'", 2)
    for i, t in enumerate(s.get("threads", [])):
        where = f"{what} thread #{i}"
        _fields(t, THREAD_FIELDS, where)
        for reg, value in t.get("regs", {}).items():
            _typed(reg, STR, f"{where} register name")
            _typed(value, INT, f"{where} register {reg!r}")
        if t.get("rseq") is not None:
            _ints(t["rseq"], f"{where} field 'rseq'", 3)
        for x in t.get("pending", []):
            _typed(x, BYTES, f"{where} pending signal")
    for x in s.get("shared_pending", []):
        _typed(x, BYTES, f"{what} pending signal")
    if s.get("creds") is not None:
        _fields(s["creds"], CREDS_FIELDS, f"{what} credentials")


def _check_types(m) -> None:
    """Every field a decoder reads is of the type it expects: a wrong one (a protection that is
    None, a path that is a boolean) is named here as a ValueError, instead of surfacing as a
    TypeError deep in staging (or worse, as a wrong value handed to the kernel)."""
    _fields(m, {"id": STR, "index": INT, "parent_id": (STR, NONE), "parent_path": (STR, NONE),
                "kind": STR, "source": dict, "tasks": list, "states": list, "zombies": list,
                "stats": dict}, "the round")
    for i, t in enumerate(m.get("tasks", [])):
        what = f"task #{i}"
        _fields(t, TASK_FIELDS, what)
        what = f"task {t.get('pid')}"
        for j, v in enumerate(t.get("layout", [])):
            _check_vma(v, f"{what} VMA #{j}")
    for i, s in enumerate(m.get("states", [])):
        _check_state(s, f"state #{i}")
    for i, z in enumerate(m.get("zombies", [])):
        _ints(z, f"zombie #{i}", 5)


def encode_round(r: Round) -> dict:
    return {"id": r.id, "index": r.index, "parent_id": r.parent_id, "parent_path": r.parent_path,
            "kind": r.kind, "source": r.source, "tasks": [_task(t) for t in r.tasks],
            "states": [_state(s) for s in r.states],
            "zombies": [[z.pid, z.parent, z.sid, z.pgid, z.exit_code] for z in r.zombies],
            "stats": r.stats}


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


def decode_round(m: dict) -> Round:
    try:
        _check_types(m)
        tasks = [AddressSpaceRound(t["pid"], [Vma(*v) for v in t["layout"]], t["fresh"],
                                   t["pages"], t["zap"], t["pages_offset"], t["pages_from"],
                                   list(t["tids"]), t["parent"], t["sid"], t["pgid"],
                                   t["starttime"], bool(t["first"]), t["exit_signal"],
                                   t["source_pid"], _int(t, "ctty", -1))
                 for t in m["tasks"]]
        states = [_decode_state(s) for s in m["states"]]
        zombies = [Zombie(*z) for z in m["zombies"]]
        if m["kind"] not in ("predump", "dump"):
            raise ValueError(f"unknown round kind {m['kind']!r}")
        _check_tree(tasks, zombies)
        if m["kind"] == "dump" and sorted(s.pid for s in states) != sorted(t.pid for t in tasks):
            raise ValueError("the final round's process states do not match its tasks")
        _check_unix(states)
        return Round(m["id"], m["index"], m["parent_id"], m["parent_path"], m["kind"],
                     m["source"], tasks, states, zombies, m.get("stats", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise ImageError(f"image metadata is malformed: {type(e).__name__}: {e}") from None


# ---- files ------------------------------------------------------------------------------------

def encode_image(r: Round) -> bytes:
    """The bytes of round.img for r."""
    # paths are kept byte-exact: non-UTF-8 names travel as surrogate escapes
    body = msgpack.packb(encode_round(r), use_bin_type=True, unicode_errors="surrogateescape")
    return HEADER.pack(MAGIC, VERSION, len(body), zlib.crc32(body)) + body


def decode_image(data: bytes, where: str) -> Round:
    """Check and decode the bytes of a round.img; `where` names it in errors."""
    if len(data) < HEADER.size:
        raise ImageError(f"{where}: truncated ({len(data)} bytes, header alone is {HEADER.size})")
    magic, version, length, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ImageError(f"{where}: not a prerestore image (magic {magic!r})")
    if version != VERSION:
        raise ImageError(f"{where}: image format version {version}; this prerestore reads "
                         f"version {VERSION}")
    body = data[HEADER.size:]
    if len(body) < length:
        raise ImageError(f"{where}: truncated (metadata is {len(body)} of {length} bytes)")
    body = body[:length]
    if zlib.crc32(body) != crc:
        raise ImageError(f"{where}: corrupt (metadata checksum mismatch)")
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=False,
                            unicode_errors="surrogateescape")
    except Exception as e:  # msgpack raises several types for garbage
        raise ImageError(f"{where}: corrupt metadata ({e})") from None
    if not isinstance(m, dict):
        raise ImageError(f"{where}: corrupt metadata (not a map)")
    return decode_round(m)


def write_round(directory: str, r: Round) -> None:
    tmp = os.path.join(directory, ROUND_FILE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(encode_image(r))
    os.rename(tmp, os.path.join(directory, ROUND_FILE))   # a round exists only once complete


def read_round(directory: str) -> Round:
    path = os.path.join(directory, ROUND_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError(f"{directory}: no {ROUND_FILE}: not an image directory "
                         "(or the round was never completed)") from None
    r = decode_image(data, path)
    check_pages_file(directory, r)
    return r


def pages_size(r: Round) -> int:
    return sum(ranges_bytes(t.pages) for t in r.tasks)


def check_pages_file(directory: str, r: Round) -> None:
    for t in r.tasks:
        if t.pages_from not in ("file", "pid"):
            raise ImageError(f"{directory}: unknown page source {t.pages_from!r}")
        for name in ("pages", "fresh", "zap"):
            if len(getattr(t, name)) % 16:
                raise ImageError(f"{directory}: corrupt {name} ranges of task {t.pid} "
                                 f"({len(getattr(t, name))} bytes is not whole ranges)")
    want = max((t.pages_offset + ranges_bytes(t.pages) for t in r.tasks
                if t.pages_from == "file"), default=0)
    path = os.path.join(directory, PAGES_FILE)
    have = os.path.getsize(path) if os.path.exists(path) else -1
    if want and have < want:
        raise ImageError(f"{path}: truncated or missing: {max(have, 0)} bytes, the metadata "
                         f"lists {want} bytes of pages")


def parent_dir(directory: str, r: Round) -> str | None:
    if not r.parent_path:
        return None
    return os.path.normpath(os.path.join(directory, r.parent_path))


def read_chain(directory: str) -> list[tuple[str, Round]]:
    """The round in `directory` and its ancestors, oldest first; checks the links."""
    chain = []
    d: str | None = directory
    while d is not None:
        r = read_round(d)
        if chain and chain[-1][1].parent_id != r.id:
            raise ImageError(f"{chain[-1][0]}: parent image {d} has id {r.id}, expected "
                             f"{chain[-1][1].parent_id} (mismatched parent)")
        chain.append((d, r))
        d = parent_dir(d, r)
        if len(chain) > 10000:
            raise ImageError(f"{directory}: parent chain loops")
    return chain[::-1]
