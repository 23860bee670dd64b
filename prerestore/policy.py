"""When to stop pre-copying: a pure function of the rounds so far (unit-tested on its own)."""
from __future__ import annotations

from dataclasses import dataclass

MAX_ROUNDS = 8            # pre-copy rounds, round 0 included, before we dump regardless
MIN_ROUNDS = 2            # round 0 copies everything; one dirty round tells us the dirty rate
TARGET_PAGES = 256        # a final round of 1 MiB or less applies in well under a millisecond
MIN_SHRINK = 0.9          # a round that keeps 90 % or more of the previous one is not converging


@dataclass(frozen=True)
class ConvergencePolicy:
    max_rounds: int = MAX_ROUNDS
    min_rounds: int = MIN_ROUNDS
    target_pages: int = TARGET_PAGES
    min_shrink: float = MIN_SHRINK

    def __post_init__(self):
        if self.min_rounds < 1 or self.max_rounds < self.min_rounds:
            raise ValueError(f"need 1 <= min_rounds ({self.min_rounds}) <= max_rounds "
                             f"({self.max_rounds})")


def is_last_round(policy: ConvergencePolicy, pages_per_round: list[int]) -> tuple[bool, str]:
    """pages_per_round[i] = pages written by pre-copy round i (round 0 = the full copy).
    Returns (dump now?, why)."""
    n = len(pages_per_round)
    if n < policy.min_rounds:
        return False, ""
    if n >= policy.max_rounds:
        return True, f"round cap ({policy.max_rounds})"
    last = pages_per_round[-1]
    if n >= 2 and last <= policy.target_pages:
        return True, f"dirty set small ({last} pages <= {policy.target_pages})"
    if n >= 3 and last >= policy.min_shrink * pages_per_round[-2]:
        return True, f"not converging ({pages_per_round[-2]} -> {last} pages)"
    return False, ""
