"""Fault injection for tests, in the spirit of CRIU_FAULT: PRERESTORE_FAULT=<point> makes the
named step fail with RestoreError, so tests can prove every failure path rolls back."""
from __future__ import annotations

import os

from .errors import RestoreError

POINTS = ("stage", "apply_state", "resume")


def maybe_fail(point: str) -> None:
    if os.environ.get("PRERESTORE_FAULT") == point:
        raise RestoreError(f"injected fault at {point} (PRERESTORE_FAULT)")
