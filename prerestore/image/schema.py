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
from ..model import (AddressSpaceRound, Credentials, FileDescriptor, MmFields, ProcessState, Round,
                     SigAction, ThreadState, Vma, Zombie, ranges_bytes)

MAGIC = b"PRRSTIMG"
VERSION = 2          # 2: process trees (task tree fields, states, zombies)
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
                     list(f.same_as) if f.same_as else None, f.data] for f in s.fds],
            "threads": [_thread(t) for t in s.threads], "shared_pending": s.shared_pending,
            "cpus": s.cpus, "creds": vars(s.creds) if s.creds else None,
            "dumpable": s.dumpable, "pdeathsig": s.pdeathsig,
            "child_subreaper": s.child_subreaper, "tty_pgrp": s.tty_pgrp}


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
                            tuple(f[6]) if f[6] else None, f[7]) for f in s["fds"]],
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
