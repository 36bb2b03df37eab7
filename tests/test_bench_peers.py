"""scripts/bench_peers.py (runner/bench/peers.py) runs end to end on a tiny network: it prints one ratio row per
measurement with curvlab's column filled, and a peer that cannot be imported is reported as skipped, not as a crash.
No timing is asserted (the numbers live in docs/benchmarks/peers.md)."""
from __future__ import annotations

import re

import pytest

from models.mlp import build_mlp
from runner.bench import peers

ROWS = ["SGD step", "CurveBall step", "HF step, 10 CG iterations, curvature_fraction 0.25",
        "HF step, 10 CG iterations, curvature_fraction 1", "CG solve, 10 iterations (whole batch)",
        "K-FAC step (empirical Fisher; mean of 10)"]


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(peers.MODELS, "tiny", ("tiny MLP 16-8-10", lambda: build_mlp((1, 4, 4), 10, hidden=[8]),
                                               (1, 4, 4), 32))
    return "tiny"


def _rows(out: str) -> dict[str, list[str]]:
    """The table's rows by measurement name: the cells after the name."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ROWS:
            rows[cells[0]] = cells[1:]
    return rows


def test_ratio_rows_and_absent_peers_skipped(tiny, monkeypatch, capsys):
    monkeypatch.setattr(peers, "import_peer", lambda name: None)  # whatever this machine has on its path
    peers.main(["--models", tiny, "--repeats", "1"])
    out = capsys.readouterr().out
    rows = _rows(out)
    assert list(rows) == ROWS
    assert rows["SGD step"][1] == "1.00"
    for name, cells in rows.items():
        assert float(cells[0]) > 0 and re.fullmatch(r"\d+\.\d\d", cells[1]), (name, cells)
        assert cells[2] == cells[3] == cells[4] == "-", (name, cells)  # no peer: no peer columns
    for repo in ("jotaf98/pytorch-curveball", "ltatzel/PyTorchHessianFree", "gpauloski/kfac-pytorch"):
        assert f"skipped: not importable, set PYTHONPATH to a checkout of {repo}" in out
    assert "CG iterations [10]" in out  # HF took exactly the 10 iterations the row names


def test_no_peers_prints_no_skip_lines(tiny, capsys):
    peers.main(["--models", tiny, "--repeats", "1", "--no-peers"])
    out = capsys.readouterr().out
    assert list(_rows(out)) == ROWS and "skipped" not in out


def test_floors_table(tiny, capsys):
    peers.main(["--models", tiny, "--repeats", "1", "--floors"])
    out = capsys.readouterr().out
    names = [line.strip("| ").split(" |")[0].strip() for line in out.splitlines() if line.startswith("| ")]
    assert names[0] == "component" and "SGD step" in names and "CurveBall: J z, J^T u, J dz in sequence" in names
    assert "K-FAC: eigendecompositions, all layers" in names and "skipped" not in out
