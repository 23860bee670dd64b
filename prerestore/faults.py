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


PAUSE_POINTS = ("tracker", "round", "parked_batch", "frozen", "finalized")


def maybe_pause(point: str) -> None:
    """PRERESTORE_PAUSE=<point>: say so on stderr and wait there for ever, so that a test can
    kill this process (kill -9) at exactly that instant of a migration."""
    if os.environ.get("PRERESTORE_PAUSE") == point:
        import sys
        import time
        print(f"prerestore: paused at {point} (PRERESTORE_PAUSE)", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
