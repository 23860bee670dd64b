"""System V IPC objects (shared memory segments, semaphore sets, message queues) of an IPC
namespace: read them all, and make them again with their ids, keys, owners and contents.

They live in an IPC namespace, not in a process, and every call here acts on the namespace
of the calling *thread*: in_namespace() runs a function in a thread of ours that joined a
process's IPC namespace (setns), so /proc/sysvipc/*, /proc/sys/kernel/*_next_id and the
calls see that namespace. A thread's credentials are its own too (raw setresuid): objects are
made with their creator's uid and gid (cuid, cgid) by switching the thread's effective ids.

Layouts are x86-64's (struct ipc64_perm, shmid64_ds, semid64_ds, msqid64_ds, as glibc passes
them with IPC_64)."""
from __future__ import annotations

import ctypes
import os
import struct
import threading

from ..errors import KernelCallError
from ..model import SysvIpc, SysvMsg, SysvSem, SysvShm, subtract_ranges
from .native import lib

IPC_PRIVATE = 0
IPC_CREAT, IPC_EXCL, IPC_NOWAIT = 0o1000, 0o2000, 0o4000
IPC_RMID, IPC_SET, IPC_STAT = 0, 1, 2
SHM_LOCK = 11
SHM_DEST, SHM_LOCKED = 0o1000, 0o2000           # in shm_perm.mode
SHM_RDONLY, SHM_REMAP, SHM_EXEC = 0o10000, 0o40000, 0o100000
GETPID, GETALL, SETALL = 11, 13, 17
MSG_COPY = 0o40000                              # needs CONFIG_CHECKPOINT_RESTORE
KCMP_SYSVSEM = 6                                # enum kcmp_type (linux/kcmp.h)
PAGE = 4096

# struct ipc_perm: key, uid, gid, cuid, cgid, mode, (pad), seq, (pad, reserved x2)
PERM = "iIIIIHxxHxx4xQQ"
SHMID_DS = struct.Struct("=" + PERM + "QqqqiiQQQ")    # segsz, a/d/ctime, cpid, lpid, nattch
SEMID_DS = struct.Struct("=" + PERM + "qQqQQQQ")      # otime, -, ctime, -, nsems
MSQID_DS = struct.Struct("=" + PERM + "qqqQQQiiQQ")   # s/r/ctime, cbytes, qnum, qbytes, pids
LONG = struct.Struct("=q")

_libc = ctypes.CDLL(None, use_errno=True)
for _name, _res, _args in (
        ("shmget", ctypes.c_int, (ctypes.c_int, ctypes.c_size_t, ctypes.c_int)),
        ("shmat", ctypes.c_void_p, (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)),
        ("shmdt", ctypes.c_int, (ctypes.c_void_p,)),
        ("shmctl", ctypes.c_int, (ctypes.c_int, ctypes.c_int, ctypes.c_void_p)),
        ("semget", ctypes.c_int, (ctypes.c_int, ctypes.c_int, ctypes.c_int)),
        ("msgget", ctypes.c_int, (ctypes.c_int, ctypes.c_int)),
        ("msgctl", ctypes.c_int, (ctypes.c_int, ctypes.c_int, ctypes.c_void_p)),
        ("msgsnd", ctypes.c_int, (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t,
                                  ctypes.c_int)),
        ("msgrcv", ctypes.c_ssize_t, (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t,
                                      ctypes.c_long, ctypes.c_int)),
        ("setns", ctypes.c_int, (ctypes.c_int, ctypes.c_int))):
    getattr(_libc, _name).restype = _res
    getattr(_libc, _name).argtypes = _args
_semctl = _libc.semctl                          # variadic: the fourth argument as a pointer
_semctl.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(result: int, call: str, detail: str = "") -> int:
    if result == -1:
        raise KernelCallError(ctypes.get_errno(), call, None, detail)
    return result


# ---- namespaces ---------------------------------------------------------------------------

def namespace(pid: int | str) -> int:
    """The IPC namespace of a process (the inode of /proc/PID/ns/ipc)."""
    return os.stat(f"/proc/{pid}/ns/ipc").st_ino


def own_namespace(pid: int) -> bool:
    """Is the process in another IPC namespace than ours (a container's)?"""
    return namespace(pid) != namespace("thread-self")


def in_namespace(pid: int, fn, *args):
    """fn(*args) run in the IPC namespace of process pid (host pid): inline if it is ours,
    else in a thread of ours that joins it and ends with it (the namespace and the effective
    ids are per thread; the process's other threads are not touched)."""
    fd = os.open(f"/proc/{pid}/ns/ipc", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_ino == namespace("thread-self"):
            return fn(*args)
        out: dict = {}

        def run():
            try:
                if _libc.setns(fd, lib.CLONE_NEWIPC) != 0:
                    raise KernelCallError(ctypes.get_errno(), "setns(CLONE_NEWIPC)", pid)
                out["value"] = fn(*args)
            except BaseException as e:              # noqa: BLE001 (given to the caller)
                out["error"] = e

        t = threading.Thread(target=run, name="prerestore-ipcns")
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["value"]
    finally:
        os.close(fd)


def with_undo_list(pids: list[int]) -> list[int]:
    """The processes that have a semaphore undo list: made by their first semaphore operation
    with SEM_UNDO, and by their first thread (CLONE_SYSVSEM shares it); a fork starts with
    none. kcmp(KCMP_SYSVSEM) compares undo lists: each process is compared with a fork of
    ours made for the purpose (we make threads: ours is not none). Whether a list holds
    adjustments, and which, is shown nowhere."""
    r, w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:                          # the reference: no undo list; waits, then ends
        try:
            os.close(w)
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    try:
        out = []
        for pid in pids:
            res = _syscall(lib.SYS_kcmp, ctypes.c_long(pid), ctypes.c_long(child),
                           ctypes.c_long(KCMP_SYSVSEM), ctypes.c_long(0), ctypes.c_long(0))
            if res < 0:
                err = ctypes.get_errno()
                if err == 3:                # ESRCH: gone meanwhile
                    continue
                raise KernelCallError(err, "kcmp(KCMP_SYSVSEM)", pid)
            if res != 0:
                out.append(pid)
        return out
    finally:
        os.close(w)
        os.waitpid(child, 0)


# ---- reading (in the namespace) -------------------------------------------------------------

def _table(kind: str) -> list[dict[str, int]]:
    """/proc/sysvipc/shm|sem|msg of the calling thread's namespace, each row by column."""
    with open(f"/proc/sysvipc/{kind}") as f:
        lines = f.read().splitlines()
    head = lines[0].split()
    rows = []
    for line in lines[1:]:
        values = line.split()
        row = dict(zip(head, values))
        rows.append({k: int(v, 8) if k == "perms" else int(v) for k, v in row.items()})
    return rows


def segments() -> list[dict[str, int]]:
    """The shared memory segments of the calling thread's namespace, as /proc shows them
    (key, shmid, perms, size, cpid, lpid, nattch, uid, gid, cuid, cgid...)."""
    return _table("shm")


def _vanished(e: OSError) -> bool:
    """The object was removed between the table's listing and the call (another process's,
    in a namespace shared with the host: it may come and go at any time)."""
    return e.errno in (22, 43)                       # EINVAL, EIDRM


def semaphore_users() -> dict[int, set[int]]:
    """Each semaphore set's id -> the pids that operated last on one of its semaphores."""
    out = {}
    for row in _table("sem"):
        try:
            out[row["semid"]] = {_check(_semctl(row["semid"], i, GETPID, None),
                                        "semctl(GETPID)") for i in range(row["nsems"])}
        except OSError as e:
            if not _vanished(e):
                raise
    return out


def queue_users() -> dict[int, set[int]]:
    """Each message queue's id -> the pids that sent and received last."""
    return {row["msqid"]: {row["lspid"], row["lrpid"]} for row in _table("msg")}


def read_segment(shmid: int, size: int, skip: list[tuple[int, int]] = ()
                 ) -> list[tuple[int, bytes]]:
    """The content of a segment, as (offset, bytes) runs of its data, but for the (start,
    end) offsets in skip (sorted: carried otherwise): read through its file (opened by
    /proc/self/map_files from an attachment of ours, made read-only for a moment), whose
    holes SEEK_DATA skips (a page never touched stays a hole; one swapped out is data)."""
    addr = _libc.shmat(shmid, None, SHM_RDONLY)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise KernelCallError(ctypes.get_errno(), "shmat", None, f"segment {shmid}")
    try:
        whole = -(-size // PAGE) * PAGE
        fd = os.open(f"/proc/self/map_files/{addr:x}-{addr + whole:x}",
                     os.O_RDONLY | os.O_CLOEXEC)
    finally:
        _libc.shmdt(addr)
    try:
        runs, pos = [], 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:                 # ENXIO: no data from here on
                break
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            runs.append((start, end))
            pos = end
        return [(s, os.pread(fd, e - s, s)) for s, e in subtract_ranges(runs, list(skip))]
    finally:
        os.close(fd)


def read_objects(shm_ids: set[int] | None, name_keys: dict[int, int],
                 carried: dict[int, list[tuple[int, int]]], final: bool,
                 same_objects: bool, place: str) -> SysvIpc:
    """The objects of the calling thread's namespace: the segments (those in shm_ids, or
    all if None), and in a final round every semaphore set and message queue with its
    values and messages, and the content of each segment that its attachments' pages did
    not carry (carried: segment id -> sorted (start, end) offsets the rounds carried;
    name_keys: each attached segment's key as its attachments name it)."""
    ipc = SysvIpc(place, same_objects)
    for row in segments():
        if shm_ids is not None and row["shmid"] not in shm_ids:
            continue
        seg = SysvShm(row["shmid"], row["key"], row["perms"], row["uid"], row["gid"],
                      row["cuid"], row["cgid"], row["size"],
                      name_keys.get(row["shmid"], row["key"]))
        if final and not same_objects:
            try:
                seg.pages = read_segment(seg.id, seg.size, carried.get(seg.id, []))
            except OSError as e:
                if not _vanished(e):
                    raise
                continue                     # removed meanwhile (a running tree's round)
        ipc.shm.append(seg)
    if not final or same_objects or place != "own":
        return ipc
    # a final round: the tree is frozen, and the namespace its own: nothing comes or goes
    for row in _table("sem"):
        n = row["nsems"]
        values = (ctypes.c_ushort * max(n, 1))()
        _check(_semctl(row["semid"], 0, GETALL, values), "semctl(GETALL)", f"set {row['semid']}")
        ipc.sem.append(SysvSem(row["semid"], row["key"], row["perms"], row["uid"], row["gid"],
                               row["cuid"], row["cgid"], list(values)[:n]))
    for row in _table("msg"):
        ds = ctypes.create_string_buffer(MSQID_DS.size)
        _check(_libc.msgctl(row["msqid"], IPC_STAT, ds), "msgctl(IPC_STAT)",
               f"queue {row['msqid']}")
        qbytes = MSQID_DS.unpack(ds.raw)[14]
        q = SysvMsg(row["msqid"], row["key"], row["perms"], row["uid"], row["gid"],
                    row["cuid"], row["cgid"], qbytes)
        buf = ctypes.create_string_buffer(LONG.size + max(row["cbytes"], 1))
        for i in range(row["qnum"]):
            n = _libc.msgrcv(row["msqid"], buf, len(buf) - LONG.size, i,
                             IPC_NOWAIT | MSG_COPY)
            _check(n, "msgrcv(MSG_COPY)", f"queue {row['msqid']} message {i}")
            q.messages.append((LONG.unpack_from(buf.raw)[0], buf.raw[LONG.size:LONG.size + n]))
        ipc.msg.append(q)
    return ipc


# ---- making (in the namespace) ------------------------------------------------------------

def _as_creator(uid: int, gid: int):
    """The calling thread's effective ids become uid and gid (its own only: the raw calls,
    not glibc's, which would change every thread's); its real and saved ids stay root."""
    if _syscall(lib.SYS_setresgid, -1, gid, -1) or _syscall(lib.SYS_setresuid, -1, uid, -1):
        raise KernelCallError(ctypes.get_errno(), "setresuid/setresgid", None,
                              f"creator {uid}:{gid}")


def _as_root() -> None:
    _syscall(lib.SYS_setresuid, -1, 0, -1)
    _syscall(lib.SYS_setresgid, -1, 0, -1)


def _next_id(kind: str, ident: int) -> None:
    with open(f"/proc/sys/kernel/{kind}_next_id", "w") as f:
        f.write(str(ident))


def _make(kind: str, ident: int, key: int, cuid: int, cgid: int, create) -> None:
    """Make one object with id `ident`: the namespace's next id set (root), then created
    with its creator's effective ids. Another object made in the namespace meanwhile (the
    host's, shared with other processes) would take that id: the id is checked."""
    _next_id(kind, ident)
    _as_creator(cuid, cgid)
    try:
        got = create()
        err = ctypes.get_errno()
    finally:
        _as_root()
    if got < 0:
        _next_id(kind, -1)                   # unused: not left for the next object made here
        raise KernelCallError(err, f"{kind}get", None, f"id {ident}, key {key & 0xffffffff:#x}"
                              + (": the key is in use" if err == 17 else ""))
    if got != ident:
        if got >= 0:
            remove(kind, got)
        raise KernelCallError(17, f"{kind}get", None,
                              f"made with id {got}, not {ident}: the id is in use")


def remove(kind: str, ident: int) -> None:
    ctl = {"shm": _libc.shmctl, "msg": _libc.msgctl}.get(kind)
    r = ctl(ident, IPC_RMID, None) if ctl else _semctl(ident, 0, IPC_RMID, None)
    _check(r, f"{kind}ctl(IPC_RMID)", f"id {ident}")


def _set_perm(kind: str, ident: int, uid: int, gid: int, mode: int, qbytes: int = 0) -> None:
    """IPC_SET: owner and permission bits (and a queue's capacity)."""
    if kind == "shm":
        ds = ctypes.create_string_buffer(SHMID_DS.size)
        _check(_libc.shmctl(ident, IPC_STAT, ds), "shmctl(IPC_STAT)")
        f = list(SHMID_DS.unpack(ds.raw))
        f[1], f[2], f[5] = uid, gid, mode & 0o777
        ds = ctypes.create_string_buffer(SHMID_DS.pack(*f), SHMID_DS.size)
        _check(_libc.shmctl(ident, IPC_SET, ds), "shmctl(IPC_SET)", f"segment {ident}")
    elif kind == "sem":
        ds = ctypes.create_string_buffer(SEMID_DS.size)
        _check(_semctl(ident, 0, IPC_STAT, ds), "semctl(IPC_STAT)")
        f = list(SEMID_DS.unpack(ds.raw))
        f[1], f[2], f[5] = uid, gid, mode & 0o777
        ds = ctypes.create_string_buffer(SEMID_DS.pack(*f), SEMID_DS.size)
        _check(_semctl(ident, 0, IPC_SET, ds), "semctl(IPC_SET)", f"set {ident}")
    else:
        ds = ctypes.create_string_buffer(MSQID_DS.size)
        _check(_libc.msgctl(ident, IPC_STAT, ds), "msgctl(IPC_STAT)")
        f = list(MSQID_DS.unpack(ds.raw))
        f[1], f[2], f[5], f[14] = uid, gid, mode & 0o777, qbytes
        ds = ctypes.create_string_buffer(MSQID_DS.pack(*f), MSQID_DS.size)
        _check(_libc.msgctl(ident, IPC_SET, ds), "msgctl(IPC_SET)", f"queue {ident}")


def free_ids(ipc: SysvIpc) -> bool:
    """Are the ids (and the keys other than IPC_PRIVATE) of these objects free in the
    calling thread's namespace?"""
    for kind, objs, idcol in (("shm", ipc.shm, "shmid"), ("sem", ipc.sem, "semid"),
                              ("msg", ipc.msg, "msqid")):
        rows = _table(kind)
        ids = {r[idcol] for r in rows}
        keys = {r["key"] for r in rows} - {IPC_PRIVATE}
        if any(o.id in ids or (o.key and o.key in keys) for o in objs):
            return False
    return True


def make_segment(seg: SysvShm) -> int | None:
    """A segment with the source's id, key, size, creator, owner and mode, its content if
    carried. A segment removed while attached (SHM_DEST) is made with the key its
    attachments name, attached by us (the returned address, to shmdt once the husks
    attach it) and removed at once: its key reads IPC_PRIVATE as on the source."""
    removed = bool(seg.mode & SHM_DEST)
    key = seg.name_key if removed else seg.key
    _make("shm", seg.id, key, seg.cuid, seg.cgid,
          lambda: _libc.shmget(key, seg.size, (seg.mode & 0o777) | IPC_CREAT | IPC_EXCL))
    try:
        _set_perm("shm", seg.id, seg.uid, seg.gid, seg.mode)
        if seg.mode & SHM_LOCKED:
            _check(_libc.shmctl(seg.id, SHM_LOCK, None), "shmctl(SHM_LOCK)", f"segment {seg.id}")
        hold = None
        if seg.pages or removed:
            hold = _libc.shmat(seg.id, None, 0)
            if hold is None or hold == ctypes.c_void_p(-1).value:
                raise KernelCallError(ctypes.get_errno(), "shmat", None, f"segment {seg.id}")
            for off, data in seg.pages:
                ctypes.memmove(hold + off, data, len(data))
        if removed:
            remove("shm", seg.id)
            return hold
        if hold is not None:
            _libc.shmdt(hold)
        return None
    except BaseException:
        remove("shm", seg.id)
        raise


def release(addr: int) -> None:
    """Our own attachment of a segment (make_segment's) goes."""
    _libc.shmdt(addr)


def make_semaphores(s: SysvSem) -> None:
    _make("sem", s.id, s.key, s.cuid, s.cgid,
          lambda: _libc.semget(s.key, len(s.values), (s.mode & 0o777) | IPC_CREAT | IPC_EXCL))
    try:
        values = (ctypes.c_ushort * max(len(s.values), 1))(*s.values)
        _check(_semctl(s.id, 0, SETALL, values), "semctl(SETALL)", f"set {s.id}")
        _set_perm("sem", s.id, s.uid, s.gid, s.mode)
    except BaseException:
        remove("sem", s.id)
        raise


def make_queue(q: SysvMsg) -> None:
    _make("msg", q.id, q.key, q.cuid, q.cgid,
          lambda: _libc.msgget(q.key, (q.mode & 0o777) | IPC_CREAT | IPC_EXCL))
    try:
        _set_perm("msg", q.id, q.uid, q.gid, q.mode, q.qbytes)
        for mtype, data in q.messages:
            buf = ctypes.create_string_buffer(LONG.pack(mtype) + data, LONG.size + len(data))
            _check(_libc.msgsnd(q.id, buf, len(data), IPC_NOWAIT), "msgsnd",
                   f"queue {q.id}, a message of type {mtype}")
    except BaseException:
        remove("msg", q.id)
        raise


def write_segment(shmid: int, pages: list[tuple[int, bytes]]) -> None:
    """Write carried content into a segment made before (attached by us for a moment)."""
    addr = _libc.shmat(shmid, None, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise KernelCallError(ctypes.get_errno(), "shmat", None, f"segment {shmid}")
    try:
        for off, data in pages:
            ctypes.memmove(addr + off, data, len(data))
    finally:
        _libc.shmdt(addr)


def set_owner(kind: str, obj) -> None:
    """IPC_SET an object's owner and mode as carried (they may change between rounds)."""
    _set_perm(kind, obj.id, obj.uid, obj.gid, obj.mode, getattr(obj, "qbytes", 0))


def describe(ids: set[int] | None) -> dict[str, str]:
    """What the calling thread's namespace shows of its objects, for --verify: each segment
    (those in ids, or all), and with ids None every semaphore set (values included) and
    message queue (its capacity and messages: types, sizes and a digest of their bytes).
    Times and pids (last operation, creator) are left out: no call sets them."""
    import hashlib
    out = {}
    for r in segments():
        if ids is None or r["shmid"] in ids:
            out[f"sysvipc.shm[{r['shmid']}]"] = \
                f"key={r['key']} mode={r['perms']:o} size={r['size']} uid={r['uid']} " \
                f"gid={r['gid']} cuid={r['cuid']} cgid={r['cgid']}"
    if ids is not None:
        return out
    for r in _table("sem"):
        values = (ctypes.c_ushort * max(r["nsems"], 1))()
        _check(_semctl(r["semid"], 0, GETALL, values), "semctl(GETALL)")
        out[f"sysvipc.sem[{r['semid']}]"] = \
            f"key={r['key']} mode={r['perms']:o} uid={r['uid']} gid={r['gid']} " \
            f"cuid={r['cuid']} cgid={r['cgid']} values={list(values)[:r['nsems']]}"
    for r in _table("msg"):
        ds = ctypes.create_string_buffer(MSQID_DS.size)
        _check(_libc.msgctl(r["msqid"], IPC_STAT, ds), "msgctl(IPC_STAT)")
        buf = ctypes.create_string_buffer(LONG.size + max(r["cbytes"], 1))
        digest, kinds = hashlib.sha256(), []
        for i in range(r["qnum"]):
            n = _check(_libc.msgrcv(r["msqid"], buf, len(buf) - LONG.size, i,
                                    IPC_NOWAIT | MSG_COPY), "msgrcv(MSG_COPY)")
            kinds.append(f"{LONG.unpack_from(buf.raw)[0]}:{n}")
            digest.update(buf.raw[:LONG.size + n])
        out[f"sysvipc.msg[{r['msqid']}]"] = \
            f"key={r['key']} mode={r['perms']:o} uid={r['uid']} gid={r['gid']} " \
            f"cuid={r['cuid']} cgid={r['cgid']} qbytes={MSQID_DS.unpack(ds.raw)[14]} " \
            f"messages={','.join(kinds)} sha256={digest.hexdigest()[:16]}"
    return out


def hold_segment(shmid: int) -> int:
    """An attachment of ours (read-only), which keeps a segment that is removed alive."""
    addr = _libc.shmat(shmid, None, SHM_RDONLY)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise KernelCallError(ctypes.get_errno(), "shmat", None, f"segment {shmid}")
    return addr
