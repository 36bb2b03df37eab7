"""`train(cfg)`: one run, from a composed config to the files in its output folder.

The loop, in one screen (`_Run.loop`): for each mini-batch build an `Objective` and call `optimizer.step(objective)`;
record one metric row per step; every `trainer.log_every` steps flush the rows (stopping if the loss turned
non-finite); evaluate on the test split every `trainer.eval_every` steps (or at each epoch end) and at the end.
Wall-clock times cover the training steps only, never evaluation or logging.
"""

from __future__ import annotations

import contextlib
import copy
import os
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data.batching import make_batches
from optimizers.checks import check_call
from optimizers.losses import get_loss
from optimizers.objective import Objective
from runner.checkpoint import save_checkpoint
from runner.device import resolve_device, resolve_dtype, synchronize
from runner.evaluate import evaluate
from runner.metadata import write_config, write_run_info, write_summary
from runner.metrics import JSONLSink, MetricsLogger, Sink, first_nonfinite
from runner.schema import check_config
from runner.seeding import seed_everything
from runner.wandb_sink import WandbSink

log = logging.getLogger("curvlab")

BATCHING = ("shuffle", "fixed", "full")


@dataclass
class RunResult:
    status: str  # "ok" | "diverged"
    output_dir: Path
    steps: int
    epochs: float
    summary: dict[str, Any] = field(default_factory=dict)


def train(cfg: DictConfig, output_dir: str | Path | None = None) -> RunResult:
    """Run the training described by `cfg`, writing everything into `output_dir` (default: Hydra's output folder).

    Raises ValueError / TypeError / FileNotFoundError for bad configuration, before any step is taken; every error
    after the output folder exists leaves a summary.json with status "error".
    """
    cfg = copy.deepcopy(cfg)
    cfg.data_root = _data_root(cfg.data_root)
    out = _output_dir(output_dir)
    write_config(cfg, out)
    threads = torch.get_num_threads()
    run: _Run | None = None
    try:
        check_config(cfg)
        if cfg.threads is not None:
            if cfg.threads < 1:
                raise ValueError(f"threads={cfg.threads} must be a positive integer (or null for torch's default).")
            torch.set_num_threads(cfg.threads)
        write_run_info(out)
        run = _setup(cfg, out)
        run.loop(cfg.trainer)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        if run is not None:
            run.metrics.close(failed=True)
        write_summary(out, run.summary("error", error) if run is not None else {"status": "error", "error": error})
        raise
    finally:
        torch.set_num_threads(threads)  # train() may be called again in the same process

    status = "diverged" if run.diverged_row is not None else "ok"
    run.metrics.close(failed=status != "ok")
    if cfg.trainer.checkpoint or status == "diverged":
        save_checkpoint(out / "checkpoint.pt", run.model, run.optimizer, run.step, run.epoch, run.train_batches)
    summary = run.summary(status)
    write_summary(out, summary)
    if status == "diverged":
        row = run.diverged_row
        print(
            f"curvlab: training diverged: the loss became {row['loss']} at step {row['step']} (epoch "
            f"{row['epoch']:.2f}); stopped at step {run.step}. The rows logged so far are in metrics.jsonl and the "
            f"model is in checkpoint.pt. Try a smaller learning rate or more damping.",
            file=sys.stderr,
        )
    print(f"curvlab: results in {out}")
    return RunResult(status, out, run.step, run.epoch, summary)


def _setup(cfg: DictConfig, out: Path) -> _Run:
    """Seed, then build the data, model, loss, optimizer and metric sinks the loop needs."""
    trainer = cfg.trainer
    _check_trainer(trainer)
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    objective_options = _objective_options(cfg.objective)
    if cfg.logger.kind not in ("none", "wandb"):
        raise ValueError(f"logger.kind={cfg.logger.kind!r} is not a logger. Choose logger=none or logger=wandb.")
    seed_everything(cfg.seed)

    splits = _build(cfg.dataset, "dataset")
    model = _build(cfg.model, "model", input_shape=splits.input_shape, num_outputs=splits.num_outputs)
    model = model.to(device=device, dtype=dtype)
    loss_fn = get_loss(splits.loss)
    train_batches = make_batches(
        splits.train, batch_size=trainer.batch_size, mode=trainer.batching, device=device, dtype=dtype,
        seed=cfg.seed, drop_last=trainer.drop_last, num_workers=trainer.num_workers,
    )
    test_batches = make_batches(
        splits.test, batch_size=trainer.eval_batch_size, mode="sequential", device=device, dtype=dtype,
        num_workers=trainer.num_workers,
    )
    total_steps = _total_steps(trainer, len(train_batches))
    optimizer = _call(_build(cfg.optimizer, "optimizer"), "optimizer", model.parameters())
    optimizer.configure(total_steps=total_steps)

    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        f"{splits.name}: {len(splits.train)} train / {len(splits.test)} test samples; {n_params} parameters; "
        f"{type(optimizer).__name__}; {total_steps} steps on {device} in {cfg.dtype}"
    )
    sinks: list[Sink] = [JSONLSink(out / "metrics.jsonl")]
    if cfg.logger.kind == "wandb":
        sinks.append(WandbSink(cfg.logger, out, OmegaConf.to_container(cfg, resolve=True)))
    return _Run(model, loss_fn, optimizer, train_batches, test_batches, MetricsLogger(sinks), device,
                objective_options, classification=splits.loss == "cross_entropy", total_steps=total_steps)


class _Run:
    """The state of the loop: the step counter, the timers and the metric bookkeeping."""

    def __init__(self, model, loss_fn, optimizer, train_batches, test_batches, metrics, device, objective_options,
                 classification: bool, total_steps: int) -> None:
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.train_batches, self.test_batches = train_batches, test_batches
        self.metrics, self.device, self.objective_options = metrics, device, objective_options
        self.classification, self.total_steps = classification, total_steps
        self.steps_per_epoch = len(train_batches)
        self.step, self.samples_seen, self.wall_time = 0, 0, 0.0
        self.diverged_row: dict[str, Any] | None = None
        self.last_row: dict[str, Any] = {}
        self.last_eval: dict[str, float] = {}
        self.best_accuracy: float | None = None
        self._losses: list[Any] = []  # batch losses since the last evaluation -> train/loss (summed at evaluation)

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def loop(self, trainer: DictConfig) -> None:
        eval_every = trainer.eval_every or self.steps_per_epoch
        show = trainer.progress if trainer.progress is not None else sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, unit="step", disable=not show, dynamic_ncols=True)
        self.model.train()
        with bar, logging_redirect_tqdm() if show else contextlib.nullcontext():  # log lines above the bar
            while self.step < self.total_steps and self.diverged_row is None:
                tick = time.perf_counter()
                for inputs, targets in self.train_batches:
                    objective = Objective(self.model, self.loss_fn, inputs, targets, **self.objective_options)
                    try:
                        stats = self.optimizer.step(objective)
                    except Exception as exc:
                        if not self._diverged_before(exc):
                            raise
                        break
                    synchronize(self.device)
                    self._record(stats, step_time=time.perf_counter() - tick, batch_size=inputs.shape[0])
                    bar.update()
                    done = self.step >= self.total_steps
                    if done or self.step % eval_every == 0:
                        self._evaluate()  # adds eval/* and train/* to this step's row
                    if done or self.step % eval_every == 0 or self.step % trainer.log_every == 0:
                        self._flush(bar)  # sets diverged_row when a flushed loss is not finite
                    if done or self.diverged_row is not None:
                        break
                    tick = time.perf_counter()  # evaluation and logging stay out of the step times

    def _diverged_before(self, exc: Exception) -> bool:
        """Whether the loss had already become non-finite when the optimizer raised `exc` (then: a divergence)."""
        self._flush(None)
        if self.diverged_row is not None:
            log.warning(f"the optimizer raised {type(exc).__name__} at step {self.step + 1}, after the loss diverged")
        return self.diverged_row is not None

    def _record(self, stats: dict[str, Any], step_time: float, batch_size: int) -> None:
        self.step += 1
        self.samples_seen += batch_size
        self.wall_time += step_time
        row = {"step": self.step, "epoch": self.epoch, "samples_seen": self.samples_seen,
               "wall_time": self.wall_time, "step_time": step_time}
        for key, value in stats.items():
            row.setdefault(key, value)
        if "loss" in stats:
            self._losses.append(stats["loss"])  # stays on the device: no synchronisation, no arithmetic here
        self.metrics.record(row)

    def _evaluate(self) -> None:
        row = self.metrics.pending[-1]
        if self._losses:
            row["train/loss"] = sum(self._losses) / len(self._losses)
        self._losses = []
        row.update(evaluate(self.model, self.loss_fn, self.test_batches, self.classification))

    def _flush(self, bar: tqdm | None) -> None:
        rows = self.metrics.flush()
        if not rows:
            return
        self.last_row = rows[-1]
        for row in rows:
            if "eval/loss" in row:
                self.last_eval = {k: v for k, v in row.items() if k.startswith(("eval/", "train/"))}
                accuracy = row.get("eval/accuracy")
                if accuracy is not None and (self.best_accuracy is None or accuracy > self.best_accuracy):
                    self.best_accuracy = accuracy
                values = " ".join(f"{key} {value:.4g}" for key, value in self.last_eval.items())
                log.info(f"step {row['step']} epoch {row['epoch']:.2f} {values}")
        self.diverged_row = self.diverged_row or first_nonfinite(rows)
        if bar is not None and "loss" in self.last_row:
            bar.set_postfix(loss=f"{self.last_row['loss']:.4g}", refresh=False)

    def summary(self, status: str, error: str | None = None) -> dict[str, Any]:
        summary = {
            "status": status,
            "steps": self.step,
            "epochs": self.epoch,
            "samples_seen": self.samples_seen,
            "wall_time": self.wall_time,
            "final_batch_loss": self.last_row.get("loss"),
            "train_loss": self.last_eval.get("train/loss"),
            "eval": {k: v for k, v in self.last_eval.items() if k.startswith("eval/")},
            "best_eval_accuracy": self.best_accuracy,
            "diverged_at_step": self.diverged_row["step"] if self.diverged_row else None,
            "wandb": next((sink.info for sink in self.metrics.sinks if isinstance(sink, WandbSink)), None),
        }
        if error is not None:
            summary["error"] = error
        return summary


def _output_dir(output_dir: str | Path | None) -> Path:
    if output_dir is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise ValueError("train(cfg) outside a Hydra run needs an explicit output_dir.")
        output_dir = HydraConfig.get().runtime.output_dir
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_trainer(trainer: DictConfig) -> None:
    if trainer.max_epochs is None and trainer.max_steps is None:
        raise ValueError("The run has no budget: set trainer.max_epochs=N and/or trainer.max_steps=N.")
    for key in ("max_epochs", "max_steps", "batch_size", "eval_batch_size", "eval_every", "log_every"):
        value = trainer[key]
        if value is not None and value < 1:
            raise ValueError(f"trainer.{key}={value} must be a positive integer.")
    if trainer.batching not in BATCHING:
        raise ValueError(
            f"trainer.batching={trainer.batching!r} is not a batching mode. Choose one of: {', '.join(BATCHING)}."
        )


def _total_steps(trainer: DictConfig, steps_per_epoch: int) -> int:
    limits = []
    if trainer.max_epochs is not None:
        limits.append(trainer.max_epochs * steps_per_epoch)
    if trainer.max_steps is not None:
        limits.append(trainer.max_steps)
    return min(limits)


def _data_root(path: str) -> str:
    """`path` with `~` and environment variables expanded, relative to the launch folder, normalised."""
    return os.path.normpath(hydra.utils.to_absolute_path(os.path.expanduser(os.path.expandvars(path))))


def _objective_options(options: DictConfig) -> dict[str, Any]:
    """The `objective` keys, checked against `Objective`'s keyword arguments (the batch is supplied per step)."""
    batch = ("model", "loss_fn", "inputs", "targets")
    return check_call("objective", Objective, OmegaConf.to_container(options, resolve=True), supplied=batch)


def _build(node: DictConfig, key: str, **supplied: Any) -> Any:
    """hydra.utils.instantiate, letting the builder's own ValueError / FileNotFoundError through unwrapped.

    The dataset and model groups are checked first against their builder's signature: unknown, missing and
    wrongly typed keys name `<key>.<name>` (`model.hidden=abc must be a list of integers, e.g. [1,2].`). The
    optimizer group is partial: its class checks its own options when the runner calls it with the parameters.
    """
    if not node.get("_partial_", False):
        try:
            target = hydra.utils.get_method(node._target_)
        except Exception as exc:  # noqa: BLE001 -- ImportError, AttributeError, ...: a bad _target_
            raise ValueError(f"{key}._target_={node._target_} cannot be imported: {exc}") from None
        check_call(key, target, {k: v for k, v in node.items() if not str(k).startswith("_")},
                   supplied=tuple(supplied))
    try:
        return hydra.utils.instantiate(node, **supplied)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError)):
            raise cause from None
        if isinstance(cause, TypeError):
            raise TypeError(f"{key}: {node.get('_target_')} rejected its arguments: {cause}. Check the keys under "
                            f"'{key}' (python run.py --cfg job shows them).") from None
        raise


def _call(factory: Any, key: str, *args: Any) -> Any:
    try:
        return factory(*args)
    except TypeError as exc:
        raise TypeError(f"{key}: {exc}. Check the keys under '{key}' (python run.py --cfg job shows them).") from None
