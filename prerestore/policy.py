"""When to stop pre-copying: a pure function of the rounds so far (unit-tested on its own)."""
from __future__ import annotations

from dataclasses import dataclass

MAX_ROUNDS = 8            # pre-copy rounds, round 0 included, before we dump regardless
MIN_ROUNDS = 2            # round 0 copies everything; one dirty round tells us the dirty rate
TARGET_PAGES = 256        # a final round of 1 MiB or less applies in well under a millisecond
MIN_SHRINK = 0.9          # a round that keeps 90 % or more of the previous one is not converging
# What the final step costs besides its pages, measured on a 2-vCPU VM (bench/): freezing,
# collecting and applying the state is a few ptrace round trips and /proc reads per process
STATE_MS_BASE = 4.0
STATE_MS_PER_PROCESS = 2.0
DEFAULT_BANDWIDTH = 1e9   # bytes/s until a round has measured the real one


@dataclass(frozen=True)
class ConvergencePolicy:
    max_rounds: int = MAX_ROUNDS
    min_rounds: int = MIN_ROUNDS
    target_pages: int = TARGET_PAGES
    min_shrink: float = MIN_SHRINK
    # With a downtime target, stop as soon as the estimated final step fits in it (instead of
    # waiting for target_pages); rounds that stop converging still end the pre-copy.
    max_downtime_ms: float | None = None

    def __post_init__(self):
        if self.min_rounds < 1 or self.max_rounds < self.min_rounds:
            raise ValueError(f"need 1 <= min_rounds ({self.min_rounds}) <= max_rounds "
                             f"({self.max_rounds})")


def estimate_final_ms(pages: int, bandwidth: float, processes: int = 1) -> float:
    """The downtime of a final step that carries `pages` at `bandwidth` bytes/s, for a tree
    of `processes`: the pages plus the state work around them."""
    return STATE_MS_BASE + STATE_MS_PER_PROCESS * processes + \
        pages * 4096 / max(bandwidth, 1.0) * 1e3


def measured_bandwidth(rounds: list[tuple[int, float]], default: float = DEFAULT_BANDWIDTH
                       ) -> float:
    """Bytes/s of the latest round that moved enough to tell: rounds are (bytes, ms spent
    reading, sending and applying them)."""
    for nbytes, ms in reversed(rounds):
        if nbytes >= 1 << 20 and ms > 0:
            return nbytes / (ms / 1e3)
    return default


def estimate_after(rounds: list[tuple[int, float]], pages: int, processes: int) -> float:
    """estimate_final_ms for a final step after these rounds ((bytes, ms) each, the last
    one's dirty set being `pages`)."""
    return estimate_final_ms(pages, measured_bandwidth(rounds), processes)


def is_last_round(policy: ConvergencePolicy, pages_per_round: list[int],
                  estimate_ms: float | None = None) -> tuple[bool, str]:
    """pages_per_round[i] = pages written by pre-copy round i (round 0 = the full copy);
    estimate_ms: the downtime a final step would have now (estimate_final_ms), used with
    max_downtime_ms. Returns (dump now?, why)."""
    n = len(pages_per_round)
    if n < policy.min_rounds:
        return False, ""
    if n >= policy.max_rounds:
        return True, f"round cap ({policy.max_rounds})"
    last = pages_per_round[-1]
    if policy.max_downtime_ms is not None:
        if n >= 2 and estimate_ms is not None and estimate_ms <= policy.max_downtime_ms:
            return True, (f"estimated downtime {estimate_ms:.1f} ms <= target "
                          f"{policy.max_downtime_ms:g} ms")
    elif n >= 2 and last <= policy.target_pages:
        return True, f"dirty set small ({last} pages <= {policy.target_pages})"
    if n >= 3 and last >= policy.min_shrink * pages_per_round[-2]:
        return True, f"not converging ({pages_per_round[-2]} -> {last} pages)"
    return False, ""
