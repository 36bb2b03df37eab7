"""The report's figures (matplotlib, Agg backend; each saved as PNG and PDF, named after what it shows).

    curves_vs_<x>.png       batch loss, train loss, test loss and test accuracy against x (step, epoch, samples,
                            time): one colour per group, the mean over its ok runs with a min-max band; runs that
                            diverged or were interrupted are drawn alone, dashed, ending in a cross
    diagnostics_vs_step.png one panel per per-step statistic the methods logged (CG iterations, damping, reduction
                            ratio, CurveBall rho/beta, line-search rate, products per step, step time, ...)
    cg_stop_reasons.png     how often each CG stopping rule ended the solve, per group (methods that log cg/stop)
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and none is opened
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from runner.report.aggregate import band, curve  # noqa: E402
from runner.report.load import Run  # noqa: E402

X_AXES = {  # --x name -> (metrics.jsonl column, axis label)
    "step": ("step", "optimiser steps"),
    "epoch": ("epoch", "epochs"),
    "samples": ("samples_seen", "training samples"),
    "time": ("wall_time", "wall-clock (s, optimiser steps only)"),
}
CURVES = [("loss", "batch loss (train)"), ("train/loss", "train loss"), ("eval/loss", "test loss"),
          ("eval/accuracy", "test accuracy")]
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
COLORS = plt.get_cmap("tab10").colors


FORMATS = ("png", "pdf")


def plot_all(groups: dict[str, list[Run]], out: Path, xs: list[str], formats: tuple[str, ...] = FORMATS) -> list[Path]:
    files: list[Path] = []
    if not formats:
        return files
    for x in xs:
        files += _save(plot_curves(groups, x), out, f"curves_vs_{x}", formats)
    files += _save(plot_diagnostics(groups), out, "diagnostics_vs_step", formats)
    files += _save(plot_cg_stops(groups), out, "cg_stop_reasons", formats)
    return files


def plot_curves(groups: dict[str, list[Run]], x: str):
    column, xlabel = X_AXES[x]
    panels = [(key, title) for key, title in CURVES if _logged(groups, key)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for color, (label, runs) in zip(_colors(), groups.items()):
            _draw(ax, runs, key, column, color, label)
        ax.set(title=title, xlabel=xlabel)
        if "loss" in key and _all_positive(groups, key):
            _log_y(ax)
        ax.grid(alpha=0.3)
    _legend(fig, axes[0], groups)
    return fig


def plot_diagnostics(groups: dict[str, list[Run]]):
    panels = [d for d in DIAGNOSTICS if _logged(groups, d[0])]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.8 * rows), squeeze=False)
    for ax, (key, title, log) in zip(axes.flat, panels):
        for color, (label, runs) in zip(_colors(), groups.items()):
            _draw(ax, runs, key, "step", color, label)
        ax.set(title=title, xlabel="optimiser steps")
        if log and _all_positive(groups, key):
            _log_y(ax)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    _legend(fig, axes.flat, groups)
    return fig


def plot_cg_stops(groups: dict[str, list[Run]]):
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
    ax.set(title="CG stop reasons", ylabel="share of steps", ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def _draw(ax, runs: list[Run], key: str, x: str, color, label: str) -> None:
    """The mean and min-max band over the ok runs; every other run alone, dashed, with a cross at its end."""
    ok = [xy for xy in (curve(run, key, x) for run in runs if run.status == "ok") if len(xy[0])]
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


def _save(fig, out: Path, name: str, formats: tuple[str, ...]) -> list[Path]:
    """`fig` (None: nothing to show) as out/name.<format> for each format."""
    if fig is None:
        return []
    paths = [out / f"{name}.{fmt}" for fmt in formats]
    for path in paths:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths
