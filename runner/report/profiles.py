"""Performance profiles and their score, as AlgoPerf scores training algorithms (Dahl et al. 2023, "Benchmarking
Neural Network Training Algorithms", arXiv 2306.07179, sec. 4.5).

    t[p][m]     the time (seconds, or steps) method m needs to reach workload p's target; +inf when it never does
    r[p][m]     t[p][m] / min over methods m' of t[p][m']: 1 for the fastest method on p; +inf when m never reached
                the target, and for every method on a workload that no method solved
    rho_m(tau)  the fraction of workloads with r[p][m] <= tau (a step function of tau, from 0 up to at most 1)
    score_m     (1 / (tau_max - 1)) * integral from 1 to tau_max of rho_m(tau) d tau, with tau_max = 4: 1 when m is
                the fastest on every workload, 0 when it is never within 4 times the fastest

How to read a profile: rho_m(1) is the share of workloads on which m was the fastest; rho_m(2) the share on which it
took at most twice the fastest method's time; the curve's height at the right edge is the share of workloads on
which it reached the target within tau_max times the fastest. A curve above another everywhere is better on every
reading; crossing curves mean one method wins more often while the other fails less often.

The integral of a step function is exact here: workload p contributes (tau_max - r) / (tau_max - 1) / |P| when its
ratio r is at most tau_max, else nothing.
"""

from __future__ import annotations

import math
from typing import Mapping

TAU_MAX = 4.0  # AlgoPerf's upper integration limit

Times = Mapping[str, Mapping[str, float]]  # workload -> method -> time (or steps) to target; math.inf if never


def ratios(times: Times) -> dict[str, dict[str, float]]:
    """workload -> method -> t / (the fastest method's t on that workload); inf where not reached or unsolved."""
    out: dict[str, dict[str, float]] = {}
    for workload, per_method in times.items():
        finite = [t for t in per_method.values() if _finite(t)]
        best = min(finite) if finite else math.inf
        row = {}
        for method, t in per_method.items():
            if not _finite(t) or not math.isfinite(best):
                row[method] = math.inf
            elif best <= 0:  # reached at time 0 (a target met by the initial model): every finisher ties
                row[method] = 1.0
            else:
                row[method] = t / best
        out[workload] = row
    return out


def rho(ratio_list: list[float], tau: float) -> float:
    """The fraction of workloads whose ratio is at most tau."""
    if not ratio_list:
        return 0.0
    return sum(r <= tau for r in ratio_list) / len(ratio_list)


def profile(times: Times, taus: list[float]) -> dict[str, list[float]]:
    """method -> rho_m(tau) for each tau in `taus` (a workload where a method has no entry counts as not reached)."""
    r = ratios(times)
    methods = _methods(times)
    return {m: [rho([r[p].get(m, math.inf) for p in r], tau) for tau in taus] for m in methods}


def score(ratio_list: list[float], tau_max: float = TAU_MAX) -> float:
    """The normalised area under rho from 1 to tau_max (exact for the step function)."""
    if not ratio_list:
        return 0.0
    area = sum(tau_max - max(r, 1.0) for r in ratio_list if r <= tau_max)
    return area / (tau_max - 1.0) / len(ratio_list)


def scores(times: Times, tau_max: float = TAU_MAX) -> dict[str, float]:
    """method -> score over the workloads (a workload where a method has no entry counts as not reached)."""
    r = ratios(times)
    return {m: score([r[p].get(m, math.inf) for p in r], tau_max) for m in _methods(times)}


def _methods(times: Times) -> list[str]:
    methods: list[str] = []
    for per_method in times.values():
        methods += [m for m in per_method if m not in methods]
    return methods


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
