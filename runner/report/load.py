"""Finding run folders and reading what they hold (local files are the truth; W&B is not needed).

A run folder is what `python run.py` writes: config.yaml (the resolved config) with metrics.jsonl and/or
summary.json, and `.hydra/hydra.yaml` (Hydra's record, with the config-group choices such as `optimizer: hf`).
A sweep folder holds run folders (`<sweep>/<job>/`), possibly nested; both may be given in any mix.

Status of a run, from its summary.json:
    ok           finished its budget
    diverged     stopped on a non-finite loss
    interrupted  stopped by a signal (status `interrupted`, or `error` with KeyboardInterrupt / SystemExit), or
                 no summary.json at all: the process was killed (or is still running)
    error        raised an exception
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STATUSES = ("ok", "diverged", "interrupted", "error")
GROUPS = ("dataset", "model", "optimizer", "trainer", "logger", "experiment", "search", "workload")  # config groups
_SKIP_DIRS = {"wandb", ".submitit", ".hydra", "__pycache__", ".git"}
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ReportError(ValueError):
    """A problem with the folders the user gave (nothing to report, a missing folder, a bad option)."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # the resolved config.yaml
    choices: dict[str, str]  # Hydra's config-group choices (`optimizer: hf`); empty if .hydra/ is missing
    summary: dict[str, Any] | None  # summary.json, or None when the process never wrote it
    rows: list[dict[str, Any]]  # metrics.jsonl, one dict per optimiser step
    status: str  # one of STATUSES
    id: str = ""  # the folder relative to the common root of all runs in the report
    notes: list[str] = field(default_factory=list)  # what was odd about the files (skipped lines, ...)

    def get(self, key: str) -> Any:
        """A config value by dotted key; a config-group name (`optimizer`) gives the Hydra choice (`hf`), or, when
        the run has no `.hydra/` record, the conf/ file its config matches (`choice_for`)."""
        if key in GROUPS:
            if key in self.choices and self.choices[key] is not None:
                return self.choices[key]
            node = self.config.get(key)
            if isinstance(node, dict) and "_target_" in node:
                return choice_for(key, node)
        node: Any = self.config
        for part in key.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return _MISSING
        return node

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


def choice_for(group: str, node: dict[str, Any]) -> str:
    """The conf/<group>/<choice>.yaml a config node most likely came from (for runs without a .hydra/ record):
    among the files with the same `_target_`, the one agreeing with the node on the most keys (newton vs newton_cg:
    `solver`); without one, the `_target_` class name in lower case."""
    best, agreed = None, -1
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        try:
            candidate = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, OSError):
            continue
        if not isinstance(candidate, dict) or candidate.get("_target_") != node["_target_"]:
            continue
        score = sum(node.get(k) == v for k, v in candidate.items())
        if score > agreed:
            best, agreed = path.stem, score
    return best or str(node["_target_"]).rsplit(".", 1)[-1].lower()


class _Missing:
    def __repr__(self) -> str:
        return "—"


_MISSING = _Missing()


def is_missing(value: Any) -> bool:
    return value is _MISSING


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every run under `paths` (run folders or sweep folders, any mix), in a stable order, with `id`s set.

    Raises ReportError when a path does not exist or no run is found.
    """
    dirs: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if not path.is_dir():
            raise ReportError(f"{raw} is not a folder. Give run folders or sweep folders written by run.py.")
        dirs.extend(d for d in _run_dirs(path) if d not in dirs)
    if not dirs:
        shown = ", ".join(str(p) for p in paths)
        raise ReportError(
            f"no curvlab runs found under {shown}. A run folder holds config.yaml together with metrics.jsonl or "
            f"summary.json (what `python run.py` writes, e.g. outputs/<date>/<time>/); a sweep folder holds run "
            f"folders (outputs/multirun/<date_time>/<job>/). Point the report at such folders."
        )
    runs = [load_run(d) for d in dirs]
    root = Path(os.path.commonpath([str(d) for d in dirs]))
    for run in runs:
        rel = run.path.relative_to(root) if run.path != root else Path(run.path.name)
        run.id = str(rel) if str(rel) != "." else run.path.name
    return runs


def is_run_dir(path: Path) -> bool:
    has_results = (path / "metrics.jsonl").is_file() or (path / "summary.json").is_file()
    return (path / "config.yaml").is_file() and has_results


def _run_dirs(path: Path) -> list[Path]:
    """Run folders at or below `path` (a run folder is not searched further), sorted with numbers as numbers."""
    if is_run_dir(path):
        return [path]
    found: list[Path] = []
    for child in sorted(path.iterdir(), key=_natural):
        if child.is_dir() and child.name not in _SKIP_DIRS and not child.is_symlink():
            found.extend(_run_dirs(child))
    return found


def _natural(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def load_run(path: Path) -> Run:
    notes: list[str] = []
    config = _read_yaml(path / "config.yaml", notes) or {}
    record = path / ".hydra" / "hydra.yaml"
    hydra_record = _read_yaml(record, notes) if record.is_file() else None
    choices = ((hydra_record or {}).get("hydra", {}).get("runtime", {}) or {}).get("choices", {}) or {}
    summary = None
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError) as exc:
            notes.append(f"summary.json unreadable ({exc}); treated as missing")
    rows = read_rows(path / "metrics.jsonl", notes) if (path / "metrics.jsonl").is_file() else []
    run = Run(path, config, {str(k): v for k, v in choices.items()}, summary, rows, run_status(summary), notes=notes)
    for note in notes:
        print(f"curvlab report: warning: {path}: {note}", file=sys.stderr)
    return run


def read_rows(path: Path, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl. A line that is not a JSON object (a write cut short by a kill or a full disk) is
    skipped and noted, so every complete row is still reported."""
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            elif notes is not None:
                notes.append(f"metrics.jsonl line {number} is not a complete JSON row; skipped")
    return rows


def run_status(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "interrupted"
    status = summary.get("status")
    if status == "error" and str(summary.get("error", "")).startswith(("KeyboardInterrupt", "SystemExit")):
        return "interrupted"
    return status if status in STATUSES else "error"


def _read_yaml(path: Path, notes: list[str]) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError) as exc:
        notes.append(f"{path.name} unreadable ({type(exc).__name__})")
        return None
