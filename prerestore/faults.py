"""Fault injection for tests, in the spirit of CRIU_FAULT: PRERESTORE_FAULT=<point> makes the
named step fail with RestoreError, so tests can prove every failure path rolls back;
PRERESTORE_FAULT=<point>:crash raises a RuntimeError there instead, as a bug would (what is
not a PrerestoreError must be contained all the same)."""
from __future__ import annotations

import contextlib
import os

from .errors import RestoreError

POINTS = ("stage", "apply_state", "resume")


def maybe_fail(point: str) -> None:
    where, _, how = os.environ.get("PRERESTORE_FAULT", "").partition(":")
    if where == point:
        if how == "crash":
            raise RuntimeError(f"injected crash at {point} (PRERESTORE_FAULT)")
        raise RestoreError(f"injected fault at {point} (PRERESTORE_FAULT)")


def tamper(point: str) -> str | None:
    """PRERESTORE_FAULT=<point>:<what>: what a test asks to be changed at point (e.g.
    verify:rlimit, a husk's limit changed right before --verify compares), else None."""
    where, _, what = os.environ.get("PRERESTORE_FAULT", "").partition(":")
    return what or None if where == point else None


# migrate: tracker, round, parked_batch, frozen, final_sent (migrate --to: the final round is
# sent, its answer not read yet), finalized (the destination runs, the source not killed yet);
# serve's connection process: staged (a round staged, not answered yet), final_received (the
# final round's message is in, nothing of it applied), running (the tree runs, not answered);
# the stage daemon (and serve's connection process, `restore`): staging (round 0 staged),
# finalize (all prepared, TCP connections in repair mode), resuming (one process let go),
# live (all let go, frozen in the gate, TCP connections live and the address claimed, not
# committed), resumed (the tree runs); the tracker daemon: tracked (a round written, not yet
# answered); any point as <phase>/<point> within faults.phase(<phase>) (e.g. dump/frozen)
PAUSE_POINTS = ("tracker", "round", "parked_batch", "frozen", "final_sent", "finalized",
                "staged", "final_received", "running", "staging", "finalize", "resuming",
                "live", "resumed", "tracked")


_phase = ""


@contextlib.contextmanager
def phase(name: str):
    """Within it, PRERESTORE_PAUSE=<name>/<point> pauses at point too (e.g. dump/parked_batch:
    inside an injected batch of the final dump, not of a round)."""
    global _phase
    outer, _phase = _phase, name
    try:
        yield
    finally:
        _phase = outer


def maybe_pause(point: str) -> None:
    """PRERESTORE_PAUSE=<point>: say so on stderr and wait there for ever, so that a test can
    kill this process (kill -9) or cut its connection at exactly that instant of a migration.
    PRERESTORE_PAUSE=<phase>/<point>: only within faults.phase(<phase>).
    PRERESTORE_PAUSE=<point>:<file>: wait there only while <file> exists (a test that kills
    another party meanwhile removes it to let this one go on); PRERESTORE_PAUSE_UNTIL=FILE:
    wait until FILE exists."""
    where, _, while_file = os.environ.get("PRERESTORE_PAUSE", "").partition(":")
    if where == point or (_phase and where == f"{_phase}/{point}"):
        import sys
        import time
        print(f"prerestore: paused at {point} (PRERESTORE_PAUSE)", file=sys.stderr, flush=True)
        until = os.environ.get("PRERESTORE_PAUSE_UNTIL")
        while (not while_file or os.path.exists(while_file)) and \
                not (until and os.path.exists(until)):
            time.sleep(0.05 if until or while_file else 3600)
