"""A process being pre-restored: a husk that follows the rounds of one image chain.

stage(dir) applies a round (the first one creates the husk); finalize(dir) applies the final
image and resumes. Cold restore is the same object given the whole chain at once. Any error kills
the husk: there is never a half-restored process."""
from __future__ import annotations

import os
import time

from ..errors import ImageError, PrerestoreError, ProcessGone, RestoreError
from ..image import schema
from ..kernel import procfs
from ..model import Round
from .husk import Husk


class StagedProcess:
    def __init__(self, *, pidns: bool = False):
        self.pidns = pidns
        self.husk: Husk | None = None
        self.applied: list[tuple[str, Round]] = []     # rounds applied so far, oldest first

    @property
    def last_id(self) -> str | None:
        return self.applied[-1][1].id if self.applied else None

    def _pending_rounds(self, directory: str, r: Round | None = None
                        ) -> list[tuple[str, Round]]:
        """The rounds of `directory`'s chain (ending with r if given) that are not applied
        yet, checked for order. The usual next round is read alone, not its whole chain."""
        if r is None:
            r = schema.read_round(directory)
        if self.applied and r.parent_id == self.last_id:
            return [(directory, r)]
        chain = []
        if r.parent_id:
            chain = schema.read_chain(schema.parent_dir(directory, r))
            if chain[-1][1].id != r.parent_id:
                raise ImageError(f"{directory}: parent image {chain[-1][0]} has id "
                                 f"{chain[-1][1].id}, expected {r.parent_id} (mismatched parent)")
        chain.append((directory, r))
        if not self.applied:
            return chain
        ids = [r.id for _, r in chain]
        if self.last_id not in ids:
            raise ImageError(f"{directory}: this image does not descend from the round staged "
                             f"last ({self.applied[-1][0]}, id {self.last_id}): mismatched parent")
        return chain[ids.index(self.last_id) + 1:]

    def _apply(self, directory: str, r: Round) -> dict:
        if len(r.tasks) != 1:
            raise ImageError(f"{directory}: {len(r.tasks)} tasks; this version restores one")
        task = r.tasks[0]
        if task.pages_from == "pid":
            try:
                same = r.source.get("boot_id") == procfs.boot_id() and \
                    procfs.stat_fields(task.pid)[22] == str(r.source.get("starttime"))
            except ProcessGone:
                same = False
            if not same:
                raise ImageError(f"{directory}: this round reads its pages from the live source "
                                 f"process {task.pid}, which is not on this host (or is gone)")
        if self.husk is None:
            self.husk = Husk.spawn(task.pid, pidns=self.pidns)
            self.husk.prepare(task.layout)
        stats = self.husk.apply_round(task, directory)
        self.applied.append((directory, r))
        return stats

    def stage(self, directory: str) -> dict:
        """Apply every round up to `directory` that is not applied yet (not a final image).
        A round that is refused (unreadable, out of order) leaves the staged process as it
        was; an error while applying one kills it."""
        pending = self._pending_rounds(directory)
        if not pending:
            raise ImageError(f"{directory}: this round is already staged")
        if any(r.is_final for _, r in pending):
            raise ImageError(f"{directory}: is a final image; use finalize")
        try:
            stats = [self._apply(d, r) for d, r in pending]
            return _sum_stats(stats) | {"rounds": [r.index for _, r in pending]}
        except BaseException:
            self.abort()
            raise

    def finalize(self, directory: str, image: bytes | None = None) -> dict:
        """Apply the final image (read from directory, or handed over in-band as the bytes
        of its round.img) and resume. Returns timings (monotonic clock)."""
        t0 = time.monotonic()
        try:
            final = None
            if image is not None:
                final = schema.decode_image(image, f"final image for {directory}")
                schema.check_pages_file(directory, final)
            pending = self._pending_rounds(directory, final)
            if not pending or not pending[-1][1].is_final:
                raise ImageError(f"{directory}: not a final image (made by `dump`)")
            mem = [self._apply(d, r) for d, r in pending]
            t_mem = time.monotonic()
            final = pending[-1][1]
            if os.environ.get("PRERESTORE_VERIFY") and final.tasks[0].pages_from == "pid":
                diffs = self.husk.verify_against(final.tasks[0].pid, final.tasks[0].layout)
                if diffs:
                    raise RestoreError(f"verify: {len(diffs)} pages differ from the source, "
                                       f"first {[f'{a:x} in {w}' for a, w in diffs[:5]]}")
            task = final.tasks[0]
            state_stats = self.husk.apply_state(
                final.state, source_pid=task.pid if task.pages_from == "pid" else None)
            t_state = time.monotonic()
            self.husk.resume(final.state)
            t_resumed = time.monotonic()
        except BaseException:
            self.abort()
            raise
        try:
            self.husk.release_namespace()
        except PrerestoreError as e:   # it runs; only its namespace init stays tied to us
            state_stats["release_error"] = str(e)
        self.husk.close()
        return {"started_at": t0, "resumed_at": t_resumed,
                "apply_memory_ms": (t_mem - t0) * 1e3, "apply_state_ms": (t_state - t_mem) * 1e3,
                "resume_ms": (t_resumed - t_state) * 1e3, "finalize_ms": (t_resumed - t0) * 1e3,
                "memory": _sum_stats(mem), "state": state_stats,
                "pid": self.husk.pid, "host_pid": self.husk.host_pid,
                "init_pid": self.husk.init_pid}

    def pin(self, cpu: int) -> None:
        """Put us and the husk on one CPU for the final step (see SourceSession.dump)."""
        os.sched_setaffinity(0, {cpu})
        if self.husk is not None:
            self.husk.pin(cpu)

    def abort(self) -> None:
        if self.husk is not None and not self.husk.resumed:
            self.husk.kill()
        self.husk = None
        self.applied = []


def _sum_stats(stats: list[dict]) -> dict:
    out: dict = {}
    for s in stats:
        for k, v in s.items():
            if isinstance(v, (int, float)):
                out[k] = out.get(k, 0) + v
    return out


def cold_restore(directory: str, *, pidns: bool = False) -> dict:
    """Restore from a full image chain in one go: the baseline pre-restore is compared with."""
    if not os.path.isdir(directory):
        raise ImageError(f"{directory}: no such image directory")
    staged = StagedProcess(pidns=pidns)
    return staged.finalize(directory)
