"""A process being pre-restored: a husk that follows the rounds of one image chain.

stage(dir) applies a round (the first one creates the husk); finalize(dir) applies the final
image and resumes. Cold restore is the same object given the whole chain at once. Any error kills
the husk: there is never a half-restored process."""
from __future__ import annotations

import os
import time

from ..errors import ImageError, PrerestoreError, ProcessGone
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

    def _pending_rounds(self, directory: str) -> list[tuple[str, Round]]:
        """The rounds of `directory`'s chain that are not applied yet, checked for order."""
        chain = schema.read_chain(directory)
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
        """Apply every round up to `directory` that is not applied yet (not a final image)."""
        try:
            pending = self._pending_rounds(directory)
            if not pending:
                raise ImageError(f"{directory}: this round is already staged")
            if any(r.is_final for _, r in pending):
                raise ImageError(f"{directory}: is a final image; use finalize")
            stats = [self._apply(d, r) for d, r in pending]
            return _sum_stats(stats) | {"rounds": [r.index for _, r in pending]}
        except BaseException:
            self.abort()
            raise

    def finalize(self, directory: str) -> dict:
        """Apply the final image and resume. Returns timings (monotonic clock)."""
        t0 = time.monotonic()
        try:
            pending = self._pending_rounds(directory)
            if not pending or not pending[-1][1].is_final:
                raise ImageError(f"{directory}: not a final image (made by `dump`)")
            mem = [self._apply(d, r) for d, r in pending]
            t_mem = time.monotonic()
            final = pending[-1][1]
            state_stats = self.husk.apply_state(final.state)
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
