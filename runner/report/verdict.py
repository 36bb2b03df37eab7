"""The race's verdict from its re-run folders (runner/race.py): time and steps to target, performance profiles, and
pairwise significance, in <out>/verdict.md with CSVs and figures.

Per run (a seed of a method's best configuration on a workload): the wall-clock time and the optimiser steps at the
first evaluation where the workload's metric reached its target (workload.metric / workload.target of the run's
config.yaml, the rule of runner/report/quantities.py), +inf when it never did, whatever the run's status.

Per workload and method: the median over seeds (+inf counted: a method that misses the target on more than half of
its seeds has time +inf) with the smallest and largest time among the seeds that reached it. The median is the time
the performance profiles (runner/report/profiles.py) compare, as AlgoPerf takes the median over its repeated studies
(Dahl et al. 2023, sec. 4.5); here the repetitions are the re-runs of one tuned configuration on fresh seeds, so the
spread shows seed noise, not the luck of the tuning. Profiles and scores are given by wall-clock and by steps: a
method with costly steps (a curvature method) ranks higher by steps than by time. Steps compare methods fairly only at
equal batch sizes (the tables give each method's batch size).

Pairwise: the exact two-sided rank test of runner/report/significance.py on the per-seed times (and steps), never
reached = +inf, Holm-adjusted over the pairs of each workload; "a faster" means significant at alpha after the
adjustment with a's times ranked lower.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from runner.report import quantities as q
from runner.report.load import ReportError, Run, find_runs
from runner.report.profiles import TAU_MAX, ratios, scores
from runner.report.significance import holm, mann_whitney, smallest_p
from runner.report.tables import markdown_table, write_csv

KINDS = {"time": ("wall_time", "wall-clock time to target (s of optimiser steps)"),
         "steps": ("step", "optimiser steps to target")}


@dataclass
class Verdict:
    out: Path
    markdown: str
    per_seed: list[dict[str, Any]] = field(default_factory=list)
    cells: list[dict[str, Any]] = field(default_factory=list)  # one per workload and method
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> method -> score
    ratios: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # kind -> workload -> method -> r
    pairs: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def workload_target(runs: list[Run], workload: str) -> q.Target:
    """The target every run of the workload recorded (workload.metric = workload.target in its config.yaml)."""
    found = set()
    for run in runs:
        node = run.config.get("workload") or {}
        if "metric" not in node or node.get("target") is None:
            raise ReportError(f"{run.path} has no workload.metric / workload.target in its config.yaml: it was not run "
                              f"with workload={workload}.")
        found.add((node["metric"], float(node["target"])))
    if len(found) != 1:
        raise ReportError(f"the runs of workload {workload} disagree on its target: {sorted(found)}.")
    metric, value = found.pop()
    return q.parse_target(f"{metric}={value!r}")


def per_seed_records(runs: list[Run], workload: str, method: str, target: q.Target) -> list[dict[str, Any]]:
    records = []
    for run in runs:
        row = q.first_reaching(run.rows, target)
        records.append({
            "workload": workload, "method": method, "seed": run.seed, "status": run.status,
            "reached": row is not None,
            "time": float(row["wall_time"]) if row is not None else math.inf,
            "steps": int(row["step"]) if row is not None else math.inf,
            "batch_size": _batch(run.config.get("trainer") or {}),
            "final": q.final(run.rows, target.metric), "best": q.best(run.rows, target.metric, target.mode),
            "run": str(run.path),
        })
    return records


def _batch(trainer: dict[str, Any]) -> Any:
    """The run's batch as the steps table shows it: "full" when every step sees the whole training set
    (trainer.batching=full, e.g. L-BFGS in the race), else trainer.batch_size."""
    return "full" if trainer.get("batching") == "full" else trainer.get("batch_size")


def cell_record(records: list[dict[str, Any]], workload: str, method: str) -> dict[str, Any]:
    cell: dict[str, Any] = {"workload": workload, "method": method, "seeds": len(records),
                            "reached": sum(r["reached"] for r in records),
                            "batch_size": ",".join(sorted({str(r["batch_size"]) for r in records}))}
    for kind in KINDS:
        values = [r[kind] for r in records]
        finite = [v for v in values if math.isfinite(v)]
        cell[f"{kind} median"] = float(np.median(values)) if values else math.inf
        cell[f"{kind} min"] = min(finite) if finite else None
        cell[f"{kind} max"] = max(finite) if finite else None
    return cell


def build_verdict(folders: dict[tuple[str, str], Path], workloads: list[str], methods: list[str], out: Path,
                  alpha: float = 0.05, tuned: str = "", plan: dict[str, Any] | None = None,
                  formats: tuple[str, ...] = ("png", "pdf")) -> Verdict:
    """The verdict over the re-run folders {(workload, method): folder}; files into `out`. Raises ReportError."""
    from runner.report.cli import build_report
    from runner.report.plots import plot_profile, save_figure

    out.mkdir(parents=True, exist_ok=True)
    per_seed: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    targets: dict[str, q.Target] = {}
    info: dict[str, Any] = {}
    for workload in workloads:
        found = {m: find_runs([folders[(workload, m)]]) for m in methods}
        targets[workload] = workload_target([r for runs in found.values() for r in runs], workload)
        for method in methods:
            records = per_seed_records(found[method], workload, method, targets[workload])
            per_seed += records
            cells.append(cell_record(records, workload, method))
            info = info or _run_info(found[method])
    verdict = Verdict(out, "", per_seed, cells)
    for kind in KINDS:
        times = {w: {c["method"]: c[f"{kind} median"] for c in cells if c["workload"] == w} for w in workloads}
        verdict.ratios[kind] = ratios(times)
        verdict.scores[kind] = scores(times)
    verdict.pairs = pairwise(per_seed, workloads, methods, alpha)
    for kind, (_, label) in KINDS.items():
        fig = plot_profile(verdict.ratios[kind], verdict.scores[kind], methods,
                           title=f"Performance profile by {'wall-clock time' if kind == 'time' else 'steps'}: "
                                 f"{len(workloads)} workload{'s' if len(workloads) > 1 else ''} "
                                 f"({', '.join(workloads)})",
                           xlabel=f"τ = {label.split(' to target')[0]} / the fastest method's")
        verdict.files += save_figure(fig, out, f"profile_{kind}", formats)
    for workload in workloads:
        report = build_report([folders[(workload, m)] for m in methods], by=["optimizer"],
                              targets=[f"{targets[workload].metric}={targets[workload].value!r}"],
                              out=out / workload, formats=list(formats))
        verdict.files += report.files
    verdict.markdown = _markdown(verdict, workloads, methods, targets, alpha, tuned, plan, info)
    (out / "verdict.md").write_text(verdict.markdown, encoding="utf-8")
    write_csv(out / "per_seed.csv", per_seed)
    write_csv(out / "cells.csv", cells)
    write_csv(out / "scores.csv", [{"method": m, **{f"score_{k}": verdict.scores[k][m] for k in KINDS}}
                                   for m in methods])
    write_csv(out / "ratios.csv", [{"kind": k, "workload": w, "method": m, "ratio": verdict.ratios[k][w][m]}
                                   for k in KINDS for w in workloads for m in methods])
    write_csv(out / "pairs.csv", verdict.pairs)
    verdict.files += [out / n for n in ("verdict.md", "per_seed.csv", "cells.csv", "scores.csv", "ratios.csv",
                                        "pairs.csv")]
    return verdict


def pairwise(per_seed: list[dict[str, Any]], workloads: list[str], methods: list[str],
             alpha: float) -> list[dict[str, Any]]:
    """Each pair of methods on each workload: the exact rank test on the per-seed times and steps, Holm-adjusted
    over the pairs of the workload."""
    pairs = []
    for workload in workloads:
        mine = [r for r in per_seed if r["workload"] == workload]
        found = []
        for a, b in itertools.combinations(methods, 2):
            record: dict[str, Any] = {"workload": workload, "a": a, "b": b}
            for kind in KINDS:
                xa = [r[kind] for r in mine if r["method"] == a]
                xb = [r[kind] for r in mine if r["method"] == b]
                test = mann_whitney([float(v) for v in xa], [float(v) for v in xb])
                record.update({f"{kind} median a": float(np.median(xa)), f"{kind} median b": float(np.median(xb)),
                               f"{kind} U": test.u, f"{kind} p": test.p, f"{kind} a smaller": test.first_smaller,
                               "smallest possible p": smallest_p(len(xa), len(xb))})
            found.append(record)
        for kind in KINDS:
            for record, adjusted in zip(found, holm([r[f"{kind} p"] for r in found])):
                record[f"{kind} p holm"] = adjusted
                record[f"{kind} verdict"] = _say(record, kind, alpha)
        pairs += found
    return pairs


def _say(record: dict[str, Any], kind: str, alpha: float) -> str:
    if record[f"{kind} p holm"] > alpha:
        return "no significant difference"
    faster = record["a"] if record[f"{kind} a smaller"] else record["b"]
    return f"{faster} faster"


def _run_info(runs: list[Run]) -> dict[str, Any]:
    for run in runs:
        try:
            return json.loads((run.path / "run_info.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return {}


def _num(value: float | None, fmt: str) -> str:
    if value is None:
        return "—"
    if not math.isfinite(value):
        return "∞"
    return format(value, fmt)


def _cell_text(cell: dict[str, Any], kind: str) -> str:
    fmt = ".3g" if kind == "time" else ".0f"
    median, lo, hi = cell[f"{kind} median"], cell[f"{kind} min"], cell[f"{kind} max"]
    reached = f"{cell['reached']}/{cell['seeds']}"
    if cell["reached"] == 0:
        return f"not reached (0/{cell['seeds']})"
    if lo != hi:
        spread = f" [{_num(lo, fmt)}, {_num(hi, fmt)}]"
    else:  # one seed reached it, or all at the same value: show it unless the median says it already
        spread = "" if median == lo else f" [{_num(lo, fmt)}]"
    return f"{_num(median, fmt)}{spread} ({reached})"


def _markdown(verdict: Verdict, workloads: list[str], methods: list[str], targets: dict[str, q.Target], alpha: float,
              tuned: str, plan: dict[str, Any] | None, info: dict[str, Any]) -> str:
    lines = ["# Race verdict", ""]
    if plan:
        lines += [f"Plan: {len(workloads)} workloads × {len(methods)} methods; {plan['trials']} optuna trials per "
                  f"method and workload on seed {plan['tuning_seed']} (objective: time to the workload's target); the "
                  f"best configuration re-run on seeds {','.join(map(str, plan['seeds']))}; launcher "
                  f"{plan['launcher']}; overrides for every run: {' '.join(plan['overrides']) or 'none'}"
                  + "".join(f"; {m} only: {' '.join(o)}" for m, o in plan.get("sets", {}).items()) + "."]
    git = info.get("git", {})
    lines += [f"Written {datetime.now().isoformat(timespec='minutes')}; runs on {info.get('hostname', '?')} "
              f"({info.get('platform', '?')}, {info.get('cpu_count', '?')} CPUs, torch threads "
              f"{info.get('torch_threads', '?')}, GPUs: {', '.join(info.get('cuda_devices') or []) or 'none'}); "
              f"commit {git.get('commit', '?')}{' (with uncommitted changes)' if git.get('dirty') is True else ''}.",
              ""]
    for kind, (_, label) in KINDS.items():
        lines += [f"## {label[0].upper()}{label[1:]}", "",
                  "Median over seeds [fastest, slowest seed that reached the target] (seeds that reached it / seeds); "
                  "the median counts a seed that never reached it as ∞.", ""]
        rows = []
        for workload in workloads:
            row = [f"{workload} ({targets[workload].label})"]
            for method in methods:
                cell = next(c for c in verdict.cells if c["workload"] == workload and c["method"] == method)
                row.append(_cell_text(cell, kind) + (f", batch {cell['batch_size']}" if kind == "steps" else ""))
            rows.append(row)
        lines += [markdown_table(["workload (target)", *methods], rows), ""]
    lines += ["## Performance profiles (AlgoPerf)", "",
              f"Score: the area under the profile rho(τ) from τ = 1 to {TAU_MAX:g}, divided by {TAU_MAX - 1:g} (1: "
              f"the fastest on every workload; 0: never within {TAU_MAX:g}× the fastest). Figures: profile_time.png, "
              f"profile_steps.png.", ""]
    rows = []
    for method in methods:
        reached = sum(math.isfinite(verdict.ratios["time"][w][method]) for w in workloads)
        fastest = sum(verdict.ratios["time"][w][method] == 1.0 for w in workloads)
        rows.append([method, f"{verdict.scores['time'][method]:.3f}", f"{verdict.scores['steps'][method]:.3f}",
                     f"{fastest}/{len(workloads)}", f"{reached}/{len(workloads)}"])
    lines += [markdown_table(["method", "score by wall-clock", "score by steps", "fastest by wall-clock on",
                              "target reached (median seed) on"], rows), ""]
    rows = [[w, *[_num(verdict.ratios["time"][w][m], ".2f") + " / " + _num(verdict.ratios["steps"][w][m], ".2f")
                  for m in methods]] for w in workloads]
    lines += ["Ratio to the fastest method, by wall-clock / by steps:", "",
              markdown_table(["workload", *methods], rows), ""]
    lines += ["## Is the difference significant?", "",
              f"Exact two-sided Mann-Whitney rank test on the per-seed values (never reached = ∞), p-values "
              f"Holm-adjusted over the pairs of each workload; significant at α = {alpha:g}. With n seeds per method "
              f"the smallest possible p is 2 / C(2n, n) (column 'min p').", ""]
    rows = [[p["workload"], f"{p['a']} vs {p['b']}", f"{_num(p['time median a'], '.3g')} vs "
             f"{_num(p['time median b'], '.3g')}", f"{p['time p']:.3g} ({p['time p holm']:.3g})", p["time verdict"],
             f"{p['steps p']:.3g} ({p['steps p holm']:.3g})", p["steps verdict"], f"{p['smallest possible p']:.3g}"]
            for p in verdict.pairs]
    lines += [markdown_table(["workload", "pair", "median time (s)", "p time (Holm)", "by wall-clock",
                              "p steps (Holm)", "by steps", "min p"], rows,
                             align=["---", "---", "---:", "---:", "---", "---:", "---", "---:"]), ""]
    if tuned:
        lines += ["## Tuned configurations", "", tuned, ""]
    lines += ["Each workload's curves and tables (the report of its re-runs): <workload>/summary.md and "
              "<workload>/curves_vs_time.png.", ""]
    return "\n".join(lines)
