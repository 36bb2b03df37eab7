"""`train(cfg)`: one run, from a composed config to the files in its output folder.

The loop, in one screen (`_Run.loop`): for each mini-batch build an `Objective` and call `optimizer.step(objective)`;
record one metric row per step; every `trainer.log_every` steps flush the rows (stopping if the loss turned
non-finite); evaluate on the test split every `trainer.eval_every` steps (or at each epoch end) and at the end.
Between two steps (`_Run._at_boundary`): stop when a stop signal arrived (runner/signals.py), checkpoint when due
(runner/checkpoint.py). Wall-clock times cover the training steps only, never evaluation, diagnostics, logging or
checkpoints.
A resumed run (runner/resume.py) is rebuilt from the same config and then put where its checkpoint left it.
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
from validation.checks import check_call, positive_int
from optimizers.losses import get_loss
from optimizers.micro_batch import MicroBatchedObjective
from optimizers.objective import Objective
from runner.checkpoint import CheckpointSchedule, save_checkpoint
from runner.device import resolve_device, resolve_dtype, synchronize
from runner.diagnostics import Diagnostics, diagnostics_options
from runner.distributed import (any_rank, average_buffers, broadcast_model, close_distributed, init_distributed, rank,
                                world_size)
from runner.errors import exit_code_for
from runner.evaluate import evaluate
from runner.metadata import write_config, write_run_info, write_summary
from runner.metrics import JSONLSink, MetricsLogger, Sink, first_nonfinite
from runner.resume import Resume, capture_state, metrics_rows_to_keep, plan_resume, restore_state
from runner.schema import check_config
from runner.seeding import seed_everything
from runner.signals import StopSignals
from runner.stopping import StopRules
from runner.wandb_sink import WandbSink

log = logging.getLogger("curvlab")

BATCHING = ("shuffle", "fixed", "full")


@dataclass
class RunResult:
    status: str  # "ok" | "diverged" | "interrupted"
    output_dir: Path
    steps: int
    epochs: float
    summary: dict[str, Any] = field(default_factory=dict)


def train(cfg: DictConfig, output_dir: str | Path | None = None) -> RunResult:
    """Run the training described by `cfg`, writing everything into `output_dir` (default: Hydra's output folder).

    Raises ValueError / TypeError / FileNotFoundError for bad configuration, before any step is taken; every error
    after the output folder exists leaves a summary.json with status "error". A folder holding another run's results
    is refused before anything is written into it (runner/resume.py).
    """
    cfg = copy.deepcopy(cfg)
    cfg.data_root = _data_root(cfg.data_root)
    init_distributed()
    try:
        result, signals = _train(cfg, output_dir)
    finally:
        close_distributed()
    if result.status == "interrupted":
        signals.hand_over()  # under submitit: its handler requeues the job (and exits)
    return result


def _train(cfg: DictConfig, output_dir: str | Path | None) -> tuple[RunResult, StopSignals]:
    out = _output_dir(output_dir)
    resume = plan_resume(cfg, out)
    writer = rank() == 0  # only rank 0 writes files and reports progress
    if not writer:
        log.setLevel(logging.WARNING)
    if writer:
        write_config(cfg, out)
    threads = torch.get_num_threads()
    run: _Run | None = None
    with StopSignals() as signals:
        try:
            check_config(cfg)
            if cfg.threads is not None:
                if cfg.threads < 1:
                    raise ValueError(f"threads={cfg.threads} must be a positive integer (or null for torch's default).")
                torch.set_num_threads(cfg.threads)
            if writer:
                write_run_info(out)
            run = _setup(cfg, out, resume, writer)
            run.loop(cfg.trainer, signals)
            result = _finish(cfg, run)
        except BaseException as exc:
            _record_failure(run, out, exc, writer)
            raise
        finally:
            torch.set_num_threads(threads)  # train() may be called again in the same process
    return result, signals


def _finish(cfg: DictConfig, run: _Run) -> RunResult:
    """Write the rows still pending, the final checkpoint and summary.json; say how the run ended."""
    run.flush_rows(None)
    status = "diverged" if run.diverged_row is not None else "interrupted" if run.stopped_by else "ok"
    if status == "ok" and run.stop_reason is None:
        run.stop_reason = _budget_reason(cfg.trainer, run.step, run.steps_per_epoch)
    if cfg.trainer.checkpoint or status == "diverged":
        run.save_checkpoint()
    run.metrics.close(failed=status != "ok")
    summary = run.summary(status)
    if run.writer:
        write_summary(run.out, summary)
    if status == "diverged":
        row = run.diverged_row
        print(
            f"curvlab: training diverged: the loss became {row['loss']} at step {row['step']} (epoch "
            f"{row['epoch']:.2f}); stopped at step {run.step}. The rows logged so far are in metrics.jsonl and the "
            f"model is in checkpoint.pt. Try a smaller learning rate or more damping.",
            file=sys.stderr,
        )
    if status == "interrupted":
        saved = f"checkpoint saved; continue with trainer.resume={run.out}" if run.checkpoint_step == run.step else (
            "no checkpoint (trainer.checkpoint=false), so it cannot be resumed")
        print(f"curvlab: interrupted by {run.stopped_by} after step {run.step} (epoch {run.epoch:.2f}): {saved}",
              file=sys.stderr)
    if run.writer:
        print(f"curvlab: results in {run.out}")
    return RunResult(status, run.out, run.step, run.epoch, summary)


def _record_failure(run: _Run | None, out: Path, exc: BaseException, writer: bool) -> None:
    """summary.json for a run that ended with an exception (status "error", or "interrupted" for a second Ctrl-C)."""
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "error"
    error = f"{type(exc).__name__}: {exc}"
    if run is not None:
        run.metrics.close(failed=True)
    if not writer:
        return
    summary = run.summary(status, error) if run is not None else {"status": status, "error": error}
    summary["exit_code"] = exit_code_for(exc)
    try:
        write_summary(out, summary)
    except OSError:
        pass  # a full disk: the error being raised already says so


def _setup(cfg: DictConfig, out: Path, resume: Resume | None, writer: bool) -> _Run:
    """Seed, then build the data, model, loss, optimizer and metric sinks the loop needs; restore a checkpoint."""
    trainer = cfg.trainer
    _check_trainer(trainer)
    rules = StopRules.from_trainer(trainer)
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    objective_options = _objective_options(cfg.objective)
    diagnostic_options = diagnostics_options(cfg.get("diagnostics"))
    if cfg.logger.kind not in ("none", "wandb"):
        raise ValueError(f"logger.kind={cfg.logger.kind!r} is not a logger. Choose logger=none or logger=wandb.")
    seed_everything(cfg.seed)

    splits = _build(cfg.dataset, "dataset")
    model = _build(cfg.model, "model", input_shape=splits.input_shape, num_outputs=splits.num_outputs)
    model = model.to(device=device, dtype=dtype)
    shard = (rank(), world_size())  # data parallelism: this rank's part of every global batch (data/batching.py)
    broadcast_model(model)
    if shard[0] > 0:
        torch.manual_seed(cfg.seed + 7919 * shard[0])  # dropout masks differ per rank; rank 0 keeps the 1-rank stream
    loss_fn = get_loss(splits.loss)
    rules.check_metric(classification=splits.loss == "cross_entropy")
    train_batches = make_batches(
        splits.train, batch_size=trainer.batch_size, mode=trainer.batching, device=device, dtype=dtype,
        seed=cfg.seed, drop_last=trainer.drop_last, num_workers=trainer.num_workers, shard=shard,
    )
    test_batches = make_batches(
        splits.test, batch_size=trainer.eval_batch_size, mode="sequential", device=device, dtype=dtype,
        num_workers=trainer.num_workers, shard=shard,
    )
    total_steps = _total_steps(trainer, len(train_batches))
    optimizer = _call(_build(cfg.optimizer, "optimizer"), "optimizer", model.parameters())
    optimizer.configure(total_steps=total_steps)

    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        f"{splits.name}: {len(splits.train)} train / {len(splits.test)} test samples; {n_params} parameters; "
        f"{type(optimizer).__name__}; {total_steps} steps on {device} in {cfg.dtype}"
        + (f"; {shard[1]} data-parallel ranks" if shard[1] > 1 else "")
    )
    diagnostics = Diagnostics(diagnostic_options, splits.train, model, make_objective, objective_options,
                              out if writer else None, resume)
    config = OmegaConf.to_container(cfg, resolve=True)
    metrics = MetricsLogger(_sinks(cfg, out, resume, writer, config))
    run = _Run(model, loss_fn, optimizer, train_batches, test_batches, metrics, device, objective_options,
               classification=splits.loss == "cross_entropy", total_steps=total_steps, out=out, writer=writer,
               config=config)
    if resume is not None:
        restore_state(run, resume.state)
        run.resumed_from = {"folder": str(resume.folder), "checkpoint": str(resume.checkpoint), "step": run.step}
        log.info(f"resumed from {resume.checkpoint} at step {run.step} (epoch {run.epoch:.2f})")
    run.diagnostics, run.rules = diagnostics, rules
    return run


def _sinks(cfg: DictConfig, out: Path, resume: Resume | None, writer: bool, config: dict[str, Any]) -> list[Sink]:
    """metrics.jsonl (cut back to the checkpoint's rows when resuming) and W&B; none on ranks other than 0."""
    if not writer:
        return []
    sinks: list[Sink] = [JSONLSink(out / "metrics.jsonl", keep_rows=metrics_rows_to_keep(resume, out))]
    if cfg.logger.kind == "wandb":
        previous = resume.state.get("wandb") if resume is not None else None
        sinks.append(WandbSink(cfg.logger, out, config, resume_from=previous))
    return sinks


class _Run:
    """The state of the loop: the step counter, the timers and the metric bookkeeping."""

    def __init__(self, model, loss_fn, optimizer, train_batches, test_batches, metrics, device, objective_options,
                 classification: bool, total_steps: int, out: Path, writer: bool, config: dict[str, Any]) -> None:
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.train_batches, self.test_batches = train_batches, test_batches
        self.metrics, self.device, self.objective_options = metrics, device, objective_options
        self.classification, self.total_steps = classification, total_steps
        self.out, self.writer, self.config = out, writer, config
        self.steps_per_epoch = len(train_batches)
        self.step, self.samples_seen, self.wall_time = 0, 0, 0.0
        self.diverged_row: dict[str, Any] | None = None
        self.last_row: dict[str, Any] = {}
        self.last_eval: dict[str, float] = {}
        self.best_accuracy: float | None = None
        self.train_losses: list[Any] = []  # batch losses since the last evaluation -> train/loss (summed at evaluation)
        self.stopped_by: str | None = None  # the stop signal's name
        self.checkpoint_step: int | None = None
        self.resumed_from: dict[str, Any] | None = None
        self.rules = StopRules()  # trainer.max_time_minutes, trainer.stop_at_target (runner/stopping.py)
        self.stop_reason: str | None = None  # why a run with status ok ended (summary.json)

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def loop(self, trainer: DictConfig, signals: StopSignals) -> None:
        eval_every = trainer.eval_every or self.steps_per_epoch
        every = (trainer.checkpoint_every, trainer.checkpoint_every_minutes)
        schedule = CheckpointSchedule(*every) if trainer.checkpoint and every != (None, None) else None
        show = self.writer and (trainer.progress if trainer.progress is not None else sys.stderr.isatty())
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", disable=not show, dynamic_ncols=True)
        self.model.train()
        with bar, logging_redirect_tqdm() if show else contextlib.nullcontext():  # log lines above the bar
            stop = self._at_boundary(signals, None)  # a signal during the set-up: stop before the first step
            self.stop_reason = self.rules.out_of_time(self.wall_time) or self.rules.reached(self.last_eval, self.step)
            while self.step < self.total_steps and self.diverged_row is None and not stop and not self.stop_reason:
                tick = time.perf_counter()
                for inputs, targets in self.train_batches:
                    objective = make_objective(self.model, self.loss_fn, inputs, targets, **self.objective_options,
                                               global_batch_size=self.train_batches.global_batch)
                    try:
                        stats = self.optimizer.step(objective)
                    except Exception as exc:
                        if not self._diverged_before(exc):
                            raise
                        break
                    average_buffers(self.model)  # batch-norm running statistics equal on every rank
                    synchronize(self.device)
                    self._record(stats, step_time=time.perf_counter() - tick,
                                 batch_size=self.train_batches.global_batch)
                    bar.update()
                    self.stop_reason = self.rules.out_of_time(self.wall_time)  # evaluated below, then the last step
                    done = self.step >= self.total_steps or self.stop_reason is not None
                    self.diagnostics.after_step(self, done)  # when due: diag/* in this row (runner/diagnostics.py)
                    if done or self.step % eval_every == 0:
                        self._evaluate()  # adds eval/* and train/* to this step's row
                    if done or self.step % eval_every == 0 or self.step % trainer.log_every == 0:
                        self.flush_rows(bar)  # sets diverged_row when a flushed loss is not finite
                        self.stop_reason = self.stop_reason or self.rules.reached(self.last_eval, self.step)
                        done = done or self.stop_reason is not None
                    stop = not done and self.diverged_row is None and self._at_boundary(signals, schedule)
                    if done or self.diverged_row is not None or stop:
                        break
                    tick = time.perf_counter()  # evaluation, logging and checkpoints stay out of the step times

    def _at_boundary(self, signals: StopSignals, schedule: CheckpointSchedule | None) -> bool:
        """Between two steps, the same decision on every rank: stop if a stop signal arrived (returns True), else
        checkpoint if one is due."""
        stop, save = any_rank(signals.requested is not None, schedule is not None and schedule.due(self.step))
        if stop:
            self.stopped_by = signals.requested or "a stop signal on another rank"
        elif save:
            self.save_checkpoint()
            schedule.done()
        return stop

    def save_checkpoint(self) -> None:
        """checkpoint.pt for the current step (rank 0 writes it; every rank contributes its random states)."""
        self.metrics.sync()  # the rows the checkpoint counts are on disk first
        state = capture_state(self)
        if self.writer:
            save_checkpoint(self.out, state)
        self.checkpoint_step = self.step

    def _diverged_before(self, exc: Exception) -> bool:
        """Whether the loss had already become non-finite when the optimizer raised `exc` (then: a divergence)."""
        self.flush_rows(None)
        if self.diverged_row is not None:
            log.warning(f"the optimizer raised {type(exc).__name__} at step {self.step + 1}, after the loss diverged")
        return self.diverged_row is not None

    def _record(self, stats: dict[str, Any], step_time: float, batch_size: int) -> None:
        self.step += 1
        self.samples_seen += batch_size
        self.wall_time += step_time
        row = {"step": self.step, "epoch": self.epoch, "samples_seen": self.samples_seen,
               "wall_time": self.wall_time, "step_time": step_time, **peak_memory(self.device)}
        for key, value in stats.items():
            row.setdefault(key, value)
        if "loss" in stats:
            self.train_losses.append(stats["loss"])  # stays on the device: no synchronisation, no arithmetic here
        self.metrics.record(row)

    def _evaluate(self) -> None:
        row = self.metrics.pending[-1]
        if self.train_losses:
            row["train/loss"] = sum(self.train_losses) / len(self.train_losses)
        self.train_losses = []
        row.update(evaluate(self.model, self.loss_fn, self.test_batches, self.classification))

    def flush_rows(self, bar: tqdm | None) -> None:
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

    def wandb_info(self) -> dict[str, Any] | None:
        return next((sink.info for sink in self.metrics.sinks if isinstance(sink, WandbSink)), None)

    def summary(self, status: str, error: str | None = None) -> dict[str, Any]:
        summary = {
            "status": status,
            "exit_code": {"ok": 0, "diverged": 3, "interrupted": 4}.get(status),
            "steps": self.step,
            "epochs": self.epoch,
            "samples_seen": self.samples_seen,
            "wall_time": self.wall_time,
            "final_batch_loss": self.last_row.get("loss"),
            "train_loss": self.last_eval.get("train/loss"),
            "eval": {k: v for k, v in self.last_eval.items() if k.startswith("eval/")},
            "best_eval_accuracy": self.best_accuracy,
            "diverged_at_step": self.diverged_row["step"] if self.diverged_row else None,
            "interrupted_by": self.stopped_by,
            "stop_reason": self.stop_reason if status == "ok" else None,
            "checkpoint_step": self.checkpoint_step,
            "resumed_from": self.resumed_from,
            "wandb": self.wandb_info(),
        }
        if error is not None:
            summary["error"] = error
        return summary


def peak_memory(device: torch.device) -> dict[str, float]:
    """The step's peak device memory (CUDA; the counter restarts every step) or the process's peak RSS (CPU), MiB."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return {"memory/peak_mb": peak}
    import resource

    return {"memory/max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


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
    for key in ("max_epochs", "max_steps", "batch_size", "eval_batch_size", "eval_every", "log_every",
                "checkpoint_every"):
        value = trainer[key]
        if value is not None and value < 1:
            raise ValueError(f"trainer.{key}={value} must be a positive integer.")
    minutes = trainer.checkpoint_every_minutes
    if minutes is not None and not minutes > 0:
        raise ValueError(f"trainer.checkpoint_every_minutes={minutes} must be a positive number of minutes (or null).")
    if trainer.batching not in BATCHING:
        raise ValueError(
            f"trainer.batching={trainer.batching!r} is not a batching mode. Choose one of: {', '.join(BATCHING)}."
        )


def _budget_reason(trainer: DictConfig, step: int, steps_per_epoch: int) -> str:
    """summary.json's stop_reason for a run that completed its step/epoch budget."""
    if trainer.max_steps is not None and step >= trainer.max_steps:
        return f"trainer.max_steps={trainer.max_steps}"
    return f"trainer.max_epochs={trainer.max_epochs}: {step} steps of {steps_per_epoch} per epoch"


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
    batch = ("model", "loss_fn", "inputs", "targets", "global_batch_size")
    options = OmegaConf.to_container(options, resolve=True)
    micro = options.pop("micro_batch_size", None)
    checked = check_call("objective", Objective, options, supplied=batch)
    if micro is not None:
        checked["micro_batch_size"] = positive_int("objective.micro_batch_size", micro)
    return checked


def make_objective(model, loss_fn, inputs, targets, *, micro_batch_size: int | None = None, **options: Any):
    """The step's objective: the whole batch at once, or in micro-batches (optimizers/micro_batch.py)."""
    if micro_batch_size is None or micro_batch_size >= inputs.shape[0]:
        return Objective(model, loss_fn, inputs, targets, **options)
    return MicroBatchedObjective(model, loss_fn, inputs, targets, micro_batch_size=micro_batch_size, **options)


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
