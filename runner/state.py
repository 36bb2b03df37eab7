"""`RunState`: everything one training run carries from step to step, and the checkpoint made from it.

The loop (runner/train.py) advances it (`record_step`, `add_evaluation`, `flush_rows`); the diagnostics
(runner/diagnostics.py) read its step and add to its current `row`; a resumed run (runner/resume.py) is rebuilt from
the same config and then put back with `restore(saved)`; summary.json is `summary(status)`. Nothing else reads or
writes its fields one by one.

What a checkpoint holds (`capture()`, written by `save_checkpoint()`; runner/checkpoint.py writes it atomically and
reads it with `weights_only=True`), format 1:

    model       the model's parameters and buffers (state_dict)
    optimizer   the optimiser's state_dict
    progress    step, epoch, samples_seen, wall_time (seconds of training steps only)
    metrics     rows (metrics.jsonl's row count), pending (rows not yet written), last_row, last_eval,
                best_accuracy, train_losses (the batch losses since the last evaluation, for train/loss)
    rng         a list indexed by rank: Python's, NumPy's, torch's CPU and CUDA generator states and the batch order
                (the shuffling generator at the epoch start and the position in the epoch)
    world_size  the number of ranks that wrote it
    config      the resolved config (a resume must match it but for the budget: runner/resume.py)
    wandb       the W&B run (id, group, mode) or None
    format      the layout version (runner.checkpoint.FORMAT)

Restored in that order (the random generators last), a resumed run repeats the uninterrupted run bit for bit.

The eval point (`eval_point()`): evaluation and checkpoints happen inside the optimiser's `eval_point()`, so that a
method whose iterate is not the point to evaluate (Schedule-Free: the average x, while it trains at y) is evaluated
and saved there; `model` in a checkpoint is then x and the optimiser's state holds y. Batch-norm running statistics
are recomputed at that point from the first `optimizer.eval_point_bn_batches` training batches (`bn_batches`, in
stored order) and put back on leaving it, parameters included, bit for bit: evaluating never changes the training
trajectory. (A resumed run starts with the eval point's statistics; nothing reads them before the next evaluation,
which recomputes them from scratch.) For every other method `eval_point()` does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runner.checkpoint import save_checkpoint
from runner.distributed import gather, rank, world_size
from runner.errors import STATUS_CODES
from runner.evaluate import batch_norms, recompute_batch_norm
from runner.metrics import MetricsLogger, first_nonfinite
from runner.seeding import rng_states, set_rng_states
from runner.wandb_sink import WandbSink



@dataclass
class RunState:
    """The state of one run. The first fields are what the run is made of (built once by runner.train); the others
    are the counters and the metric bookkeeping the loop advances."""

    model: torch.nn.Module
    optimizer: Any                    # optimizers.base.Optimizer (state_dict / load_state_dict)
    train_batches: Any                # data.batching: iterable of (inputs, targets), len() = batches per epoch
    metrics: MetricsLogger
    total_steps: int                  # the budget: min(max_steps, max_epochs x batches per epoch)
    device: torch.device              # where the model and the batches are
    out: Path                         # the run folder
    writer: bool                      # this rank writes files (rank 0)
    config: dict[str, Any]            # the resolved config, saved in every checkpoint
    # progress
    step: int = 0
    samples_seen: int = 0
    wall_time: float = 0.0            # seconds of training steps only (no evaluation, logging, checkpoints)
    # metric bookkeeping
    last_row: dict[str, Any] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)       # eval/* and train/* of the last evaluation
    best_accuracy: float | None = None
    train_losses: list[Any] = field(default_factory=list)  # batch losses since the last evaluation (on the device)
    # how the run ends, and where it came from
    diverged_row: dict[str, Any] | None = None
    stopped_by: str | None = None     # the stop signal's name
    abandoned: dict[str, Any] | None = None  # the step a stop signal abandoned: {"step": n, "at": "CG iteration 12 ..."}
    stop_reason: str | None = None    # why a run with status ok ended early (runner/stopping.py) or its budget
    checkpoint_step: int | None = None
    resumed_from: dict[str, Any] | None = None
    bn_batches: Any = None            # training batches in stored order, to recompute batch norm at the eval point

    # ------------------------------------------------------------------ reading
    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_batches)

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps or self.stop_reason is not None

    @property
    def diverged(self) -> bool:
        return self.diverged_row is not None

    @property
    def row(self) -> dict[str, Any]:
        """The current step's metric row, not yet written (the evaluation and the diagnostics add to it)."""
        return self.metrics.pending[-1]

    # ------------------------------------------------------------------ the loop
    def record_step(self, stats: dict[str, Any], step_time: float, batch_size: int, **columns: Any) -> None:
        """Count one optimiser step and start its row: step, epoch, samples_seen, wall_time, step_time, `columns`
        (e.g. the peak memory), then the optimiser's `stats` (its loss stays a device tensor: no synchronisation)."""
        self.step += 1
        self.samples_seen += batch_size
        self.wall_time += step_time
        row = {"step": self.step, "epoch": self.epoch, "samples_seen": self.samples_seen,
               "wall_time": self.wall_time, "step_time": step_time, **columns}
        for key, value in stats.items():
            row.setdefault(key, value)
        if "loss" in stats:
            self.train_losses.append(stats["loss"])
        self.metrics.record(row)

    def add_evaluation(self, values: dict[str, float]) -> None:
        """Add train/loss (the mean batch loss since the last evaluation) and `values` (eval/*) to the current row."""
        row = self.row
        if self.train_losses:
            row["train/loss"] = sum(self.train_losses) / len(self.train_losses)
        self.train_losses = []
        row.update(values)

    def flush_rows(self) -> list[dict[str, Any]]:
        """Write the pending rows and return them (as Python numbers); keep the last row, the last evaluation and
        the best accuracy, and note the first non-finite loss (`diverged`)."""
        rows = self.metrics.flush()
        if not rows:
            return rows
        self.last_row = rows[-1]
        for row in rows:
            if "eval/loss" in row:
                self.last_eval = {k: v for k, v in row.items() if k.startswith(("eval/", "train/"))}
                accuracy = row.get("eval/accuracy")
                if accuracy is not None and (self.best_accuracy is None or accuracy > self.best_accuracy):
                    self.best_accuracy = accuracy
        self.diverged_row = self.diverged_row or first_nonfinite(rows)
        return rows

    @contextlib.contextmanager
    def eval_point(self) -> Iterator[None]:
        """The model at the optimiser's eval point, with batch-norm statistics recomputed there (module docstring);
        everything back as it was on leaving."""
        hook = getattr(self.optimizer, "eval_point", None)  # optimizers.base.Optimizer has it (a no-op by default)
        with hook() if hook is not None else contextlib.nullcontext():
            count = getattr(self.optimizer, "eval_point_bn_batches", 0)
            norms = batch_norms(self.model) if count and self.bn_batches is not None else []
            saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
            try:
                if norms:
                    recompute_batch_norm(self.model, self.bn_batches, count)
                yield
            finally:
                for m, state in zip(norms, saved):
                    m.load_state_dict(state)

    # ------------------------------------------------------------------ checkpoints
    def capture(self) -> dict[str, Any]:
        """What `restore` needs, from every rank (a collective call: the random states are gathered)."""
        ranks = gather({**rng_states(), "batches": self.train_batches.state_dict()})
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": {"step": self.step, "epoch": self.epoch, "samples_seen": self.samples_seen,
                         "wall_time": self.wall_time},
            "metrics": {"rows": self.metrics.rows_written, "pending": self.metrics.pending_rows(),
                        "last_row": self.last_row, "last_eval": self.last_eval, "best_accuracy": self.best_accuracy,
                        "train_losses": [torch.as_tensor(loss).detach().cpu() for loss in self.train_losses]},
            "rng": ranks,  # indexed by rank
            "world_size": world_size(),
            "config": self.config,
            "wandb": self.wandb_info(),
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Put this state (freshly built from the same config) where the checkpoint `saved` left it; the random
        generators last."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        progress, metrics = saved["progress"], saved["metrics"]
        self.step, self.samples_seen, self.wall_time = progress["step"], progress["samples_seen"], progress["wall_time"]
        self.last_row, self.last_eval = metrics["last_row"], metrics["last_eval"]
        self.best_accuracy = metrics["best_accuracy"]
        self.train_losses = [loss.to(self.device) for loss in metrics["train_losses"]]
        self.metrics.restore_pending(metrics["pending"])
        mine = saved["rng"][rank()]
        self.train_batches.load_state_dict(mine["batches"])
        set_rng_states(mine)

    def before_step(self) -> dict[str, Any]:
        """Copies of what a step changes besides the counters and the metric rows (the parameters and buffers, the
        optimiser's state, the random generators, the batch order's position), taken between two steps, where a
        checkpoint would be taken: `undo_step` puts them back when a stop signal abandons the step
        (runner/progress.py)."""
        return {"model": {name: t.detach().clone() for name, t in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),  # a copy: every method's state_dict copies its tensors
                "rng": rng_states(), "batches": self.train_batches.state_dict()}

    def undo_step(self, saved: dict[str, Any]) -> None:
        """Put back what `before_step` saved: the run stands where it stood before the abandoned step."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.train_batches.load_state_dict(saved["batches"])
        set_rng_states(saved["rng"])
        for p in self.model.parameters():
            p.grad = None

    def save_checkpoint(self) -> None:
        """checkpoint.pt for the current step (rank 0 writes it; every rank contributes its random states)."""
        self.metrics.sync()  # the rows the checkpoint counts are on disk first
        with self.eval_point():  # the model is saved at the eval point; the optimiser's state holds the rest
            saved = self.capture()
            if self.writer:
                save_checkpoint(self.out, saved)
        self.checkpoint_step = self.step

    # ------------------------------------------------------------------ the outcome
    def wandb_info(self) -> dict[str, Any] | None:
        return next((sink.info for sink in self.metrics.sinks if isinstance(sink, WandbSink)), None)

    def summary(self, status: str, error: str | None = None, exit_code: int | None = None) -> dict[str, Any]:
        """summary.json: status ok | diverged | interrupted | error and the exit code run.py ends with (0, 3, 4 for
        the first three; for an error or a second Ctrl-C, the one of runner.errors.exit_code_for)."""
        summary = {
            "status": status,
            "exit_code": STATUS_CODES.get(status) if exit_code is None else exit_code,
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
            "abandoned_step": self.abandoned,
            "stop_reason": self.stop_reason if status == "ok" else None,
            "checkpoint_step": self.checkpoint_step,
            "resumed_from": self.resumed_from,
            "wandb": self.wandb_info(),
        }
        if error is not None:
            summary["error"] = error
        return summary
