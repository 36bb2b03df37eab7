"""Resuming a run: which checkpoint to continue from, whether its config allows it, and the state it holds.

`trainer.resume` (checked by `plan_resume` before anything is written):

    null (default)  a fresh run; but under submitit or a requeued SLURM job (SLURM_RESTART_COUNT > 0), continue from
                    the run folder's own checkpoint when it has one (a requeued job finds its folder again)
    true            continue from this run folder's checkpoint (e.g. hydra.run.dir=<folder> trainer.resume=true)
    false           never resume
    <folder>        continue the run in <folder>: its checkpoint and its first metric rows are copied into this run's
                    new folder, which then holds the whole curve; <folder> itself is left untouched

Writing into a folder that already holds results without resuming it is refused (exit 2, naming the folder). A
resume whose config differs in anything but the budget (BUDGET_KEYS) is refused, naming the keys.

What a checkpoint holds, and how a run is put back where it left off: `RunState.capture` / `restore`
(runner/state.py). When checkpoint.pt cannot be read, checkpoint.prev.pt is used with a WARNING that names the
unreadable file, why, and the steps that will be redone (runner/checkpoint.py, `load_latest`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from runner.checkpoint import CHECKPOINT, atomic_write_bytes, load_latest
from runner.distributed import requeued, world_size
from runner.run_dir import refuse_existing, resume_setting

BUDGET_KEYS = ("trainer.max_epochs", "trainer.max_steps", "trainer.checkpoint", "trainer.checkpoint_every",
               "trainer.checkpoint_every_minutes", "trainer.resume", "trainer.progress",
               "trainer.progress_every_seconds", "trainer.estimate_cost")  # the last three only show things
BUDGET_PREFIXES = ("logger.", "diagnostics.")  # diagnostics leave the trajectory unchanged (runner/diagnostics.py)


@dataclass
class Resume:
    folder: Path  # where the checkpoint lives
    checkpoint: Path
    state: dict[str, Any]

    @property
    def rows(self) -> int:
        """metrics.jsonl's row count when the checkpoint was written."""
        return int(self.state["metrics"]["rows"])

    @property
    def step(self) -> int:
        return int(self.state["progress"]["step"])


def plan_resume(cfg: DictConfig, out: Path) -> Resume | None:
    """The checkpoint this run continues from, or None for a fresh run. Raises ValueError (exit 2) for a folder that
    holds someone else's results, a missing checkpoint, or a config that differs in more than the budget."""
    setting = resume_setting(cfg.trainer.get("resume"))
    if isinstance(setting, str):
        folder = Path(hydra.utils.to_absolute_path(setting)).resolve()
        if folder != out:
            refuse_existing(out)
            return _load(folder, cfg, f"trainer.resume={setting}")
        setting = True
    if setting is True and _in_sweep() and load_latest(out) is None:
        refuse_existing(out)
        return None  # continuing a sweep: the jobs that never checkpointed start from scratch
    if setting is True:
        return _load(out, cfg, "trainer.resume=true")
    if setting is None and requeued() and load_latest(out) is not None:
        return _load(out, cfg, "the requeued job")
    if setting is None and requeued():
        return None  # a requeued job that never checkpointed starts over in its own folder
    refuse_existing(out)
    return None


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _load(folder: Path, cfg: DictConfig, why: str) -> Resume:
    if not folder.is_dir():
        raise ValueError(f"{why}: the folder {folder} does not exist.")
    found = load_latest(folder)
    if found is None:
        raise ValueError(
            f"{why}: {folder} holds no checkpoint ({CHECKPOINT}). trainer.resume=true continues the run in this run's "
            f"own folder (set it with hydra.run.dir=<folder>); to continue another run, pass its folder: "
            f"trainer.resume=/path/to/run."
        )
    path, state = found
    check_same_config(state["config"], OmegaConf.to_container(cfg, resolve=True), path)
    if len(state["rng"]) != world_size():
        raise ValueError(f"{why}: {path} was written by {len(state['rng'])} rank(s) but this run has {world_size()}; "
                         "resume with the same number of ranks.")
    return Resume(folder, path, state)


def check_same_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse a resume whose config differs in anything but BUDGET_KEYS / BUDGET_PREFIXES, naming every key."""
    old, new = _flatten(saved), _flatten(current)
    # A key the config gained after the checkpoint was written (e.g. objective.micro_batch_size), left at null, is the
    # old behaviour: it does not block the resume. Set to anything else, it is a change like any other.
    added_and_off = {key for key in set(new) - set(old) if new[key] is None}
    changed = [key for key in sorted((set(old) | set(new)) - added_and_off)
               if old.get(key, "<unset>") != new.get(key, "<unset>")
               and key not in BUDGET_KEYS and not key.startswith(BUDGET_PREFIXES)]
    if changed:
        details = ", ".join(f"{key} ({old.get(key, '<unset>')!r} in the checkpoint, {new.get(key, '<unset>')!r} now)"
                            for key in changed)
        raise ValueError(
            f"cannot resume from {path}: the config differs in {details}. A resumed run must have the same config "
            f"except for its budget ({', '.join(BUDGET_KEYS)}), logger.* and diagnostics.*; start a new run instead."
        )


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat or {prefix[:-1]: {}}
    if isinstance(node, tuple):
        node = list(node)
    return {prefix[:-1]: node}


def metrics_rows_to_keep(resume: Resume | None, out: Path) -> int | None:
    """None for a fresh metrics file; else the checkpoint's row count, after copying those rows from the resumed
    run's folder into `out` (when it resumes another folder)."""
    if resume is None:
        return None
    if resume.folder != out:
        source = resume.folder / "metrics.jsonl"
        lines = source.read_bytes().split(b"\n")[:-1] if source.exists() else []
        if len(lines) < resume.rows:
            raise ValueError(f"{source} holds {len(lines)} complete rows but {resume.checkpoint} recorded "
                             f"{resume.rows}: the metrics file does not belong to this checkpoint.")
        atomic_write_bytes(out / "metrics.jsonl", b"".join(line + b"\n" for line in lines[: resume.rows]))
    return resume.rows
