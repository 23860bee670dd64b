"""The destination side of a tree's System V IPC: the namespace the restored tree is in, and
the objects made in it for the tree, with the ids, keys, owners and contents it had.

Where: a tree that had an IPC namespace of its own gets a new one (the root's husk unshares
CLONE_NEWIPC before it maps anything; every husk is forked from it), or on one host the very
one it had (the root's husk joins the frozen source's: the objects are the same, nothing is
made). A tree of the host's namespace stays in ours when the ids (and keys) of its segments
are free here, else it gets a namespace of its own, where they are: its programs hold the ids
(PostgreSQL keeps its segment's id in postmaster.pid and checks it on restart).

What: made by a thread of ours that joins the husks' namespace (kernel/sysvipc.py) as rounds
list them: each segment before a husk attaches it (its pages come with the attachments, like
other shared memory); at the final round what only it carries: the content of a segment no
process attaches, semaphore sets, message queues, owners and modes as they were at the
freeze. A segment removed while attached is made, held by us until the husks attach it, and
removed at once."""
from __future__ import annotations

from ..errors import KernelCallError, RestoreError
from ..kernel import sysvipc
from ..model import SysvIpc


class IpcPlace:
    """The restored tree's System V IPC: where, and what was made for it so far."""

    def __init__(self):
        self.where: str | None = None    # "host" (ours), "new" (made for the tree), "source"
        self.pid = 0                     # a husk in that namespace (host pid)
        self.sizes: dict[int, int] = {}  # segment id -> size; for the husks (Husk._attach)
        self.readonly: set[tuple[int, int]] = set()   # (pid, address): SHM_RDONLY attachments
        self.made: dict[int, tuple] = {}   # segment id -> what it was made as
        self.holds: dict[int, int] = {}    # segment id -> our attachment (a removed segment)
        self.others: list[tuple[str, int]] = []   # semaphore sets and queues made

    def enter(self, husk, ipc: SysvIpc | None, source_pid: int) -> None:
        """Put the root's husk (prepared, nothing mapped yet) where the tree's IPC is to be."""
        husk.sysv = self
        self.pid = husk.host_pid
        if ipc is None:
            self.where = "host"
        elif ipc.same_objects:
            if ipc.place == "own":
                husk.join_ipc_namespace(source_pid)
                self.where = "source"
            else:
                self.where = "host"
        elif ipc.place == "own" or not sysvipc.in_namespace(self.pid, sysvipc.free_ids, ipc):
            husk.new_ipc_namespace()
            self.where = "new"
        else:
            self.where = "host"

    def update(self, ipc: SysvIpc | None, final: bool) -> None:
        """Make what this round lists and is not made yet (before any husk maps it), drop
        segments gone since; at the final round, everything else."""
        if ipc is None:
            if not self.made:
                return
            ipc = SysvIpc("host")              # it detached every segment since: they go
        for seg in ipc.shm:
            self.sizes[seg.id] = seg.size
            self.readonly.update(seg.readonly)
        if ipc.same_objects:
            return
        try:
            sysvipc.in_namespace(self.pid, self._make, ipc, final)
        except KernelCallError as e:
            raise RestoreError(f"System V IPC of the tree: {e}") from None

    def _make(self, ipc: SysvIpc, final: bool) -> None:
        listed = {seg.id for seg in ipc.shm}
        for ident in [i for i in self.made if i not in listed]:
            self._drop(ident)                  # gone from the source since the last round
        for seg in ipc.shm:
            what = (seg.name_key, seg.size, seg.cuid, seg.cgid)
            if seg.id in self.made and self.made[seg.id] != what:
                self._drop(seg.id)             # another segment with the same id
            if seg.id not in self.made:
                hold = sysvipc.make_segment(seg)
                self.made[seg.id] = what
                if hold is not None:
                    self.holds[seg.id] = hold
            elif final:
                if seg.pages:
                    sysvipc.write_segment(seg.id, seg.pages)
                if seg.mode & sysvipc.SHM_DEST and seg.id not in self.holds:
                    self.holds[seg.id] = sysvipc.hold_segment(seg.id)
                    sysvipc.remove("shm", seg.id)     # removed since it was made here
            if final:
                sysvipc.set_owner("shm", seg)
        if final:
            for s in ipc.sem:
                sysvipc.make_semaphores(s)
                self.others.append(("sem", s.id))
            for q in ipc.msg:
                sysvipc.make_queue(q)
                self.others.append(("msg", q.id))

    def _drop(self, ident: int) -> None:
        hold = self.holds.pop(ident, None)
        self.made.pop(ident)
        if hold is not None:
            sysvipc.release(hold)              # removed already: it goes with the husks'
        else:
            try:
                sysvipc.remove("shm", ident)
            except OSError:
                pass

    def attached(self) -> None:
        """Every husk has attached what it attaches: our own hold on removed segments goes
        (they live as long as the tree's attachments, as on the source)."""
        for hold in self.holds.values():
            sysvipc.release(hold)
        self.holds = {}

    def abort(self) -> None:
        """The restore failed: nothing made for the tree stays behind. In a namespace of the
        tree's own, it goes with the husks; in ours, each object is removed."""
        self.attached()
        if self.where != "host" or not self.pid:
            self.made, self.others = {}, []
            return
        for ident in list(self.made):
            try:
                sysvipc.remove("shm", ident)
            except OSError:
                pass
        for kind, ident in self.others:
            try:
                sysvipc.remove(kind, ident)
            except OSError:
                pass
        self.made, self.others = {}, []
