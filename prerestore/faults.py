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
