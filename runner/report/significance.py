"""Is one method faster than another across seeds? An exact two-sided rank test, without scipy.

The per-seed times to target of two methods on one workload are compared with the Mann-Whitney U statistic (Mann &
Whitney 1947; Wilcoxon's rank-sum test): U_a = R_a - n_a (n_a + 1) / 2, where R_a is the sum of method a's ranks in
the pooled sample (tied values share their mean rank). A run that never reached the target has time +inf: it ties
with the other runs that never reached it and ranks behind every run that did, so "never" is a result, not a gap.

The p-value is exact: under the null hypothesis (both methods' times come from one distribution) every way of
splitting the pooled ranks into n_a and n_b values is equally likely, and the p-value is the share of the
C(n_a + n_b, n_a) splits whose |U - n_a n_b / 2| is at least the observed one (the two-sided permutation test of U,
conditional on the ties). The distribution of the rank sum is counted by dynamic programming over the pooled (doubled,
hence integer) ranks, so ties and any sample sizes are exact. Without ties this is scipy.stats.mannwhitneyu's exact
p-value.

Few seeds cannot show a difference whatever the times: with n seeds per method and no ties, the smallest possible
p-value is 2 / C(2n, n): 0.33 for n = 2, 0.10 for n = 3, 0.029 for n = 4, 0.0079 for n = 5.

With several pairs per workload the p-values are adjusted by Holm's step-down method (Holm 1979), which keeps the
probability of any false "significant" at most alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RankTest:
    u: float  # Mann-Whitney U of the first sample (small U: the first sample's values are smaller)
    p: float  # exact two-sided p-value
    n_a: int
    n_b: int

    @property
    def first_smaller(self) -> bool:
        return self.u < self.n_a * self.n_b / 2


def midranks(values: list[float]) -> list[float]:
    """1-based ranks of `values`, tied values sharing the mean of their ranks (+inf ties with +inf)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def mann_whitney(a: list[float], b: list[float]) -> RankTest:
    """The exact two-sided rank test of samples `a` and `b` (floats, +inf allowed, no NaN)."""
    if not a or not b:
        raise ValueError("the rank test needs at least one value in each sample")
    if any(math.isnan(v) for v in [*a, *b]):
        raise ValueError("the rank test got NaN: a time to target is a number or +inf")
    n_a, n_b = len(a), len(b)
    doubled = [round(2 * r) for r in midranks([*a, *b])]  # midranks are multiples of 1/2
    observed = sum(doubled[:n_a])
    centre = n_a * (n_a + n_b + 1)  # E[2 R_a]
    counts = _rank_sum_counts(doubled, n_a)
    extreme = sum(c for s, c in counts.items() if abs(s - centre) >= abs(observed - centre))
    p = extreme / math.comb(n_a + n_b, n_a)
    return RankTest(u=observed / 2 - n_a * (n_a + 1) / 2, p=min(1.0, p), n_a=n_a, n_b=n_b)


def _rank_sum_counts(items: list[int], k: int) -> dict[int, int]:
    """sum -> the number of k-element subsets of `items` (by position) with that sum."""
    table: list[dict[int, int]] = [{0: 1}] + [{} for _ in range(k)]
    for item in items:
        for size in range(k, 0, -1):
            for total, count in table[size - 1].items():
                table[size][total + item] = table[size].get(total + item, 0) + count
    return table[k]


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for position, i in enumerate(order):
        running = max(running, min(1.0, (m - position) * p_values[i]))
        adjusted[i] = running
    return adjusted


def smallest_p(n_a: int, n_b: int) -> float:
    """The smallest two-sided p-value samples of these sizes can give (no ties): 2 / C(n_a + n_b, n_a), at most 1."""
    return min(1.0, 2 / math.comb(n_a + n_b, n_a))
