"""`train(cfg)`: one run, from a composed config to the files in its output folder.

The loop (`_loop`, one screen): for each mini-batch build an `Objective` and call `optimizer.step(objective)`;
record one metric row per step; every `trainer.log_every` steps flush the rows (stopping if the loss turned
non-finite); evaluate on the test split every `trainer.eval_every` steps (or at each epoch end) and at the end.
Between two steps (`_at_boundary`): stop when a stop signal arrived (runner/signals.py), checkpoint when due
(runner/checkpoint.py). Inside a long step the optimiser reports its progress to the runner's monitor
(runner/progress.py), which shows it and can abandon the step on a stop signal: the loop then puts the state saved
before the step back (`RunState.before_step` / `undo_step`) and stops as if the signal had come at the boundary. Wall-clock times cover the training steps only, never evaluation, diagnostics, logging or
checkpoints. Everything the loop advances is one `RunState` (runner/state.py), which also makes the checkpoint and
summary.json. A resumed run (runner/resume.py) is rebuilt from the same config and then put where its checkpoint
left it (`RunState.restore`).
"""

from __future__ import annotations

import contextlib
import copy
import math
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
from optimizers.compiled import check_compile
from optimizers.interface import ObjectiveLike
from optimizers.monitor import StepInterrupted
from optimizers.objective import Objective
from optimizers.precision import set_execution
from runner import cost
from runner.checkpoint import CheckpointSchedule
from runner.device import resolve_device, resolve_dtype, synchronize
from runner.diagnostics import Diagnostics, diagnostics_options
from runner.distributed import (any_rank, average_buffers, broadcast_model, close_distributed, init_distributed, rank,
                                world_size)
from runner.errors import exit_code_for
from runner.evaluate import batch_norms, evaluate
from runner.metadata import add_run_info, write_config, write_run_info, write_summary
from runner.metrics import JSONLSink, MetricsLogger, Sink
from runner.progress import StepProgress
from runner.resume import Resume, metrics_rows_to_keep, plan_resume
from runner.schema import check_config, typed_key
from runner.seeding import seed_everything
from runner.signals import StopSignals
from runner.state import RunState
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
    is refused before anything is written into it (runner/resume.py). The stop signals are handled from the first
    line to the last (runner/signals.py); once summary.json is written, a late signal changes nothing.
    """
    cfg = copy.deepcopy(cfg)
    cfg.data_root = _data_root(cfg.data_root)
    with StopSignals() as signals:
        init_distributed()
        try:
            result = _train(cfg, output_dir, signals)
        finally:
            close_distributed()
    if result.status == "interrupted":
        signals.hand_over()  # under submitit: its handler requeues the job (and exits)
    return result


def _train(cfg: DictConfig, output_dir: str | Path | None, signals: StopSignals) -> RunResult:
    out = _output_dir(output_dir)
    resume = plan_resume(cfg, out)  # from here on the folder is this run's
    writer = rank() == 0  # only rank 0 writes files and reports progress
    if not writer:
        log.setLevel(logging.WARNING)
    threads = torch.get_num_threads()
    state: RunState | None = None
    try:
        if writer:
            write_config(cfg, out)
        check_config(cfg)
        if cfg.threads is not None:
            if cfg.threads < 1:
                raise ValueError(f"threads={cfg.threads} must be a positive integer (or null for torch's default).")
            torch.set_num_threads(cfg.threads)
        if writer:
            write_run_info(out)
        state, run = _setup(cfg, out, resume, writer, signals)
        _loop(state, run, cfg.trainer, signals)
        return _finish(cfg, state, signals)
    except BaseException as exc:
        raise _record_failure(state, out, typed_key(exc, cfg), writer, signals)
    finally:
        torch.set_num_threads(threads)  # train() may be called again in the same process


def _setup(cfg: DictConfig, out: Path, resume: Resume | None, writer: bool,
           signals: StopSignals) -> tuple[RunState, _Parts]:
    """Seed, then build the data, model, loss, optimizer and metric sinks the loop needs; restore a checkpoint."""
    trainer = cfg.trainer
    _check_trainer(trainer)
    rules = StopRules.from_trainer(trainer)  # trainer.max_time_minutes, trainer.stop_at_target (runner/stopping.py)
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    objective_options = _objective_options(cfg.objective, device)
    diagnostic_options = diagnostics_options(cfg.get("diagnostics"))
    if cfg.logger.kind not in ("none", "wandb"):
        raise ValueError(f"logger.kind={cfg.logger.kind!r} is not a logger. Choose logger=none or logger=wandb.")
    seed_everything(cfg.seed)

    splits = _build(cfg.dataset, "dataset")
    model = _build(cfg.model, "model", input_shape=splits.input_shape, num_outputs=splits.num_outputs)
    model = model.to(device=device, dtype=dtype)
    execution = set_execution(model, precision=cfg.precision, channels_last=cfg.channels_last)  # bf16, channels-last
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
    total_steps, budget, conflict = budget_line(trainer, len(train_batches))
    optimizer = _call(_build(cfg.optimizer, "optimizer"), "optimizer", model.parameters())
    monitor = StepProgress(signals, trainer.progress_every_seconds)  # progress inside a step (runner/progress.py)
    optimizer.configure(total_steps=total_steps, monitor=monitor)

    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        f"{splits.name}: {len(splits.train)} train / {len(splits.test)} test samples; {n_params} parameters; "
        f"{type(optimizer).__name__}; {total_steps} steps on {device} in {cfg.dtype}"
        + (f"; {shard[1]} data-parallel ranks" if shard[1] > 1 else "")
    )
    (log.warning if conflict else log.info)(budget)
    execution["compile"] = objective_options.get("compile", False)
    log.info(_execution_line(execution, len(splits.train), trainer))
    if writer:
        add_run_info(out, execution=execution)
    diagnostics = Diagnostics(diagnostic_options, splits.train, model, loss_fn, make_objective, objective_options,
                              out if writer else None, resume)
    config = OmegaConf.to_container(cfg, resolve=True)
    metrics = MetricsLogger(_sinks(cfg, out, resume, writer, config))
    state = RunState(model, optimizer, train_batches, metrics, total_steps, device, out, writer, config)
    if getattr(optimizer, "eval_point_bn_batches", 0) and batch_norms(model):  # recomputed at the eval point (runner/state.py)
        state.bn_batches = make_batches(splits.train, batch_size=trainer.batch_size, mode="sequential", device=device,
                                        dtype=dtype, num_workers=trainer.num_workers, shard=shard)
    if resume is not None:
        state.restore(resume.state)
        state.resumed_from = {"folder": str(resume.folder), "checkpoint": str(resume.checkpoint), "step": state.step}
        log.info(f"resumed from {resume.checkpoint} at step {state.step} (epoch {state.epoch:.2f})")
    if trainer.estimate_cost:  # a WARNING when a step or the run will be long (runner/cost.py)
        cost.report(model, optimizer, loss_fn, splits.train, math.ceil(train_batches.batch_size / shard[1]),
                    total_steps - state.step, device, dtype, show=writer)
    return state, _Parts(loss_fn, test_batches, splits.loss == "cross_entropy", objective_options, diagnostics, rules,
                         monitor)


def _sinks(cfg: DictConfig, out: Path, resume: Resume | None, writer: bool, config: dict[str, Any]) -> list[Sink]:
    """metrics.jsonl (cut back to the checkpoint's rows when resuming) and W&B; none on ranks other than 0."""
    if not writer:
        return []
    sinks: list[Sink] = [JSONLSink(out / "metrics.jsonl", keep_rows=metrics_rows_to_keep(resume, out))]
    if cfg.logger.kind == "wandb":
        previous = resume.state.get("wandb") if resume is not None else None
        sinks.append(WandbSink(cfg.logger, out, config, resume_from=previous))
    return sinks


@dataclass
class _Parts:
    """What the loop uses besides the state: built once by `_setup`, never checkpointed."""

    loss_fn: Any
    test_batches: Any
    classification: bool
    objective_options: dict[str, Any]
    diagnostics: Diagnostics
    rules: StopRules
    monitor: StepProgress


def _loop(state: RunState, run: _Parts, trainer: DictConfig, signals: StopSignals) -> None:
    """Train until the budget is spent, the loss diverges or a stop signal arrives. Evaluation, logging,
    diagnostics and checkpoints happen between steps and stay out of the step times."""
    eval_every, log_every = trainer.eval_every or state.steps_per_epoch, trainer.log_every
    schedule = _checkpoint_schedule(trainer)
    show = state.writer and (trainer.progress if trainer.progress is not None else sys.stderr.isatty())
    bar = tqdm(total=state.total_steps, initial=state.step, unit="step", disable=not show, dynamic_ncols=True)
    run.monitor.bar = bar if show else None
    state.model.train()
    with bar, logging_redirect_tqdm() if show else contextlib.nullcontext():  # log lines above the bar
        stop, save = _at_boundary(state, signals, None, run.monitor, None)  # a signal during the set-up: stop now
        state.stop_reason = run.rules.out_of_time(state.wall_time) or run.rules.reached(state.last_eval, state.step)
        before = _before_step(state, run.monitor) if save else None  # what a signal that abandons the step restores
        while not (state.done or state.diverged or stop):
            tick = time.perf_counter()
            for inputs, targets in state.train_batches:  # (B, ...) inputs, (B,) targets: this rank's share
                objective = make_objective(state.model, run.loss_fn, inputs, targets, **run.objective_options,
                                           global_batch_size=state.train_batches.global_batch)
                try:
                    with run.monitor.stepping(state.step + 1, tick, abortable=before is not None):
                        stats = state.optimizer.step(objective)
                except StepInterrupted as stopped:  # only from a step with `before` (runner/progress.py)
                    _abandon(state, before, stopped)
                    stop = True
                    break
                except Exception as exc:
                    if _diverged_before(state, exc, objective):
                        break
                    raise
                average_buffers(state.model)  # batch-norm running statistics equal on every rank
                synchronize(state.device)
                step_time = time.perf_counter() - tick
                state.record_step(stats, step_time, state.train_batches.global_batch, **peak_memory(state.device))
                bar.update()
                state.stop_reason = run.rules.out_of_time(state.wall_time)  # then evaluated as the last step
                run.diagnostics.after_step(state)  # when due: diag/* in this row (runner/diagnostics.py)
                evaluating = state.done or state.step % eval_every == 0
                if evaluating:
                    with state.eval_point():  # Schedule-Free: the average of its iterates (runner/state.py)
                        values = evaluate(state.model, run.loss_fn, run.test_batches, run.classification)
                    state.add_evaluation(values)
                if evaluating or state.step % log_every == 0:
                    _flush(state, bar)  # sets state.diverged when a flushed loss is not finite
                    state.stop_reason = state.stop_reason or run.rules.reached(state.last_eval, state.step)
                if state.done or state.diverged:
                    break
                stop, save = _at_boundary(state, signals, schedule, run.monitor, step_time)
                if stop:
                    break
                before = _before_step(state, run.monitor) if save else None
                tick = time.perf_counter()  # evaluation, logging and checkpoints stay out of the step times


def _at_boundary(state: RunState, signals: StopSignals, schedule: CheckpointSchedule | None, monitor: StepProgress,
                 step_time: float | None) -> tuple[bool, bool]:
    """Between two steps, the same decisions on every rank: stop if a stop signal arrived, else checkpoint if one is
    due. Returns (stop, save the state before the next step so that a signal can abandon it: runner/progress.py)."""
    stop, due, save = any_rank(signals.requested is not None, schedule is not None and schedule.due(state.step),
                               monitor.worth_saving(step_time))
    if stop:
        state.stopped_by = signals.requested or "a stop signal on another rank"
    elif due:
        state.save_checkpoint()
        schedule.done()
    return stop, save and not stop


def _before_step(state: RunState, monitor: StepProgress) -> dict[str, Any]:
    """`state.before_step()`, timed (the monitor weighs its cost against the steps')."""
    start = time.perf_counter()
    saved = state.before_step()
    monitor.copy_seconds = time.perf_counter() - start
    return saved


def _abandon(state: RunState, before: dict[str, Any] | None, stopped: StepInterrupted) -> None:
    """A stop signal abandoned step state.step + 1: put back the state before it; the run stops as if the signal
    had come at the boundary (the checkpoint written next is that boundary's)."""
    if before is None:  # a monitor raised without a saved state: a bug, not a stop to hide
        raise RuntimeError(f"step {state.step + 1} was interrupted ({stopped}) but no state was saved before it")
    state.undo_step(before)
    state.stopped_by = stopped.reason
    state.abandoned = {"step": state.step + 1, "at": stopped.where}
    log.info(f"step {state.step + 1} abandoned at {stopped.where} ({stopped.reason}): the run stands after step "
             f"{state.step}")


def _checkpoint_schedule(trainer: DictConfig) -> CheckpointSchedule | None:
    every = (trainer.checkpoint_every, trainer.checkpoint_every_minutes)
    return CheckpointSchedule(*every) if trainer.checkpoint and every != (None, None) else None


def _flush(state: RunState, bar: tqdm | None) -> None:
    """Write the pending rows; log each evaluation; show the last loss on the progress bar."""
    for row in state.flush_rows():
        if "eval/loss" in row:
            values = " ".join(f"{key} {value:.4g}" for key, value in row.items() if key.startswith(("eval/", "train/")))
            log.info(f"step {row['step']} epoch {row['epoch']:.2f} {values}")
    if bar is not None and "loss" in state.last_row:
        bar.set_postfix(loss=f"{state.last_row['loss']:.4g}", refresh=False)


def _diverged_before(state: RunState, exc: Exception, objective: ObjectiveLike) -> bool:
    """Whether the run had already diverged when the optimizer raised `exc`: a loss logged non-finite, or network
    outputs on this step's batch, at the current parameters, that are not finite (the previous step blew the
    parameters up; e.g. K-FAC's sampled Fisher cannot draw labels from an inf or NaN output). Then the run ends as
    diverged, at this step. The outputs are this rank's own (no collective: another rank may be waiting in one)."""
    _flush(state, None)
    if not state.diverged:
        try:
            with torch.no_grad():
                finite = bool(torch.isfinite(objective.outputs()).all())
        except Exception:  # the forward itself failed: the optimizer's exception is the one to report
            finite = True
        if not finite:
            state.diverged_row = {"step": state.step + 1, "epoch": state.epoch, "loss": float("nan")}
    if state.diverged:
        log.warning(f"the optimizer raised {type(exc).__name__} at step {state.step + 1}, after the loss diverged")
    return state.diverged


def _finish(cfg: DictConfig, state: RunState, signals: StopSignals) -> RunResult:
    """Write the rows still pending, the final checkpoint and summary.json; say how the run ended."""
    _flush(state, None)
    status = "diverged" if state.diverged else "interrupted" if state.stopped_by else "ok"
    if status == "ok" and state.stop_reason is None:
        state.stop_reason = _budget_reason(cfg.trainer, state.step, state.steps_per_epoch)
    if cfg.trainer.checkpoint or status == "diverged":
        state.save_checkpoint()
    state.metrics.close(failed=status != "ok")
    summary = state.summary(status)
    signals.seal()  # the outcome is decided: a stop signal from here on changes nothing
    if state.writer:
        write_summary(state.out, summary)
    if status == "diverged":
        row = state.diverged_row
        print(
            f"curvlab: training diverged: the loss became {row['loss']} at step {row['step']} (epoch "
            f"{row['epoch']:.2f}); stopped at step {state.step}. The rows logged so far are in metrics.jsonl and the "
            f"model is in checkpoint.pt. Try a smaller learning rate or more damping.",
            file=sys.stderr,
        )
    if status == "interrupted":
        saved = f"checkpoint saved; continue with trainer.resume={state.out}" if state.checkpoint_step == state.step \
            else "no checkpoint (trainer.checkpoint=false), so it cannot be resumed"
        where = f"after step {state.step} (epoch {state.epoch:.2f}):"
        if state.abandoned is not None:
            where = (f"during step {state.abandoned['step']}, abandoned at {state.abandoned['at']}: the run stands "
                     f"{where[:-1]};")
        print(f"curvlab: interrupted by {state.stopped_by} {where} {saved}", file=sys.stderr)
    if state.writer:
        print(f"curvlab: results in {state.out}")
    return RunResult(status, state.out, state.step, state.epoch, summary)


def _record_failure(state: RunState | None, out: Path, exc: BaseException, writer: bool,
                    signals: StopSignals) -> BaseException:
    """summary.json for a run that ended with an exception (status "error", or "interrupted" for a second Ctrl-C),
    with the exit code run.py will end with; returns the exception to raise (a second Ctrl-C while the metric files
    are closed replaces `exc`)."""
    try:
        if state is not None:
            state.metrics.close(failed=True)
    except KeyboardInterrupt as stopped:  # a second Ctrl-C while closing (e.g. W&B's upload): stopped at once
        exc = stopped
    signals.seal()  # the outcome is decided: a stop signal from here on changes nothing
    if not writer:
        return exc
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "error"
    error = f"{type(exc).__name__}: {exc}"
    code = exit_code_for(exc)
    summary = state.summary(status, error, code) if state is not None else {"status": status, "error": error,
                                                                            "exit_code": code}
    try:
        write_summary(out, summary)
    except OSError:
        pass  # a full disk: the error being raised already says so
    return exc


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
    every = trainer.progress_every_seconds
    if every is not None and not every > 0:
        raise ValueError(f"trainer.progress_every_seconds={every} must be a positive number of seconds (or null: no "
                         "progress lines inside a step).")
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


def budget_line(trainer: DictConfig, steps_per_epoch: int) -> tuple[int, str, bool]:
    """(total steps, the start-up line that says which limit ends the run and when, whether it is a conflict).

    The run stops at the first of trainer.max_steps and trainer.max_epochs x steps per epoch. A conflict: max_steps
    is set (its default is null, so someone chose it) but max_epochs ends the run before it (logged as a WARNING)."""
    epochs, steps = trainer.max_epochs, trainer.max_steps
    by_epochs = None if epochs is None else epochs * steps_per_epoch
    epoch_limit = f"trainer.max_epochs={epochs} x {steps_per_epoch} steps per epoch"
    if steps is None:
        return by_epochs, f"budget: stops after {by_epochs} steps: {epoch_limit}.", False
    if by_epochs is None:
        return steps, (f"budget: stops after {steps} steps: trainer.max_steps={steps} "
                       f"({steps / steps_per_epoch:.4g} epochs of {steps_per_epoch} steps)."), False
    if by_epochs < steps:
        return by_epochs, (f"budget: stops after {by_epochs} steps: {epoch_limit} comes before "
                           f"trainer.max_steps={steps}; set trainer.max_epochs=null to run {steps} steps."), True
    ties = "ends together with" if by_epochs == steps else "comes before"
    return steps, f"budget: stops after {steps} steps: trainer.max_steps={steps} {ties} {epoch_limit}.", False


def _data_root(path: str) -> str:
    """`path` with `~` and environment variables expanded, relative to the launch folder, normalised."""
    return os.path.normpath(hydra.utils.to_absolute_path(os.path.expanduser(os.path.expandvars(path))))


def _execution_line(execution: dict[str, Any], samples: int, trainer: DictConfig) -> str:
    """The start-up line saying how the model computes (precision, channels-last, torch.compile)."""
    autocast = execution["autocast_dtype"]
    line = (f"execution: precision {execution['precision']}"
            + (f" (autocast {autocast} on {execution['device_type']})" if autocast else "")
            + f", channels_last {'on' if execution['channels_last_applied'] else 'off'}"
            + f", objective.compile {'on' if execution['compile'] else 'off'}")
    batch = trainer.batch_size
    if execution["compile"] and trainer.batching != "full" and batch and samples % batch and not trainer.drop_last:
        line += (f"; the last batch of each epoch ({samples % batch} samples) compiles once more "
                 "(trainer.drop_last=true avoids it)")
    return line


def _objective_options(options: DictConfig, device: torch.device) -> dict[str, Any]:
    """The `objective` keys, checked against `Objective`'s keyword arguments (the batch is supplied per step) and,
    for `objective.compile`, against what torch.compile needs on `device`."""
    batch = ("model", "loss_fn", "inputs", "targets", "global_batch_size")
    options = OmegaConf.to_container(options, resolve=True)
    micro = options.pop("micro_batch_size", None)
    checked = check_call("objective", Objective, options, supplied=batch)
    check_compile(checked.get("compile", False), checked.get("ggn_backend", "auto"), device)  # before any step
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
