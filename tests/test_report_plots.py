"""What the report's figures say (runner/report/plots.py): titles that name the problem and the grouping, labelled
axes, the batch loss smoothed with the raw series behind it, the wall-clock variants, and the race's performance
profile. Built on small hand-made runs; the smoothing is checked against a weighted mean written out here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import matplotlib
import pytest

from runner.report.load import Run
from runner.report.plots import SMOOTH_FRACTION, ema, plot_all, plot_curves, plot_profile, problem_title


def make_run(name: str, optimizer: str, steps: int, seed: int, classification: bool = True) -> Run:
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "epoch": step / 10, "samples_seen": 32 * step, "wall_time": 0.01 * step,
               "loss": float(2.0 / math.sqrt(step) * (1 + 0.5 * rng.standard_normal() ** 2)), "step_time": 0.01}
        if step % 50 == 0:
            row.update({"train/loss": 1.0 / step, "eval/loss": 1.2 / step})
            if classification:
                row["eval/accuracy"] = 1 - 1 / step
        rows.append(row)
    config = {"workload": {"name": "mnist_mlp800", "metric": "eval/accuracy", "target": 0.98}, "seed": seed}
    choices = {"dataset": "mnist", "model": "mlp_800", "optimizer": optimizer, "workload": "mnist_mlp800"}
    return Run(Path(name), config, choices, {"status": "ok"}, rows, "ok")


@pytest.fixture
def groups() -> dict[str, list[Run]]:
    return {"sgd": [make_run("a", "sgd", 500, 0), make_run("b", "sgd", 500, 1)],
            "adam": [make_run("c", "adam", 500, 2)]}


def test_titles_and_axis_labels_name_the_problem_grouping_quantities_and_units(groups):
    title = problem_title(groups, ["optimizer"])
    assert title == "workload mnist_mlp800 (mnist + mlp_800), runs grouped by optimizer"
    for x, xlabel in (("step", "optimiser steps"), ("time", "wall-clock (s, optimiser steps only)")):
        fig = plot_curves(groups, x, title)
        assert fig._suptitle.get_text() == title
        labels = [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
        assert [t.split("\n")[0] for t, _, _ in labels] == [
            "training loss per mini-batch", "training loss (mean between evaluations)", "test loss", "test accuracy"]
        assert all(xl == xlabel for _, xl, _ in labels)
        assert [yl for _, _, yl in labels] == ["cross-entropy (nats)"] * 3 + ["accuracy (fraction correct)"]
    regression = {"sgd": [make_run("r", "sgd", 100, 0, classification=False)]}
    assert plot_curves(regression, "step").axes[0].get_ylabel() == "squared error"


def test_the_batch_loss_is_an_ema_drawn_over_its_faint_raw_series(groups):
    fig = plot_curves(groups, "step")
    span = round(SMOOTH_FRACTION * 500)
    assert fig.axes[0].get_title() == f"training loss per mini-batch\n(EMA over ~{span} steps; raw faint)"
    lines = fig.axes[0].lines
    raw_sgd, smooth_sgd = lines[0], lines[1]
    assert raw_sgd.get_alpha() == 0.25 and smooth_sgd.get_alpha() is None
    losses = np.array([[row["loss"] for row in run.rows] for run in groups["sgd"]])
    np.testing.assert_allclose(raw_sgd.get_ydata(), losses.mean(axis=0))
    # The debiased EMA is the mean of the past values weighted (1 - 1/span)^age, written out directly:
    decay = 1 - 1 / span
    expected = []
    for series in losses:
        weights = decay ** np.arange(len(series))[::-1]
        expected.append([np.dot(weights[-t:], series[:t]) / weights[-t:].sum() for t in range(1, len(series) + 1)])
    np.testing.assert_allclose(smooth_sgd.get_ydata(), np.mean(expected, axis=0), rtol=1e-10)
    np.testing.assert_allclose(ema(losses[0], span), expected[0], rtol=1e-10)
    short = {"sgd": [make_run("s", "sgd", 60, 0)]}  # under 100 steps: raw, one line, plain title
    fig = plot_curves(short, "step")
    assert fig.axes[0].get_title() == "training loss per mini-batch" and len(fig.axes[0].lines) == 1


def test_every_curve_plot_has_a_wall_clock_variant(groups, tmp_path):
    files = {p.name for p in plot_all(groups, tmp_path, ["step", "time"], ("png",), by=["optimizer"])}
    assert files == {"curves_vs_step.png", "curves_vs_time.png", "diagnostics_vs_step.png",
                     "diagnostics_vs_time.png"}


def test_the_profile_plot_draws_each_methods_step_function():
    ratios = {"w1": {"a": 1.0, "b": 2.0}, "w2": {"a": 3.0, "b": 1.0}, "w3": {"a": math.inf, "b": math.inf}}
    fig = plot_profile(ratios, {"a": 0.444, "b": 0.555}, ["a", "b"], title="profile", xlabel="τ")
    (ax,) = fig.axes
    a, b = ax.lines
    assert list(a.get_xdata()) == [1.0, 3.0, 4.0] and list(a.get_ydata()) == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert list(b.get_xdata()) == [1.0, 2.0, 4.0] and list(b.get_ydata()) == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (score 0.444)", "b (score 0.555)"]
    assert ax.get_xlabel() == "τ" and "fraction of workloads" in ax.get_ylabel()


def test_the_profile_plot_tells_a_whole_race_of_methods_apart():
    """The default race has 12 methods, more than the 10 colours: every curve differs in colour or line style."""
    methods = [f"m{i}" for i in range(12)]
    ratios = {"w": {m: 1.0 + i / 4 for i, m in enumerate(methods)}}
    fig = plot_profile(ratios, {m: 0.5 for m in methods}, methods, title="profile", xlabel="τ")
    (ax,) = fig.axes
    styles = [(tuple(matplotlib.colors.to_rgba(line.get_color())), line.get_linestyle()) for line in ax.lines]
    assert len(styles) == 12 and len(set(styles)) == 12
