"""What the launching command says about a sweep, and the folder checks that run before Hydra writes anything.

`SweepReport` is a Hydra callback (conf/config.yaml, `hydra.callbacks.sweep_report`), run in the launching process:

* `on_run_start` / `on_multirun_start`: refuse a run or sweep folder that already holds results this run does not
  resume (exit 2), before Hydra writes `.hydra/` into it;
* `on_multirun_start` also records the sweep folder, so that run.py can call `report()` when the sweep ends, with
  any launcher (basic, submitit_local, slurm): it reads every job's summary.json and prints how many jobs ended ok /
  diverged / interrupted / failed, and returns the exit code of the worst one.

Continuing a sweep (`python run.py -m ... trainer.resume=true`, the same command again, e.g. after an interruption;
runner/race.py relies on it): a job whose folder holds its finished run (`finished_job`: summary.json ok, diverged
or error, and the same config) is not run again, and returns the objective recorded in its files, so a seeded optuna
sweeper proposes the same trials as the first time; an interrupted job resumes from its checkpoint
(runner/resume.py); the jobs never started run. A stop signal stops an in-process sweep (the basic launcher): the job
that got it checkpoints and the jobs after it are not started (`SweepStopped`), rather than starting the next one.

Imports nothing heavy, so config errors are still reported without loading torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runner.errors import STATUS_CODES
from runner.run_dir import check_folder

# Exit codes from the least to the most severe (the sweep exits with the worst of its jobs'): ok, diverged,
# interrupted (resumable), a second Ctrl-C, a user error, a full disk, a bug.
SEVERITY = (0, 3, 4, 130, 2, 5, 1)
started: dict[str, Path] = {}  # "sweep" -> the sweep folder of the multirun this process launched


class SweepStopped(BaseException):
    """Raised by run.py's task function when a job of an in-process sweep was interrupted by a stop signal: the
    launcher starts no further job (run.py then reports the sweep and exits 4). A BaseException, so that Hydra's
    job runner does not record it as the job's failure and go on."""


class FolderRefused(BaseException):
    """Raised from a callback to stop Hydra before it writes into a folder holding results (run.py: exit 2). A
    BaseException, because Hydra turns a callback's ordinary exceptions into warnings."""


class SweepReport(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(Path(str(config.hydra.run.dir)).absolute(), config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir)).absolute()
        for job in job_folders(sweep):
            _check(job, config)
        started["sweep"] = sweep


def _check(folder: Path, config: DictConfig) -> None:
    try:
        check_folder(folder, OmegaConf.select(config, "trainer.resume"))
    except ValueError as exc:
        raise FolderRefused(str(exc)) from None


def job_folders(sweep: Path) -> list[Path]:
    """The job folders of a sweep: those Hydra wrote a `.hydra/` into, or that hold a summary.json."""
    if not sweep.is_dir():
        return []
    found = {p.parent.parent for p in sweep.rglob(".hydra/overrides.yaml")}
    found |= {p.parent for p in sweep.rglob("summary.json")}
    return sorted((f for f in found if ".submitit" not in f.parts and f != sweep), key=_job_order)


def report(sweep: Path) -> int:
    """Print the sweep's outcome counts (and one line per failed or interrupted job); return the worst exit code."""
    outcomes = [(job, _outcome(job)) for job in job_folders(sweep)]
    counts = {"ok": 0, "diverged": 0, "interrupted": 0, "failed": 0}
    worst = 0
    for job, (status, code, error) in outcomes:
        counts[status if status in counts else "failed"] += 1
        worst = max(worst, code, key=SEVERITY.index)
        if status not in ("ok", "diverged"):
            print(f"curvlab: job {job.relative_to(sweep)} {status} (exit code {code}): {error}", file=sys.stderr)
    summary = ", ".join(f"{n} {name}" for name, n in counts.items())
    print(f"curvlab: sweep of {len(outcomes)} jobs: {summary}")
    if not outcomes:
        worst = 1
        print(f"curvlab: error: no job of the sweep wrote its folder under {sweep}.", file=sys.stderr)
    return worst


def _outcome(job: Path) -> tuple[str, int, str]:
    """(status, exit code, first line of the error) from a job's summary.json."""
    try:
        summary = json.loads((job / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "failed", 1, "no readable summary.json: the job did not start, was killed, or its node failed"
    status = summary.get("status", "error")
    code = summary.get("exit_code")
    if code not in SEVERITY:
        code = STATUS_CODES.get(status, 1)
    error = str(summary.get("error") or summary.get("interrupted_by") or "").strip().splitlines()
    return ("failed" if status == "error" else status), code, (error[0][:300] if error else "")


def _job_order(folder: Path) -> tuple[int, str]:
    return (int(folder.name), "") if folder.name.isdigit() else (1 << 30, str(folder))


FINAL = ("ok", "diverged", "error")  # statuses of a finished run (interrupted or killed runs are continued instead)
_RUN_TIME_KEYS = ("data_root", "dataset.root", "trainer.resume", "trainer.progress")  # do not change the results


def in_process_sweep() -> bool:
    """Whether this job belongs to a multirun whose launcher runs the jobs in this process (the basic launcher)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.MULTIRUN and str(hydra_cfg.launcher.get("_target_", "")).endswith(
        "BasicLauncher")


def finished_job(cfg: DictConfig, out: Path) -> dict[str, Any] | None:
    """The summary.json of this job's finished run in `out` when the sweep is being continued (a multirun with
    trainer.resume=true) and `out` holds a run with a final status whose config.yaml equals this job's config (apart
    from where the data is and the progress bar); None otherwise: the job runs (or resumes) as usual."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from runner.run_dir import resume_setting

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    if resume_setting(OmegaConf.select(cfg, "trainer.resume")) is not True:
        return None
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        saved = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"), resolve=False)
    except (OSError, ValueError):
        return None
    if summary.get("status") not in FINAL or summary.get("exit_code") == 5:  # a full disk is not a result
        return None
    current = OmegaConf.to_container(cfg, resolve=True)
    return summary if _comparable(saved) == _comparable(current) else None


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = list(node) if isinstance(node, tuple) else node

    walk(config, "")
    return {k: v for k, v in flat.items() if k not in _RUN_TIME_KEYS and not k.startswith("logger.")}
