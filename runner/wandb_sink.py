"""Weights & Biases as an optional second metric sink (`logger=wandb`).

W&B must never cost a run: any exception it raises (in init, log or finish) is reported once as a warning, the sink
switches itself off, and training continues with the local files intact.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


class WandbSink:
    """`resume_from` is the W&B run of the checkpoint a run resumes (`info` as stored in it). An online run continues
    that run (same id, resume="allow"; W&B drops rows whose step it has already seen, wandb#4482). An offline run
    cannot be resumed (wandb#2423): a new run is started in the same group, with `resumed_from` in its config."""

    def __init__(self, logger_cfg: DictConfig, output_dir: Path, config: dict[str, Any],
                 resume_from: dict[str, Any] | None = None) -> None:
        self.run: Any = None
        self.info: dict[str, Any] | None = None  # where to find the run in W&B; goes into summary.json
        group, name = _sweep_group_and_name()
        continued = _continue(logger_cfg.mode, resume_from)
        if resume_from:
            group = resume_from.get("group") or group
            config = {**config, "resumed_from": resume_from.get("id")}
        try:
            import wandb

            self.run = wandb.init(
                mode=logger_cfg.mode,
                project=logger_cfg.project,
                entity=logger_cfg.entity,
                group=logger_cfg.group or group,
                name=logger_cfg.name or name,
                tags=list(logger_cfg.tags),
                dir=str(output_dir),
                config=config,
                reinit="create_new",  # one W&B run per job, also when a multirun calls train() in one process
                **continued,
            )
            self.info = {"id": self.run.id, "name": self.run.name, "group": self.run.group or None,
                         "project": self.run.project, "mode": logger_cfg.mode, "dir": self.run.dir}
        except Exception as exc:  # noqa: BLE001 -- whatever W&B raises, training goes on
            self._disable("init", exc)
        if resume_from and not continued and self.run is not None:
            print(f"curvlab: note: W&B {logger_cfg.mode} runs cannot be resumed (wandb#2423): this run logs to a new "
                  f"W&B run {self.run.id} in group {self.run.group or 'none'}, continuing {resume_from.get('id')}.",
                  file=sys.stderr)

    def log(self, row: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.log(row, step=row["step"])
        except Exception as exc:  # noqa: BLE001
            self._disable("log", exc)

    def close(self, failed: bool = False) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as exc:  # noqa: BLE001
            self._disable("finish", exc)
        self.run = None

    def _disable(self, where: str, exc: Exception) -> None:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print(
            f"curvlab: warning: W&B logging is off for the rest of this run: wandb {where} failed with "
            f"{type(exc).__name__}: {first_line} (local metrics are unaffected).",
            file=sys.stderr,
        )
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 -- already reported once
                pass


def _continue(mode: str, resume_from: dict[str, Any] | None) -> dict[str, Any]:
    """wandb.init arguments that continue the stored run: only online runs can be resumed."""
    if resume_from and resume_from.get("id") and mode == "online" and resume_from.get("mode") == "online":
        return {"id": resume_from["id"], "resume": "allow"}
    return {}


def _sweep_group_and_name() -> tuple[str | None, str | None]:
    """Defaults from Hydra: in a multirun the sweep folder's name groups the jobs; the job's overrides name it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    name = hydra_cfg.job.override_dirname or None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return Path(hydra_cfg.sweep.dir).name, name or f"job{hydra_cfg.job.num}"
    return None, name
