"""Fault injection for tests, in the spirit of CRIU_FAULT: PRERESTORE_FAULT=<point> makes the
named step fail with RestoreError, so tests can prove every failure path rolls back;
PRERESTORE_FAULT=<point>:crash raises a RuntimeError there instead, as a bug would (what is
not a PrerestoreError must be contained all the same)."""
from __future__ import annotations

import os

from .errors import RestoreError

POINTS = ("stage", "apply_state", "resume")


def maybe_fail(point: str) -> None:
    where, _, how = os.environ.get("PRERESTORE_FAULT", "").partition(":")
    if where == point:
        if how == "crash":
            raise RuntimeError(f"injected crash at {point} (PRERESTORE_FAULT)")
        raise RestoreError(f"injected fault at {point} (PRERESTORE_FAULT)")


# migrate: tracker, round, parked_batch, frozen, final_sent (migrate --to: the final round is
# sent, its answer not read yet), finalized (the destination runs, the source not killed yet);
# serve's connection process: staged (a round staged, not answered yet), final_received (the
# final round's message is in, nothing of it applied), running (the tree runs, not answered)
PAUSE_POINTS = ("tracker", "round", "parked_batch", "frozen", "final_sent", "finalized",
                "staged", "final_received", "running")


def maybe_pause(point: str) -> None:
    """PRERESTORE_PAUSE=<point>: say so on stderr and wait there, so that a test can kill this
    process (kill -9) or cut its connection at exactly that instant of a migration. It waits
    for ever, or, with PRERESTORE_PAUSE_UNTIL=FILE, until FILE exists (then goes on)."""
    if os.environ.get("PRERESTORE_PAUSE") == point:
        import sys
        import time
        print(f"prerestore: paused at {point} (PRERESTORE_PAUSE)", file=sys.stderr, flush=True)
        until = os.environ.get("PRERESTORE_PAUSE_UNTIL")
        while not (until and os.path.exists(until)):
            time.sleep(0.05 if until else 3600)
