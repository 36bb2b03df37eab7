"""Typed schemas for the parts of the config the runner owns.

Hydra merges `conf/config.yaml`, `conf/trainer/*.yaml` and `conf/logger/*.yaml` into these dataclasses, so a
misspelled key (`trainer.max_epoch=1`) or a value of the wrong type (`trainer.max_epochs=abc`) is rejected while the
config is composed, before anything is built. The `dataset`, `model` and `optimizer` groups stay free-form: their
keys are the arguments of the `_target_` they instantiate, which is checked when it is called.

Rules the schema alone cannot enforce are checked by `check_config` before a run starts: Hydra adds a key given
with `+` (`+trainer.max_step=5`) even to a typed node, so such keys are rejected here like misspelled ones; a
non-finite number (nan, inf) is rejected wherever the runner owns the value or a dataset/model builder receives it
(the optimizer's own options record checks its keys); `seed` must be an integer >= 0 (it is checked here, by its own
name, before `diagnostics.seed` and `dataset.seed`, which follow it through `${seed}`, are checked by theirs).

`typed_key` makes an error about a key that only follows another (`diagnostics.seed: ${seed}`) name the key the
user set (`seed=-1 ...`), whatever the key.

`register_configs()` must run before Hydra composes the config (`run.py` and the tests call it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from validation.checks import OptionError, finite, nonnegative_int
from runner.errors import unknown_key_message


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
    progress_every_seconds: Optional[float] = 10.0  # inside a long step: one progress line every S s (null = none)
    estimate_cost: bool = True  # before the first step: time one gradient, warn when a step or the run will be long
    checkpoint: bool = True  # write checkpoint.pt at the end of the run (and when interrupted or on schedule)
    checkpoint_every: Optional[int] = None  # also checkpoint every N steps (null = no step schedule)
    checkpoint_every_minutes: Optional[float] = 30.0  # ... and/or every M minutes of wall-clock (null = off)
    max_time_minutes: Optional[float] = None  # also stop once the optimiser steps took M minutes (wall_time; null: off)
    stop_at_target: Optional[str] = None  # METRIC:VALUE, e.g. eval/accuracy:0.97: stop at the evaluation reaching it
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
class TuneConfig:  # what run.py returns to a sweeper such as hydra/sweeper=optuna (runner/tuning.py)
    metric: str = "eval/accuracy"  # a column of metrics.jsonl
    objective: str = "best"  # best | final | steps_to_target | time_to_target
    mode: str = "auto"  # auto | max | min: which way the metric improves (auto: max for accuracies)
    target: Optional[float] = None  # the value of `metric` to reach, for the *_to_target objectives


@dataclass
class WorkloadConfig:  # set by conf/workload/<name>.yaml: what the race (runner/race.py) measures on this problem
    name: str = MISSING  # the file's name
    metric: str = "eval/accuracy"  # the validation metric (a column of metrics.jsonl)
    target: float = MISSING  # the value of `metric` to reach (at least it for accuracies, at most it otherwise)


@dataclass
class CurvlabConfig:
    dataset: Any = None
    model: Any = None
    optimizer: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    data_root: str = "${oc.env:CURVLAB_DATA,${curvlab_cache:data}}"  # conf/config.yaml sets the same default
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | float64
    precision: str = "float32"  # float32 | bf16: bf16 autocast of the model's forward (optimizers/precision.py)
    channels_last: bool = False  # convolutional nets in channels-last memory (no-op without a Conv2d)
    threads: Optional[int] = None  # torch's CPU threads; null = torch's default (one per core)
    objective: dict[str, Any] = field(default_factory=dict)  # keyword arguments of optimizers.objective.Objective
    tune: TuneConfig = field(default_factory=TuneConfig)
    diagnostics: Any = None  # curvature diagnostics during training: checked by runner.diagnostics.DiagnosticsOptions
    workload: Optional[WorkloadConfig] = None  # workload=<name> (conf/workload/): dataset, model, budget, target


def cache_dir(*parts: str) -> str:
    """`$XDG_CACHE_HOME/curvlab/<parts>`, or `~/.cache/curvlab/<parts>` when XDG_CACHE_HOME is unset or empty (as the
    XDG Base Directory Specification says), with `~` expanded. The default data folder: outside the code."""
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or "~/.cache"), "curvlab", *parts)


def register_configs() -> None:
    """Register the schema that `conf/config.yaml` lists first in its defaults (the trainer and logger groups are
    merged into its typed `trainer` and `logger` fields) and the `${curvlab_cache:...}` resolver of `data_root`."""
    ConfigStore.instance().store(name="curvlab_schema", node=CurvlabConfig)
    OmegaConf.register_new_resolver("curvlab_cache", cache_dir, replace=True)


TYPED = {"": CurvlabConfig, "trainer": TrainerConfig, "logger": LoggerConfig,  # where a key must be a field
         "workload": WorkloadConfig}


def check_config(cfg: DictConfig) -> None:
    """Reject keys added with `+` to the typed parts, and non-finite numbers outside the optimizer group."""
    for group, schema in TYPED.items():
        if group and cfg.get(group) is None:
            continue  # no workload chosen
        valid = [f.name for f in dataclasses.fields(schema)]
        for key in (cfg[group] if group else cfg):
            if key not in valid and key != "hydra":
                raise ValueError(unknown_key_message(f"{group}.{key}" if group else str(key), valid))
    nonnegative_int("seed", cfg.seed)
    for key in cfg:
        if key not in ("optimizer", "hydra"):
            _check_finite(str(key), OmegaConf.to_container(cfg[key], resolve=True)
                          if OmegaConf.is_config(cfg[key]) else cfg[key])


def _check_finite(key: str, value: Any) -> None:
    """OptionError (`dataset.noise=nan must be a finite number.`) for the first nan or inf under `key`."""
    if isinstance(value, float) and not math.isfinite(value):
        finite(key, value)
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_finite(f"{key}.{name}", item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(f"{key}[{i}]", item)


_FOLLOWS = re.compile(r"\$\{([\w.]+)\}")  # a value that is exactly one other key: ${seed}, ${trainer.batch_size}


def interpolated_keys(cfg: DictConfig) -> dict[str, str]:
    """{key: the key it follows} for every value of `cfg` that is exactly `${other.key}` (e.g. diagnostics.seed ->
    seed, dataset.root -> data_root); the hydra node is skipped."""
    found: dict[str, str] = {}

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            if prefix == "" and key == "hydra":
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                walk(child, f"{prefix}{key}.")
            elif child is not None and child._is_interpolation():
                match = _FOLLOWS.fullmatch(str(child._value()))
                if match:
                    found[f"{prefix}{key}"] = match.group(1)

    walk(cfg, "")
    return found


def typed_key(exc: BaseException, cfg: DictConfig) -> BaseException:
    """`exc`, or for an OptionError about a key that follows another (`diagnostics.seed=-1 ...`, where
    diagnostics.seed is `${seed}`) the same error naming the key the user set: `seed=-1 ... (diagnostics.seed follows
    seed: ${seed}.)`."""
    if not isinstance(exc, OptionError):
        return exc
    message = str(exc)
    key = message.split("=", 1)[0]
    follows = interpolated_keys(cfg)
    source = follows.get(key)
    while source in follows:  # ${a} -> ${b} -> the key the user set
        source = follows[source]
    if source is None:
        return exc
    renamed = OptionError(f"{source}{message[len(key):]} ({key} follows {source}: ${{{follows[key]}}}.)")
    renamed.__suppress_context__ = True
    return renamed
