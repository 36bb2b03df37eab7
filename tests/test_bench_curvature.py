"""scripts/bench_curvature.py (runner/bench/curvature.py) runs end to end on a tiny network: every table prints its
rows with a time and the ratio columns, the standard rows and the execution rows (compile / bf16 / channels_last
against eager float32). No timing is asserted (the numbers live in docs/benchmarks/curvature.md)."""
from __future__ import annotations

import re

import pytest

from models.mlp import build_mlp
from runner.bench import curvature


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(curvature.SETUPS, "tiny", ("tiny MLP 16-8-10", lambda: build_mlp((1, 4, 4), 10, hidden=[8]),
                                                   (1, 4, 4), 32))
    return "tiny"


def _timed_rows(out: str) -> dict[str, list[str]]:
    """Table rows whose second cell is a number (ms), by their name."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 1 and re.fullmatch(r"[0-9.]+", cells[1]):
            rows[cells[0]] = cells[1:]
    return rows


def test_the_standard_rows_print_on_a_tiny_model(tiny, capsys):
    curvature.main(["--models", tiny, "--repeats", "1", "--no-backends", "--threads", "1"])
    rows = _timed_rows(capsys.readouterr().out)
    for name in ("gradient (forward + backward)", "SGD step", "GGN-vector product", "one CG iteration", "HF step",
                 "CurveBall step", "K-FAC step"):
        assert any(row.startswith(name) for row in rows), (name, list(rows))


@pytest.mark.slow
def test_the_execution_rows_print_on_a_tiny_model(tiny, capsys):
    curvature.main(["--models", tiny, "--repeats", "1", "--rows", "execution", "--threads", "1"])
    out = capsys.readouterr().out
    assert "bf16" in out and _timed_rows(out)
