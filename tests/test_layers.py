"""The import layers: validation imports no torch; data/ and models/ never import the optimiser library or the runner;
optimizers/ (the library) never imports the runner, data/ or models/."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_packages(folder: str) -> dict[str, set[str]]:
    """file -> the top-level packages it imports (absolute imports only; the repository uses no relative ones)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        tops = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                tops |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                tops.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = tops
    return found


@pytest.mark.parametrize("folder, forbidden", [
    ("data", {"optimizers", "runner", "models"}),
    ("models", {"optimizers", "runner", "data"}),
    ("optimizers", {"runner", "data", "models", "hydra", "omegaconf", "wandb"}),
    ("validation", {"torch", "optimizers", "runner", "data", "models", "numpy"}),
])
def test_layer_imports_nothing_above_it(folder, forbidden):
    offenders = {f: sorted(tops & forbidden) for f, tops in imported_packages(folder).items() if tops & forbidden}
    assert not offenders, f"{folder}/ imports a layer it must not: {offenders}"


def test_validation_loads_without_torch():
    code = "import sys, validation.checks; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
