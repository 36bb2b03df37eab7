"""The report's figures (matplotlib, Agg backend; each saved as PNG and PDF, named after what it shows).

    curves_vs_<x>.png       batch loss, train loss, test loss and test accuracy against x (step, epoch, samples,
                            time): one colour per group, the mean over its ok runs with a min-max band; runs that
                            diverged or were interrupted are drawn alone, dashed, ending in a cross. The batch loss
                            (one value per step) is smoothed by an exponential moving average over about 2 % of the
                            steps (debiased as in Adam, so the first steps are not pulled to zero), with the raw
                            series drawn faint behind it; series shorter than 100 steps are drawn raw
    diagnostics_vs_<x>.png  one panel per per-step statistic the methods logged (CG iterations, damping, reduction
                            ratio, CurveBall rho/beta, line-search rate, products per step, step time, ...), against
                            steps and, with the time axis, against wall-clock
    cg_stop_reasons.png     how often each CG stopping rule ended the solve, per group (methods that log cg/stop)
    profile_<kind>.png      a performance profile (the race's verdict, runner/report/verdict.py)

Every figure is titled with the problem its runs trained (the workload, else dataset + model) and the grouping, and
every axis names its quantity and unit.
"""

from __future__ import annotations

import math
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and none is opened
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from runner.report.aggregate import band, curve  # noqa: E402
from runner.report.load import Run, is_missing  # noqa: E402

X_AXES = {  # --x name -> (metrics.jsonl column, axis label)
    "step": ("step", "optimiser steps"),
    "epoch": ("epoch", "epochs"),
    "samples": ("samples_seen", "training samples"),
    "time": ("wall_time", "wall-clock (s, optimiser steps only)"),
}
CURVES = [  # (column, panel title, y-axis label; LOSS is replaced by the loss's name and unit)
    ("loss", "training loss per mini-batch", "LOSS"),
    ("train/loss", "training loss (mean between evaluations)", "LOSS"),
    ("eval/loss", "test loss", "LOSS"),
    ("eval/accuracy", "test accuracy", "accuracy (fraction correct)"),
]
SMOOTH_FRACTION = 0.02  # the batch loss's EMA spans about this fraction of the steps ...
SMOOTH_MIN_POINTS = 100  # ... on series at least this long (shorter ones are drawn raw)
DIAGNOSTICS = [  # (column, title, log scale)
    ("cg/iters", "CG iterations", False), ("damping", "damping λ", True),
    ("reduction_ratio", "reduction ratio ρ", False),
    ("rho", "CurveBall ρ (momentum)", False), ("beta", "CurveBall β (step)", True),
    ("line_search/rate", "line-search rate", True), ("step_size", "step size", True),
    ("lbfgs/evals", "L-BFGS function evaluations", False), ("loss_evals", "loss evaluations", False),
    ("curv/ggn_products", "GGN products / step", False), ("curv/hvp_products", "Hessian products / step", False),
    ("curv/jvp_products", "J v products / step", False), ("curv/vjp_products", "Jᵀ w products / step", False),
    ("step_time", "step time (s)", True),
]
DIAGNOSTIC_UNITS = {  # y-axis labels with units, where the panel title is not one already
    "cg/iters": "iterations per step", "damping": "λ", "reduction_ratio": "ρ (actual / predicted decrease)",
    "rho": "ρ", "beta": "β", "line_search/rate": "accepted step fraction", "step_size": "step size",
    "lbfgs/evals": "evaluations per step", "loss_evals": "evaluations per step",
    "curv/ggn_products": "products per step", "curv/hvp_products": "products per step",
    "curv/jvp_products": "products per step", "curv/vjp_products": "products per step", "step_time": "seconds",
}
COLORS = plt.get_cmap("tab10").colors
LINESTYLES = ("-", "--", ":")  # with COLORS: 30 distinguishable series


FORMATS = ("png", "pdf")


def plot_all(groups: dict[str, list[Run]], out: Path, xs: list[str], formats: tuple[str, ...] = FORMATS,
             by: list[str] | None = None) -> list[Path]:
    files: list[Path] = []
    if not formats:
        return files
    title = problem_title(groups, by or ["optimizer"])
    for x in xs:
        files += _save(plot_curves(groups, x, title), out, f"curves_vs_{x}", formats)
    for x in [x for x in ("step", "time") if x == "step" or x in xs]:
        files += _save(plot_diagnostics(groups, x, title), out, f"diagnostics_vs_{x}", formats)
    files += _save(plot_cg_stops(groups, title, by), out, "cg_stop_reasons", formats)
    return files


def problem_title(groups: dict[str, list[Run]], by: list[str]) -> str:
    """`workload mnist_mlp800 (mnist + mlp_800), runs grouped by optimizer`: what the runs trained (the workload,
    else dataset + model; "several ..." when they differ) and what the colours separate."""
    runs = [run for group in groups.values() for run in group]

    def one(key: str) -> str | None:
        found = {str(v) for v in (_choice(run, key) for run in runs) if v is not None}
        return found.pop() if len(found) == 1 else ("several" if found else None)

    workload, dataset, model = one("workload"), one("dataset"), one("model")
    problem = f"{dataset or '?'} + {model or '?'}"
    if workload and workload != "several":
        problem = f"workload {workload} ({problem})"
    elif workload == "several":
        problem = "several workloads"
    return f"{problem}, runs grouped by {', '.join(by)}"


def _choice(run: Run, key: str):
    if key == "workload":
        node = run.config.get("workload")
        return node.get("name") if isinstance(node, dict) else None
    value = run.get(key)
    return None if value is None or is_missing(value) else value


def loss_label(groups: dict[str, list[Run]]) -> str:
    """The loss's name and unit: cross-entropy for classifiers (the runs that log a test accuracy), else the
    squared error of curvlab's regression datasets (MSE or SSE, data/base.py)."""
    return "cross-entropy (nats)" if _logged(groups, "eval/accuracy") else "squared error"


def plot_curves(groups: dict[str, list[Run]], x: str, title: str = ""):
    column, xlabel = X_AXES[x]
    panels = [(key, name, ylabel) for key, name, ylabel in CURVES if _logged(groups, key)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.3), squeeze=False)
    for ax, (key, name, ylabel) in zip(axes[0], panels):
        span = smoothing_span(groups, key) if key == "loss" else 1
        for color, (label, runs) in zip(_colors(), groups.items()):
            _draw(ax, runs, key, column, color, label, span=span)
        if span > 1:
            name = f"{name}\n(EMA over ~{span} steps; raw faint)"
        ax.set(title=name, xlabel=xlabel, ylabel=loss_label(groups) if ylabel == "LOSS" else ylabel)
        if "loss" in key and _all_positive(groups, key):
            _log_y(ax)
        ax.grid(alpha=0.3)
    _suptitle(fig, title)
    _legend(fig, axes[0], groups)
    return fig


def plot_diagnostics(groups: dict[str, list[Run]], x: str = "step", title: str = ""):
    panels = [d for d in DIAGNOSTICS if _logged(groups, d[0])]
    if not panels:
        return None
    column, xlabel = X_AXES[x]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.8 * rows + 0.3), squeeze=False)
    for ax, (key, name, log) in zip(axes.flat, panels):
        for color, (label, runs) in zip(_colors(), groups.items()):
            _draw(ax, runs, key, column, color, label)
        ax.set(title=name, xlabel=xlabel, ylabel=DIAGNOSTIC_UNITS.get(key, name))
        if log and _all_positive(groups, key):
            _log_y(ax)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    _suptitle(fig, f"per-step statistics: {title}" if title else "")
    _legend(fig, axes.flat, groups)
    return fig


def plot_profile(ratios: dict[str, dict[str, float]], scores: dict[str, float], methods: list[str], title: str,
                 xlabel: str, tau_max: float = 4.0):
    """Performance profiles rho_m(tau) (runner/report/profiles.py), one step curve per method, scores in the legend.
    ratios: workload -> method -> time / the fastest method's time (inf: not reached)."""
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    for i, method in enumerate(methods):  # past ten methods the colours repeat: the line style tells them apart
        values = [per[method] for per in ratios.values()]
        grid = sorted({1.0, tau_max, *(v for v in values if 1.0 <= v <= tau_max)})
        heights = [sum(v <= tau for v in values) / max(len(values), 1) for tau in grid]
        ax.step(grid, heights, where="post", color=COLORS[i % len(COLORS)], ls=LINESTYLES[i // len(COLORS) % 3],
                lw=1.6, label=f"{method} (score {scores[method]:.3f})")
    ax.set(xlim=(1.0, tau_max), ylim=(-0.03, 1.03), xlabel=xlabel,
           ylabel="fraction of workloads with\ntime ≤ τ × the fastest method's")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # outside: never hides a curve
    ax.set_title(textwrap.fill(title, 70), fontsize=10)
    fig.tight_layout()
    return fig


def plot_cg_stops(groups: dict[str, list[Run]], title: str = "", by: list[str] | None = None):
    counts = {label: Counter(row["cg/stop"] for run in runs for row in run.rows if isinstance(row.get("cg/stop"), str))
              for label, runs in groups.items()}
    counts = {label: c for label, c in counts.items() if c}
    if not counts:
        return None
    reasons = sorted(set().union(*counts.values()))
    fig, ax = plt.subplots(figsize=(2.4 + 0.9 * len(counts), 3.0))
    bottoms = [0.0] * len(counts)
    for i, reason in enumerate(reasons):
        shares = [c[reason] / sum(c.values()) for c in counts.values()]
        ax.bar(list(counts), shares, width=0.6, bottom=bottoms, label=reason, color=COLORS[i % len(COLORS)])
        bottoms = [b + s for b, s in zip(bottoms, shares)]
    ax.set_title(textwrap.fill(f"CG stop reasons: {title}" if title else "CG stop reasons", 45), fontsize=9)
    ax.set(ylabel="share of CG solves", ylim=(0, 1), xlabel=", ".join(by or ["group"]))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def smoothing_span(groups: dict[str, list[Run]], key: str) -> int:
    """The EMA's span in points for `key`: SMOOTH_FRACTION of the longest run's series, 1 (no smoothing) for
    series shorter than SMOOTH_MIN_POINTS."""
    longest = max((sum(isinstance(row.get(key), (int, float)) for row in run.rows)
                   for runs in groups.values() for run in runs), default=0)
    return max(1, round(SMOOTH_FRACTION * longest)) if longest >= SMOOTH_MIN_POINTS else 1


def ema(values: np.ndarray, span: int) -> np.ndarray:
    """Debiased exponential moving average, weight 1 - 1/span on the past (s_t = b s_{t-1} + (1 - b) y_t, divided by
    1 - b^t as Adam debiases its moments, so the first values are not pulled towards 0)."""
    if span <= 1 or not len(values):
        return values
    decay = 1.0 - 1.0 / span
    out = np.empty(len(values))
    state = 0.0
    for i, value in enumerate(values):
        state = decay * state + (1.0 - decay) * value
        out[i] = state / (1.0 - decay ** (i + 1))
    return out


def _draw(ax, runs: list[Run], key: str, x: str, color, label: str, span: int = 1) -> None:
    """The mean and min-max band over the ok runs; every other run alone, dashed, with a cross at its end. With
    span > 1 each run's series is smoothed (`ema`) and the raw mean is drawn faint behind."""
    ok = [xy for xy in (curve(run, key, x) for run in runs if run.status == "ok") if len(xy[0])]
    if span > 1:
        raw_grid, raw_mean, _, _ = band(ok)
        if len(raw_grid):
            ax.plot(raw_grid, raw_mean, color=color, lw=0.5, alpha=0.25)
        ok = [(xs, ema(ys, span)) for xs, ys in ok]
    grid, mean, lo, hi = band(ok)
    if len(grid):
        marker = "o" if len(grid) <= 30 else None
        ax.plot(grid, mean, color=color, lw=1.4, marker=marker, ms=3, label=f"{label} (n={len(ok)})")
        if len(ok) > 1:
            ax.fill_between(grid, lo, hi, color=color, alpha=0.2, lw=0)
    else:  # no x range common to all runs (wall-clock after one slow first step): no mean, each run alone
        for i, (xs, ys) in enumerate(ok):
            ax.plot(xs, ys, color=color, lw=0.9, label=f"{label} (n={len(ok)}, each run alone)" if i == 0 else None)
    for run in runs:
        if run.status == "ok":
            continue
        xs, ys = curve(run, key, x)
        if span > 1 and len(xs):
            ax.plot(xs, ys, color=color, lw=0.5, alpha=0.25)
            ys = ema(ys, span)
        if len(xs):
            ax.plot(xs, ys, color=color, lw=0.9, ls="--", label=f"{label} ({run.status})")
            ax.plot(xs[-1:], ys[-1:], color=color, marker="x", ms=7)


def _logged(groups: dict[str, list[Run]], key: str) -> bool:
    return any(isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)
               for runs in groups.values() for run in runs for row in run.rows)


def _all_positive(groups: dict[str, list[Run]], key: str) -> bool:
    values = [row[key] for runs in groups.values() for run in runs for row in run.rows
              if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
    return bool(values) and min(values) > 0


def _log_y(ax) -> None:
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    if math.floor(math.log10(high)) - math.ceil(math.log10(low)) >= 1:  # two decades or more in view
        ax.yaxis.set_minor_formatter(NullFormatter())  # then label the decades only


def _colors():
    while True:
        yield from COLORS


def _legend(fig, axes, groups: dict[str, list[Run]]) -> None:
    """One legend for the figure, below the panels, in group order, without repeated labels."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    order = list(groups)
    labels = sorted(seen, key=lambda label: next((i for i, g in enumerate(order) if label.startswith(f"{g} (")), 0))
    if not labels:
        fig.tight_layout()
        return
    ncol = min(4, len(labels))
    fig.legend([seen[label] for label in labels], labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    legend_inches = 0.05 + 0.2 * math.ceil(len(labels) / ncol)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))


def _suptitle(fig, title: str) -> None:
    if title:
        fig.suptitle(textwrap.fill(title, 110), fontsize=10)


def save_figure(fig, out: Path, name: str, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """`fig` (None: nothing to show) as out/name.<format> for each format."""
    return _save(fig, out, name, formats)


def _save(fig, out: Path, name: str, formats: tuple[str, ...]) -> list[Path]:
    """`fig` (None: nothing to show) as out/name.<format> for each format."""
    if fig is None:
        return []
    paths = [out / f"{name}.{fmt}" for fmt in formats]
    for path in paths:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths
