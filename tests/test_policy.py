"""Unit tests for prerestore.policy: when pre-copy stops."""
from __future__ import annotations

import dataclasses

import pytest

from prerestore.policy import (MAX_ROUNDS, MIN_ROUNDS, TARGET_PAGES, ConvergencePolicy,
                               is_last_round)

DEFAULT = ConvergencePolicy()


def test_defaults():
    assert DEFAULT == ConvergencePolicy(MAX_ROUNDS, MIN_ROUNDS, TARGET_PAGES)
    assert 1 <= DEFAULT.min_rounds <= DEFAULT.max_rounds
    assert 0 < DEFAULT.min_shrink < 1


def test_no_rounds_yet():
    assert is_last_round(DEFAULT, []) == (False, "")


def test_min_rounds_respected():
    # round 0 alone never decides, however small it is
    assert is_last_round(DEFAULT, [1]) == (False, "")
    assert is_last_round(DEFAULT, [0]) == (False, "")
    p = ConvergencePolicy(min_rounds=4)
    assert is_last_round(p, [10000, 1]) == (False, "")
    assert is_last_round(p, [10000, 9999, 9999]) == (False, "")
    last, why = is_last_round(p, [10000, 9999, 9999, 9999])
    assert last and "not converging" in why
    last, why = is_last_round(p, [10000, 5000, 2000, 1])
    assert last and "dirty set small" in why


def test_min_rounds_one_still_needs_a_dirty_round_to_judge_the_size():
    p = ConvergencePolicy(min_rounds=1)
    assert is_last_round(p, [1]) == (False, "")
    assert is_last_round(p, [100000, 1])[0]


def test_dirty_set_small():
    last, why = is_last_round(DEFAULT, [100000, 100])
    assert last
    assert why == f"dirty set small (100 pages <= {TARGET_PAGES})"
    # the boundary is inclusive
    last, why = is_last_round(DEFAULT, [100000, TARGET_PAGES])
    assert last and "dirty set small" in why
    assert is_last_round(DEFAULT, [100000, TARGET_PAGES + 1]) == (False, "")
    last, why = is_last_round(DEFAULT, [100000, 0])
    assert last and "dirty set small (0 pages" in why


def test_converging_keeps_going():
    assert is_last_round(DEFAULT, [100000, 50000]) == (False, "")
    assert is_last_round(DEFAULT, [100000, 50000, 20000]) == (False, "")
    assert is_last_round(DEFAULT, [100000, 50000, 20000, 5000]) == (False, "")


def test_not_converging():
    last, why = is_last_round(DEFAULT, [100000, 50000, 49000])
    assert last
    assert why == "not converging (50000 -> 49000 pages)"
    # a growing dirty set is not converging either
    last, why = is_last_round(DEFAULT, [100000, 50000, 60000])
    assert last and why == "not converging (50000 -> 60000 pages)"
    # shrinking by more than min_shrink is converging
    assert is_last_round(DEFAULT, [100000, 50000, 40000]) == (False, "")


def test_not_converging_needs_two_dirty_rounds():
    # with only round 0 and one dirty round, there is nothing to compare the dirty set with:
    # a dirty round bigger than round 0 does not stop pre-copy by itself
    assert is_last_round(DEFAULT, [1000, 5000]) == (False, "")


def test_custom_min_shrink():
    p = ConvergencePolicy(min_shrink=0.5)
    assert is_last_round(p, [100000, 50000, 30000])[0]
    assert is_last_round(p, [100000, 50000, 20000]) == (False, "")


def test_round_cap():
    rounds = [100000 // (2 ** i) + 1000 for i in range(MAX_ROUNDS)]
    for n in range(1, MAX_ROUNDS):
        assert is_last_round(DEFAULT, rounds[:n]) == (False, ""), n
    assert is_last_round(DEFAULT, rounds) == (True, f"round cap ({MAX_ROUNDS})")
    assert is_last_round(DEFAULT, rounds + [500])[0]


def test_round_cap_takes_precedence():
    p = ConvergencePolicy(max_rounds=3)
    assert is_last_round(p, [100000, 50000, 1]) == (True, "round cap (3)")
    p = ConvergencePolicy(min_rounds=1, max_rounds=1)
    assert is_last_round(p, []) == (False, "")
    assert is_last_round(p, [100000]) == (True, "round cap (1)")


def test_min_equals_max():
    p = ConvergencePolicy(min_rounds=5, max_rounds=5)
    for n in range(5):
        assert is_last_round(p, [1] * n) == (False, "")
    assert is_last_round(p, [1] * 5) == (True, "round cap (5)")


def test_target_pages_custom():
    p = ConvergencePolicy(target_pages=0)
    assert is_last_round(p, [1000, 1]) == (False, "")
    assert is_last_round(p, [1000, 0])[0]


@pytest.mark.parametrize("kwargs", [
    {"min_rounds": 0},
    {"min_rounds": -1},
    {"min_rounds": 5, "max_rounds": 4},
    {"max_rounds": 0},
    {"min_rounds": 1, "max_rounds": 0},
])
def test_validation_errors(kwargs):
    with pytest.raises(ValueError) as ei:
        ConvergencePolicy(**kwargs)
    msg = str(ei.value)
    p = dict(dataclasses.asdict(DEFAULT), **kwargs)
    assert f"min_rounds ({p['min_rounds']})" in msg
    assert f"max_rounds ({p['max_rounds']})" in msg


def test_valid_edge_policies():
    ConvergencePolicy(min_rounds=1, max_rounds=1)
    ConvergencePolicy(min_rounds=3, max_rounds=3)
    ConvergencePolicy(min_rounds=1, max_rounds=100)


def test_policy_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.max_rounds = 3  # type: ignore[misc]


# ---- a downtime target ----------------------------------------------------------------------

from prerestore.policy import estimate_final_ms, measured_bandwidth  # noqa: E402


def test_estimate_grows_with_pages_and_processes_and_shrinks_with_bandwidth():
    base = estimate_final_ms(0, 1e9, 1)
    assert base > 0
    assert estimate_final_ms(25600, 1e9, 1) == pytest.approx(base + 104.8576)   # 100 MiB at 1 GB/s
    assert estimate_final_ms(25600, 2e9, 1) < estimate_final_ms(25600, 1e9, 1)
    assert estimate_final_ms(0, 1e9, 8) > base


def test_bandwidth_comes_from_the_latest_round_big_enough_to_tell():
    assert measured_bandwidth([]) == 1e9
    assert measured_bandwidth([(100 << 20, 100.0), (4096, 0.01)]) == pytest.approx(
        (100 << 20) / 0.1)
    assert measured_bandwidth([(100 << 20, 100.0), (50 << 20, 25.0)]) == pytest.approx(
        (50 << 20) / 0.025)


def test_max_downtime_stops_when_the_estimate_fits():
    p = ConvergencePolicy(max_downtime_ms=20)
    assert is_last_round(p, [100000, 5000], estimate_ms=35.0) == (False, "")
    last, why = is_last_round(p, [100000, 5000, 3000], estimate_ms=19.0)
    assert last and "estimated downtime 19.0 ms <= target 20 ms" in why
    # without a target the page count decides; with one, a small dirty set alone does not
    assert is_last_round(p, [100000, 10], estimate_ms=50.0) == (False, "")
    # rounds that stop shrinking still end it, target or not
    last, why = is_last_round(p, [100000, 5000, 4900], estimate_ms=50.0)
    assert last and "not converging" in why
    assert is_last_round(p, [100000] * 8, estimate_ms=50.0)[0]          # the round cap
