"""The race's arithmetic against ground truth that shares no code with it: performance profiles and scores on
hand-computed cases and against a numerical integration; the rank test against scipy's exact Mann-Whitney p-values
and against brute-force enumeration of every split (ties and infinities included); Holm's adjustment on a textbook
case."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from runner.report.profiles import profile, ratios, rho, score, scores
from runner.report.significance import holm, mann_whitney, midranks, smallest_p

INF = math.inf


# ---------------------------------------------------------------- profiles and scores


def test_ratios_by_hand():
    times = {"w1": {"a": 2.0, "b": 4.0, "c": INF}, "w2": {"a": 9.0, "b": 3.0, "c": 6.0}, "w3": {"a": INF, "b": INF}}
    assert ratios(times) == {"w1": {"a": 1.0, "b": 2.0, "c": INF}, "w2": {"a": 3.0, "b": 1.0, "c": 2.0},
                             "w3": {"a": INF, "b": INF}}  # nobody solved w3: no one gets credit


def test_profile_and_score_by_hand():
    # a: ratios 1, 3 and inf over three workloads; b: 2, 1, inf; c: inf, 2 and (missing on w3 = not reached).
    times = {"w1": {"a": 2.0, "b": 4.0, "c": INF}, "w2": {"a": 9.0, "b": 3.0, "c": 6.0}, "w3": {"a": INF, "b": INF}}
    rhos = profile(times, [1.0, 1.5, 2.0, 3.0, 4.0, 100.0])
    assert rhos["a"] == [1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3]
    assert rhos["b"] == [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3]
    assert rhos["c"] == [0, 0, 1 / 3, 1 / 3, 1 / 3, 1 / 3]
    # Areas from tau = 1 to 4, divided by 3 and by the 3 workloads: a: (4-1) + (4-3) = 4; b: (4-2) + (4-1) = 5;
    # c: (4-2) = 2.
    got = scores(times)
    assert got["a"] == pytest.approx(4 / 9) and got["b"] == pytest.approx(5 / 9) and got["c"] == pytest.approx(2 / 9)


def test_score_extremes_and_the_tau_max_edge():
    assert score([1.0, 1.0]) == 1.0  # fastest everywhere
    assert score([INF, 4.5]) == 0.0  # never within 4x
    assert score([4.0]) == 0.0  # exactly 4x: counted in rho(4) but the area to its right is zero
    assert score([2.5]) == pytest.approx(0.5)
    assert score([]) == 0.0


def test_score_equals_the_numerical_area_under_rho():
    rng = random.Random(0)
    grid = np.linspace(1.0, 4.0, 30_001)
    for _ in range(20):
        values = [rng.choice([INF, 1.0, rng.uniform(1.0, 6.0)]) for _ in range(rng.randint(1, 7))]
        heights = np.array([rho(values, tau) for tau in grid[::100]])  # a coarse check of rho itself ...
        assert heights[0] == sum(v <= 1.0 for v in values) / len(values)
        dense = (np.array(values)[None, :] <= grid[:, None]).mean(axis=1)  # ... and the area on a fine grid
        area = np.trapezoid(dense, grid) / 3.0
        assert score(values) == pytest.approx(area, abs=3e-4)


# ---------------------------------------------------------------- the rank test


def brute_force_p(a: list[float], b: list[float]) -> float:
    """Two-sided permutation p-value of the rank sum, by listing every split of the pooled values (ties get mean
    ranks, computed here with numpy's argsort; infinities rank last)."""
    pooled = np.array([*a, *b], dtype=float)
    order = np.argsort(pooled, kind="stable")
    ranks = np.empty(len(pooled))
    ranks[order] = np.arange(1, len(pooled) + 1)
    for value in np.unique(pooled):
        ranks[pooled == value] = ranks[pooled == value].mean()
    n = len(a)
    centre = n * (len(pooled) + 1) / 2
    observed = abs(ranks[:n].sum() - centre)
    splits = list(itertools.combinations(range(len(pooled)), n))
    extreme = sum(abs(ranks[list(s)].sum() - centre) >= observed - 1e-9 for s in splits)
    return extreme / len(splits)


def test_exact_p_values_equal_scipys_without_ties():
    rng = random.Random(1)
    for _ in range(300):
        a = [rng.random() for _ in range(rng.randint(1, 8))]
        b = [rng.random() + rng.choice([0.0, 0.5]) for _ in range(rng.randint(1, 8))]
        expected = mannwhitneyu(a, b, alternative="two-sided", method="exact")
        got = mann_whitney(a, b)
        assert got.p == pytest.approx(expected.pvalue, rel=1e-12, abs=1e-15)
        assert got.u == expected.statistic


def test_known_values():
    # Five seeds each, every time of a below every time of b: the most extreme split of C(10, 5) = 252.
    assert mann_whitney([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]).p == pytest.approx(2 / 252)
    assert mann_whitney([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]).first_smaller
    assert mann_whitney([1, 2], [3, 4]).p == pytest.approx(2 / 6)  # two seeds cannot be significant
    assert mann_whitney([5.0], [5.0]).p == 1.0
    assert smallest_p(5, 5) == pytest.approx(2 / 252) and smallest_p(2, 2) == pytest.approx(1 / 3)
    assert smallest_p(1, 1) == 1.0


def test_ties_and_never_reached_against_brute_force():
    cases = [
        ([1.0, 2.0, INF], [INF, INF, 5.0]),  # runs that never reached the target tie with each other, rank last
        ([INF, INF, INF], [1.0, 1.5, 2.0]),
        ([INF, INF], [INF, INF]),  # nobody reached: no evidence either way
        ([3.0, 3.0, 4.0, 1.0], [3.0, 2.0, 2.0]),
        ([1.0, 1.0, 1.0, 2.0, 2.0], [2.0, 2.0, 3.0, 3.0, INF, INF]),
    ]
    rng = random.Random(2)
    for _ in range(100):
        grid = [1.0, 2.0, 3.0, INF]
        cases.append(([rng.choice(grid) for _ in range(rng.randint(1, 6))],
                      [rng.choice(grid) for _ in range(rng.randint(1, 6))]))
    for a, b in cases:
        assert mann_whitney(a, b).p == pytest.approx(brute_force_p(a, b), rel=1e-12), (a, b)
    assert mann_whitney([INF, INF], [INF, INF]).p == 1.0
    test = mann_whitney([INF, INF, INF], [1.0, 1.5, 2.0])
    assert test.p == pytest.approx(0.1) and not test.first_smaller


def test_midranks():
    assert midranks([3.0, 1.0, INF, 3.0, INF]) == [2.5, 1.0, 4.5, 2.5, 4.5]


def test_nan_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        mann_whitney([1.0, math.nan], [2.0])


def test_holm_on_a_textbook_case():
    # p = 0.01, 0.04, 0.03, 0.005 (m = 4): sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, 1*0.04 =
    # 0.02, 0.03, 0.06, 0.04 -> running maximum 0.02, 0.03, 0.06, 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_the_steps_table_names_a_full_batch_as_such():
    """A run with trainer.batching=full sees the whole training set per step: its batch is "full", not the
    trainer.batch_size its config still holds (the race's L-BFGS)."""
    from pathlib import Path

    from runner.report.load import Run
    from runner.report.quantities import Target
    from runner.report.verdict import cell_record, per_seed_records

    rows = [{"step": 100, "wall_time": 0.4, "eval/loss": 0.0105}]
    runs = [Run(Path(f"/r/{seed}"), {"seed": seed, "trainer": {"batch_size": 100, "batching": batching}}, {}, None,
                rows, "ok") for seed, batching in ((1, "full"), (2, "shuffle"))]
    records = per_seed_records(runs, "sine_mlp", "lbfgs", Target("eval/loss", 0.011, "min"))
    assert [r["batch_size"] for r in records] == ["full", 100]
    assert cell_record(records[:1], "sine_mlp", "lbfgs")["batch_size"] == "full"
