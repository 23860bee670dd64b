"""The source side of a tree's System V IPC: which objects are the tree's, what cannot be
carried (refused by name before anything is frozen), and reading them for a round.

A tree with an IPC namespace of its own (a container) owns every object in it. A tree in
the host's namespace owns the shared memory segments it attaches; its semaphore sets and
message queues cannot be told from other processes' (no /proc file ties them to a process):
between hosts, one a process of the tree operated on last is refused, and only segments are
carried. On one host the destination uses the very objects (the same namespace)."""
from __future__ import annotations

import os
import stat

from ..errors import ProcessGone
from ..kernel import procfs, sysvipc
from ..model import (PROT_WRITE, SysvIpc, Vma, intersect_ranges, merge_ranges,
                     unpack_ranges)


def attachments(layouts: dict[int, list[Vma]]) -> dict[int, tuple[int, int]]:
    """Segment id -> (how many attachments the tree has of it, the key they name)."""
    out: dict[int, tuple[int, int]] = {}
    for layout in layouts.values():
        for v in layout:
            if v.is_sysv:
                n, _ = out.get(v.inode, (0, 0))
                key = int(v.path[5:13], 16)              # "%08x" of the (signed) key_t
                out[v.inode] = (n + 1, key - (1 << 32) if key >= 1 << 31 else key)
    return out


def _layouts(pids: list[int]) -> dict[int, list[Vma]]:
    out = {}
    for pid in pids:
        try:
            out[pid] = procfs.maps(pid)
        except ProcessGone:
            continue
    return out


def problems(tasks: list[procfs.TreeTask], same_host: bool,
             layouts: dict[int, list[Vma]] | None = None) -> list[str]:
    """What about the tree's System V IPC cannot be carried, in words (layouts: each
    process's maps if at hand, by host pid)."""
    live = [t.pid for t in tasks if not t.zombie]
    root = tasks[0].pid
    out = []
    try:
        ns = sysvipc.namespace(root)
    except (FileNotFoundError, ProcessLookupError):
        return out
    for pid in live:
        try:
            if sysvipc.namespace(pid) != ns:
                out.append(f"pid {pid} is in another IPC namespace than the tree's root {root} "
                           "(not carried)")
        except (FileNotFoundError, ProcessLookupError):
            continue
    own = sysvipc.own_namespace(root)
    pids = set(live)
    # SEM_UNDO adjustments matter only where the tree has semaphore sets to adjust: all
    # of its own namespace's, or in the host's those a process of the tree operated on last
    users = sysvipc.in_namespace(root, sysvipc.semaphore_users)
    sets = sorted(users) if own else sorted(i for i, u in users.items() if u & pids)
    if sets:
        out += [f"pid {pid} may hold SEM_UNDO adjustments of System V semaphore sets {sets} "
                "(it has an undo list: it used SEM_UNDO, or made threads): the kernel shows "
                "them nowhere, so they cannot be carried (and its exit on the source would "
                "apply them)" for pid in sysvipc.with_undo_list(live)]
    if same_host:
        return out               # the very objects: the destination joins their namespace
    maps = layouts if layouts is not None else _layouts(live)
    attached = attachments(maps)
    out += _huge(maps)
    if not own:
        out += _host_users(root, pids)
        if not attached:
            return out
    rows = sysvipc.in_namespace(root, sysvipc.segments)
    for r in rows:
        n = attached.get(r["shmid"], (0, 0))[0]
        if (own or n) and r["nattch"] > n:
            out.append(f"System V shared memory segment {r['shmid']} (key {r['key']:#x}) is "
                       f"attached {r['nattch'] - n} time(s) by processes outside the tree: "
                       "between hosts a segment is carried whole, for the tree alone")
        elif not own and not n and r["cpid"] in pids:
            out.append(f"System V shared memory segment {r['shmid']} (key {r['key']:#x}) made "
                       f"by pid {r['cpid']} of the tree is attached by none of its processes: "
                       "in the host's IPC namespace only the segments a tree attaches are its "
                       "own (carried with an IPC namespace of its own)")
    return out


def _huge(layouts: dict[int, list[Vma]]) -> list[str]:
    """Segments of huge pages (SHM_HUGETLB: their file is on hugetlbfs, whose block size is
    the huge page's): made again as ordinary ones they would differ (not carried yet through
    an image; on one host they are the very segments)."""
    out, seen = [], set()
    for pid, layout in layouts.items():
        for v in layout:
            if v.is_sysv and v.inode not in seen:
                seen.add(v.inode)
                try:
                    st = os.stat(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}")
                except (FileNotFoundError, ProcessLookupError):
                    continue
                if st.st_blksize != 4096:
                    out.append(f"pid {pid}: System V shared memory segment {v.inode} at "
                               f"{v.start:#x} is of huge pages (SHM_HUGETLB, "
                               f"{st.st_blksize >> 10} KiB): not carried between hosts yet")
    return out


def _host_users(root: int, pids: set[int]) -> list[str]:
    """Semaphore sets and message queues of the host's namespace a process of the tree
    operated on last: they cannot be told apart from other processes' objects."""
    out = []
    for ident, users in sysvipc.in_namespace(root, sysvipc.semaphore_users).items():
        for pid in sorted(users & pids):
            out.append(f"pid {pid}: System V semaphore set {ident} of the host's IPC "
                       "namespace (semaphores are carried between hosts only for a tree "
                       "with an IPC namespace of its own)")
    for ident, users in sysvipc.in_namespace(root, sysvipc.queue_users).items():
        for pid in sorted(users & pids):
            out.append(f"pid {pid}: System V message queue {ident} of the host's IPC "
                       "namespace (queues are carried between hosts only for a tree with "
                       "an IPC namespace of its own)")
    return out


def note_carried(carried: dict[int, list[tuple[int, int]]], layout: list[Vma],
                 copy: bytes) -> None:
    """Add to `carried` (segment id -> sorted (start, end) offsets) the pages of segments
    that a round carries with one process's attachments (copy: its packed page ranges).
    What the rounds did not carry (pages no attachment of the tree had present: written
    by a process that detached since, swapped out) the final round carries apart."""
    vmas = [v for v in layout if v.is_sysv]
    if not vmas or not copy:
        return
    ranges = unpack_ranges(copy)
    for v in vmas:
        got = [(v.offset + s - v.start, v.offset + e - v.start)
               for s, e in intersect_ranges(ranges, [(v.start, v.end)])]
        if got:
            carried[v.inode] = merge_ranges(carried.get(v.inode, []) + got)


def capture(root: int, layouts: dict[int, list[Vma]], final: bool, direct: bool,
            ns_pid=lambda pid: pid, carried: dict[int, list[tuple[int, int]]] | None = None
            ) -> SysvIpc | None:
    """The tree's objects for a round (layouts: each process's, as the round carries it):
    the segments (in the host's namespace, those the tree attaches) with their sizes, and in
    a final round for an image their state and what of their content the rounds did not
    carry (carried: see note_carried), every semaphore set and message queue. None: the
    tree is in the host's namespace and attaches no segment (nothing is read)."""
    own = sysvipc.own_namespace(root)
    attached = attachments(layouts)
    if not own and not attached:
        return None
    keys = {ident: key for ident, (_, key) in attached.items()}
    ipc = sysvipc.in_namespace(root, sysvipc.read_objects, None if own else set(keys), keys,
                               carried or {}, final, direct, "own" if own else "host")
    readonly = _readonly(layouts, ns_pid)
    for seg in ipc.shm:
        seg.readonly = readonly.get(seg.id, [])
    if carried is not None:
        for ident in [i for i in carried if i not in {seg.id for seg in ipc.shm}]:
            del carried[ident]              # gone: its id may be another segment's later
    return ipc


def _readonly(layouts: dict[int, list[Vma]], ns_pid) -> dict[int, list[tuple[int, int]]]:
    """Segment id -> its read-only attachments (SHM_RDONLY) as (tree pid, address): the
    file of an attachment is opened read-only, which its /proc/PID/map_files link's mode
    shows (its protection does not: a writable one may have been made read-only)."""
    out: dict[int, list[tuple[int, int]]] = {}
    for pid, layout in layouts.items():
        for v in layout:
            if v.is_sysv and not v.prot & PROT_WRITE:
                try:
                    mode = os.lstat(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}").st_mode
                except FileNotFoundError:
                    continue
                if not mode & stat.S_IWUSR:
                    out.setdefault(v.inode, []).append((ns_pid(pid), v.start))
    return out


def release(root_ipc: SysvIpc | None) -> None:
    """Once the tree runs elsewhere (carried through an image): the segments it took from
    the host's namespace go (they would stay, unused, once the source is gone). A namespace
    of its own goes with its last process."""
    if root_ipc is None or root_ipc.place != "host" or root_ipc.same_objects:
        return
    for seg in root_ipc.shm:
        try:
            sysvipc.remove("shm", seg.id)
        except OSError:
            pass               # removed already (by the tree, before it was frozen)
