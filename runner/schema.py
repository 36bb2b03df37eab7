"""Typed schemas for the parts of the config the runner owns.

Hydra merges `conf/config.yaml`, `conf/trainer/*.yaml` and `conf/logger/*.yaml` into these dataclasses, so a
misspelled key (`trainer.max_epoch=1`) or a value of the wrong type (`trainer.max_epochs=abc`) is rejected while the
config is composed, before anything is built. The `dataset`, `model` and `optimizer` groups stay free-form: their
keys are the arguments of the `_target_` they instantiate, which is checked when it is called.

`register_configs()` must run before Hydra composes the config (`run.py` and the tests call it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class TrainerConfig:
    max_epochs: Optional[int] = None  # stop after this many passes over the training split ...
    max_steps: Optional[int] = None  # ... or after this many optimizer steps, whichever comes first
    batch_size: Optional[int] = 128  # null = the whole training split in one batch
    batching: str = "shuffle"  # shuffle | fixed | full (see data.batching.make_batches)
    drop_last: bool = False
    num_workers: int = 0  # DataLoader workers for datasets that are not held in memory
    eval_batch_size: int = 1000
    eval_every: Optional[int] = None  # steps between test-set evaluations; null = at the end of every epoch
    log_every: int = 10  # steps between flushes of the buffered metric rows to the sinks
    progress: Optional[bool] = None  # tqdm bar; null = only when stderr is a terminal
    checkpoint: bool = True  # write checkpoint.pt at the end of the run (and when interrupted or on schedule)
    checkpoint_every: Optional[int] = None  # also checkpoint every N steps (null = no step schedule)
    checkpoint_every_minutes: Optional[float] = 30.0  # ... and/or every M minutes of wall-clock (null = off)
    resume: Any = None  # null (auto: resume only a requeued job) | true (this folder) | false | <run folder>


@dataclass
class LoggerConfig:
    kind: str = "none"  # none | wandb; local files (metrics.jsonl, summary.json, ...) are always written
    mode: str = "offline"  # wandb.init(mode=...): offline | online | disabled
    project: str = "curvlab"
    entity: Optional[str] = None
    group: Optional[str] = None  # null = the sweep folder's name in a multirun, no group in a single run
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class CurvlabConfig:
    dataset: Any = None
    model: Any = None
    optimizer: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    data_root: str = "data"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | float64
    threads: Optional[int] = None  # torch's CPU threads; null = torch's default (one per core)
    objective: dict[str, Any] = field(default_factory=dict)  # keyword arguments of optimizers.objective.Objective


def register_configs() -> None:
    """Register the schema that `conf/config.yaml` lists first in its defaults; the trainer and logger groups
    are merged into its typed `trainer` and `logger` fields."""
    ConfigStore.instance().store(name="curvlab_schema", node=CurvlabConfig)
