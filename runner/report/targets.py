"""How a workload's target and budget are chosen, from measured reference runs (conf/workload/*.yaml cite its output).

    python -m runner.report.targets <sweep folders...> --metric eval/accuracy --within 3000

AlgoPerf sets each workload's target to what well-tuned standard optimisers reach within the budget (Dahl et al.
2023, sec. 4.4). curvlab's rule, applied to reference runs of SGD with momentum and Adam over a learning-rate grid and
two or more seeds, each `--within` steps long (a quarter of the workload's step budget):

1. per configuration (the runs that differ only in their seed), the worst seed's best value of the metric within the
   first `--within` steps;
2. the target is the best configuration's value, rounded towards easier (accuracies down to 0.001, losses up to three
   significant digits), so the tuned reference reaches it on every seed within a quarter of the step budget;
3. the step budget is 4 x `--within` and the wall-clock budget 4 x the slowest seed's time of the best
   configuration over those steps (rounded up to a quarter minute), at most `--max-minutes` (default 2: the race
   runs dozens of runs per workload): a method up to 4 times slower than the reference (AlgoPerf's tau_max) still
   reaches the target within the budget. Times measured on a busy machine are longer than on a quiet one; the
   budget is a cap, and a race on other hardware should re-measure it.

Prints one line per configuration and the proposal. Exit codes: 0 ok, 2 no runs or bad options.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from runner.report import quantities as q
from runner.report.aggregate import group_runs, mixed_keys
from runner.report.load import ReportError, Run, find_runs
from runner.report.tables import markdown_table


def within(run: Run, steps: int) -> list[dict[str, Any]]:
    return [row for row in run.rows if row.get("step", math.inf) <= steps]


def measure(paths: list[str | Path], metric: str, steps: int, by: list[str],
            max_minutes: float = 2.0) -> dict[str, Any]:
    runs = find_runs(list(paths))
    mode = q.better(metric)
    configs = []
    for label, group in group_runs(runs, by).items():
        if mixed_keys(group):
            raise ReportError(f"group {label} mixes configurations ({', '.join(mixed_keys(group)[:4])}); add the keys "
                              f"to --by.")
        bests = [q.best(within(run, steps), metric, mode) for run in group]
        times = [max((r["wall_time"] for r in within(run, steps) if "wall_time" in r), default=None) for run in group]
        if any(b is None for b in bests):
            continue
        worst = min(bests) if mode == "max" else max(bests)
        configs.append({"config": label, "seeds": len(group), "worst seed's best": worst,
                        "bests": bests, "slowest time": max(t for t in times if t is not None)})
    if not configs:
        raise ReportError(f"no run logged {metric} within {steps} steps.")
    best = (max if mode == "max" else min)(configs, key=lambda c: c["worst seed's best"])
    value = best["worst seed's best"]
    target = math.floor(value * 1000) / 1000 if mode == "max" else _ceil_significant(value, 3)
    minutes = min(math.ceil(4 * best["slowest time"] / 60 * 4) / 4, max_minutes)
    return {"configs": configs, "best": best, "target": target, "max_steps": 4 * steps,
            "max_time_minutes": minutes, "mode": mode}


def _ceil_significant(value: float, digits: int) -> float:
    if value <= 0:
        return value
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale) / scale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runner.report.targets", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="sweep folders of the reference runs")
    p.add_argument("--metric", default="eval/accuracy", help="the workload's validation metric")
    p.add_argument("--within", type=int, required=True, help="steps of the reference runs (a quarter of the budget)")
    p.add_argument("--by", default="optimizer,optimizer.lr", help="config keys that separate the configurations")
    p.add_argument("--max-minutes", type=float, default=2.0, help="upper limit of the wall-clock budget")
    args = p.parse_args(argv)
    try:
        found = measure(args.folders, args.metric, args.within, [k for k in args.by.split(",") if k], args.max_minutes)
    except ReportError as exc:
        print(f"curvlab targets: error: {exc}", file=sys.stderr)
        return 2
    worst = "worst seed's best"
    rows = [[c["config"], c["seeds"], f"{c[worst]:.5g}", " ".join(f"{b:.5g}" for b in c["bests"]),
             f"{c['slowest time']:.3g}"] for c in found["configs"]]
    print(markdown_table(["configuration", "seeds", f"worst seed's best {args.metric}", "each seed's best",
                          f"slowest seed's time for {args.within} steps (s)"], rows))
    print(f"best configuration: {found['best']['config']}; proposed target {args.metric} "
          f"{'>=' if found['mode'] == 'max' else '<='} {found['target']:g}; budget: trainer.max_steps="
          f"{found['max_steps']} trainer.max_time_minutes={found['max_time_minutes']:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
