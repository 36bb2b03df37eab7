"""Curvature diagnostics: the one registry of their names (`DIAGNOSTICS`, used by the training loop and by
curvlab-diagnose, runner/diagnose.py) and the `diagnostics` config group that runs them during training
(conf/diagnostics/; the math lives in optimizers/diagnostics).

Names: hessian_top, hessian_bottom, ggn_top, hessian_trace, ggn_trace, hessian_density, ggn_density, taylor,
gradcheck (during training and in the script), surface and hessian_explicit (the script only: plots, an explicit
numel^2 matrix). The script also takes its shorthands spectrum, density, trace and full (`SHORTHANDS`).

Every `diagnostics.every` steps (and after the last step, `at_end`) the chosen diagnostics (`what`) run on a FIXED
diagnostic batch: `batch_size` training samples drawn once, by a generator seeded with `diagnostics.seed` that
nothing else uses, and held on the device. In a data-parallel run every rank holds its shard of that batch (the
shards of `data.batching.shard_bounds`) and the Objective averages over the whole of it (`global_batch_size`), so the
products are those of the global batch on every rank and all ranks run the same diagnostics at the same step.

The diagnostics run after the step has been recorded, inside `isolated(model)` (buffers, gradients and the global
RNG restored on exit) with the network in `mode` (eval by default), on an objective built as the run builds its own
(in micro-batches with `objective.micro_batch_size`) but without a curvature sub-batch.
Their probes come from private generators seeded with `diagnostics.seed`, so the training trajectory continues bit
for bit as without them, and a resumed run repeats them exactly (nothing of theirs needs to be in the checkpoint).
Outputs:

* the step's metric row gains `diag/<name>` for every scalar of the records' `scalars()` (`diag/hessian_top1`,
  `diag/ggn_trace`, `diag/taylor_slope2`, ...; a diagnostic's seconds as `diag/<name>_time`), `diag/loss` (the loss
  on the diagnostic batch) and `diag/time` (the whole evaluation, kept out of `wall_time` and `step_time`);
* `diagnostics.jsonl` in the run folder (rank 0): one JSON record per evaluation with every record's `to_dict()`
  (eigenvalues, residuals, trace samples, density nodes and weights, Taylor remainders; no parameter-sized vectors),
  appended one complete line at a time like metrics.jsonl and cut back to the checkpoint's step on resume;
* a WARNING in the log, once, when a Taylor test's slopes are nan or rest on too few points (`taylor_note`: in
  float32 the remainders sink below round-off; the record in diagnostics.jsonl carries the same `note`).
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch
from torch.utils.data import Dataset

from data.base import TensorPairDataset
from data.batching import shard_bounds
from optimizers import diagnostics as diag
from optimizers.diagnostics import probes
from validation.checks import (Options, boolean, fail, nonnegative_int, one_of, optional, option, positive_int,
                               sequence_of)
from optimizers.diagnostics.results import Record
from optimizers.objective import Objective
from runner.checkpoint import atomic_write_bytes
from runner.device import synchronize
from runner.distributed import rank, world_size
from runner.metrics import JSONLSink
from runner.seeding import rng_states, set_rng_states

log = logging.getLogger("curvlab")

if TYPE_CHECKING:
    from runner.resume import Resume
    from runner.state import RunState

FILE = "diagnostics.jsonl"


def _eigenpairs(curvature: str, which: str) -> Callable:
    return lambda obj, o: diag.eigenpairs(obj, k=o.k, which=which, curvature=curvature, seed=o.seed)


def _trace(curvature: str) -> Callable:
    def run(obj: Objective, o: DiagnosticsOptions) -> Record:
        estimator = diag.hutchpp_trace if o.trace_method == "hutch++" else diag.hutchinson_trace
        return estimator(obj, o.probes, curvature, seed=o.seed)
    return run


def _density(curvature: str) -> Callable:
    return lambda obj, o: diag.spectral_density(obj, o.slq_probes, o.slq_steps, curvature, seed=o.seed)


def _taylor(obj: Objective, o: DiagnosticsOptions, direction: torch.Tensor | None = None,
            distances: torch.Tensor | None = None) -> Record:
    return diag.taylor_test(obj, direction=direction, distances=distances, seed=o.seed)


def _surface(obj: Objective, o: DiagnosticsOptions, radius: float = 1.0, grid: int = 21,
             top: diag.Eigenpairs | None = None) -> Record:
    """The loss on a grid**2 square of side 2 radius along the top-2 Hessian eigenvectors (seed 000 Fig. 15.1)."""
    top = top if top is not None and len(top.eigenvalues) >= 2 else diag.eigenpairs(obj, k=max(2, o.k), seed=o.seed)
    axis = torch.linspace(-radius, radius, grid)
    return diag.loss_surface(obj, (top.eigenvectors[0], top.eigenvectors[1]), axis, axis)


def _explicit_hessian(obj: Objective, o: DiagnosticsOptions) -> dict[str, Any]:
    """The explicit Hessian (``Objective.hessian_matrix``, numel^2 memory): its eigenvalues, and seed 000's check of
    the Hessian-vector product against it (sec. 14.2): ||H s - Hv(s)||_2 for s ~ N(0, I)."""
    t0 = time.perf_counter()
    hessian = obj.hessian_matrix(chunk_size=max(1, min(512, 25_600 // obj.inputs.shape[0])))  # columns per vmap
    seconds = time.perf_counter() - t0
    values = torch.linalg.eigvalsh(hessian.double())
    s = probes.draw(obj.numel, probes.generator(o.seed), hessian.dtype, hessian.device, "gaussian")
    explicit, product = hessian @ s, obj.hvp(s)
    remainder = float((explicit - product).norm())
    return {"full_spectrum": {"eigenvalues": values.tolist(), "numel": obj.numel, "seconds": seconds},
            "hvp_check": {"remainder_norm": remainder, "relative": remainder / float(explicit.norm()),
                          "direction_norm": float(s.norm()), "dtype": str(hessian.dtype).split(".")[1]}}


@dataclass(frozen=True)
class Diagnostic:
    """One named diagnostic: `run(objective, options, **extra)` -> a record (`to_dict()`, `scalars()`), with
    `options` a DiagnosticsOptions (k, probes, trace_method, slq_probes, slq_steps, seed). `in_run`: whether the
    training loop may run it (the others make plots or an explicit numel^2 matrix: curvlab-diagnose only)."""

    summary: str
    run: Callable[..., Any]
    in_run: bool = True


# The one registry of diagnostics, for the training loop (diagnostics.what) and curvlab-diagnose (runner/diagnose.py).
DIAGNOSTICS: dict[str, Diagnostic] = {
    "hessian_top": Diagnostic("the k largest Hessian eigenvalues and eigenvectors (Lanczos)",
                              _eigenpairs("hessian", "largest")),
    "hessian_bottom": Diagnostic("the k smallest Hessian eigenvalues (Lanczos)", _eigenpairs("hessian", "smallest")),
    "ggn_top": Diagnostic("the k largest GGN eigenvalues (Lanczos)", _eigenpairs("ggn", "largest")),
    "hessian_trace": Diagnostic("tr(H), Hutchinson or Hutch++ (trace_method)", _trace("hessian")),
    "ggn_trace": Diagnostic("tr(G), Hutchinson or Hutch++ (trace_method)", _trace("ggn")),
    "hessian_density": Diagnostic("the Hessian's spectral density (stochastic Lanczos quadrature)",
                                  _density("hessian")),
    "ggn_density": Diagnostic("the GGN's spectral density (stochastic Lanczos quadrature)", _density("ggn")),
    "taylor": Diagnostic("seed 000's Taylor test: remainders of the 0th-, 1st- and 2nd-order models and their slopes "
                         "(1, 2, 3 when gradient and Hessian are right; needs float64)", _taylor),
    "gradcheck": Diagnostic("seed 001's finite-difference check of the gradient (float64)",
                            lambda obj, o: diag.gradient_check(obj, seed=o.seed)),
    "surface": Diagnostic("the loss along the top-2 Hessian eigenvectors (seed 000 Fig. 15.1; plots)", _surface,
                          in_run=False),
    "hessian_explicit": Diagnostic("the explicit Hessian: its full spectrum and a check of the Hessian-vector "
                                   "product against it (seed 000 sec. 14.2; numel^2 memory)", _explicit_hessian,
                                   in_run=False),
}
IN_RUN = tuple(name for name, d in DIAGNOSTICS.items() if d.in_run)

# Shorthands curvlab-diagnose has always accepted, each a list of registry names. Not accepted in diagnostics.what,
# where conf/diagnostics/{spectrum,trace,full}.yaml are presets with other contents.
SHORTHANDS: dict[str, tuple[str, ...]] = {
    "spectrum": ("hessian_top", "hessian_bottom", "ggn_top"),
    "density": ("hessian_density",),
    "trace": ("hessian_trace", "ggn_trace"),
    "full": ("hessian_explicit",),
}


def _in_run_name(key: str, value: Any) -> str:
    """A name for diagnostics.what: in the registry and allowed during training."""
    if value in DIAGNOSTICS and not DIAGNOSTICS[value].in_run:
        fail(key, value, f"runs only in curvlab-diagnose <run folder> {value} (it needs plots or an explicit matrix). "
                         f"During training choose from: {', '.join(IN_RUN)}.")
    if value not in IN_RUN:
        fail(key, value, f"is not one of: {', '.join(IN_RUN)}.")
    return value


def taylor_note(test: diag.TaylorTest) -> str | None:
    """Why a Taylor test's slopes are nan or rest on few points (the remainders fell below the round-off floor of
    its dtype, 1000 eps |L0|: nothing a slope can be fitted to), or None when every slope used 3 points or more."""
    used = [int(n) for n in test.fitted.sum(dim=1)]
    if min(used) >= 3:
        return None
    dtype = test.direction.dtype
    floor = 1e3 * torch.finfo(dtype).eps * max(abs(test.loss), torch.finfo(dtype).tiny)
    points = test.distances.numel()
    slopes = ", ".join(f"slope{k} {'nan' if n < 2 else f'{float(test.slopes[k]):.2f}'} from {n} of {points} points"
                       for k, n in enumerate(used) if n < 3)
    hint = ("; run it in float64 (curvlab-diagnose --dtype float64; in a run, dtype=float64)"
            if dtype != torch.float64 else "; use larger distances (curvlab-diagnose --h-min -3)")
    name = str(dtype).removeprefix("torch.")
    return (f"Taylor test in {name}: {slopes}: the remainders fell below {name}'s round-off floor (1000 eps |L0| = "
            f"{floor:.1e}), under which they are rounding noise, so these slopes are nan or unreliable{hint}.")


@dataclass(frozen=True)
class DiagnosticsOptions(Options):
    """The keys of the `diagnostics` group (conf/diagnostics/none.yaml lists them at these defaults)."""

    group: ClassVar[str] = "diagnostics"

    what: list = option([], sequence_of(_in_run_name))                # which diagnostics (IN_RUN)
    every: Optional[int] = option(None, optional(positive_int))        # steps between evaluations; None = never
    at_end: bool = option(True, boolean)                              # also after the last step
    batch_size: int = option(1000, positive_int)                      # the fixed diagnostic (global) batch
    seed: int = option(0, nonnegative_int)                            # the batch draw's and the probes' seed
    mode: str = option("eval", one_of("eval", "train"))               # the network's mode during diagnostics
    k: int = option(2, positive_int)                                  # eigenpairs per end (Lanczos)
    probes: int = option(20, positive_int)                            # products per trace estimate
    trace_method: str = option("hutchinson", one_of("hutchinson", "hutch++"))
    slq_probes: int = option(3, positive_int)                         # SLQ probes ...
    slq_steps: int = option(30, positive_int)                         # ... and Lanczos steps per probe

    def validate(self) -> None:
        if self.what and self.every is None:
            fail("diagnostics.what", self.what, "needs diagnostics.every=N, the steps between two evaluations.")
        if self.every is not None and not self.what:
            fail("diagnostics.every", self.every, "runs nothing: diagnostics.what is empty. Choose a preset "
                 "(diagnostics=spectrum, trace or full) or list them, e.g. diagnostics.what=[hessian_top,ggn_trace].")
        if self.trace_method == "hutch++" and self.probes < 3:
            fail("diagnostics.probes", self.probes, "must be at least 3 with diagnostics.trace_method=hutch++.")


def diagnostics_options(node: Any) -> DiagnosticsOptions:
    """The checked `diagnostics` group (a config node or dict; None = off). Unknown keys name the valid ones."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    return DiagnosticsOptions.build("the diagnostics group", values)


def diagnostic_batch(train: Dataset, size: int, seed: int, shard: tuple[int, int], device: torch.device,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard of `size` training samples drawn without replacement by a generator seeded with `seed`.

    Samples of a dataset read through a DataLoader (augmented images) are made by its transforms once, here, with
    every global random state saved and restored around them, so the draw leaves the training stream untouched."""
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:size]  # (size,)
    low, high = shard_bounds(size, *shard)
    mine = index[low:high]
    if isinstance(train, TensorPairDataset):
        part = TensorPairDataset(train.inputs[mine], train.targets[mine])
    else:
        states = rng_states()
        try:
            samples = [train[int(i)] for i in mine]
        finally:
            set_rng_states(states)
        targets = [torch.as_tensor(s[1]) for s in samples]
        part = TensorPairDataset(torch.stack([torch.as_tensor(s[0]) for s in samples]), torch.stack(targets))
    part = part.to(device, dtype)
    return part.inputs, part.targets


class Diagnostics:
    """The in-loop diagnostics of one run: `after_step(state)` is the loop's one call, every step."""

    def __init__(self, options: DiagnosticsOptions, train: Dataset, model: torch.nn.Module, loss_fn: Any,
                 make_objective: Callable[..., Any], objective_options: dict[str, Any], out: Path | None,
                 resume: Resume | None) -> None:
        """`make_objective(model, loss_fn, x, y, **objective_options, global_batch_size=...)`: how the run builds its
        objectives (runner.train.make_objective: whole, or in micro-batches); `out`: the run folder on the rank that
        writes files (None on the others); `resume`: runner.resume.Resume or None. Checks the options against the
        split and the model (OptionError naming the key)."""
        self.options, self.loss_fn, self.make_objective = options, loss_fn, make_objective
        self.path: Path | None = None  # diagnostics.jsonl, on the rank that writes files
        self.noted = False  # the Taylor test's round-off note was logged
        if options.every is None:
            return
        if options.batch_size > len(train):
            fail("diagnostics.batch_size", options.batch_size,
                 f"is larger than the training split ({len(train)} samples); choose at most {len(train)}.")
        if options.batch_size < world_size():
            fail("diagnostics.batch_size", options.batch_size,
                 f"leaves a rank without data: the batch is shared by {world_size()} ranks.")
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if options.k > numel and any(w.endswith(("_top", "_bottom")) for w in options.what):
            fail("diagnostics.k", options.k, f"exceeds the model's {numel} parameters.")
        first = next(model.parameters())
        self.inputs, self.targets = diagnostic_batch(train, options.batch_size, options.seed,
                                                     (rank(), world_size()), first.device, first.dtype)
        self.objective_options = {k: v for k, v in objective_options.items() if k != "curvature_batch_size"}
        if out is not None:
            self.path, self.records = out / FILE, records_to_keep(resume, out)
            JSONLSink(self.path, keep_rows=self.records or None).close()  # a new file, or the checkpoint's records

    def due(self, step: int, done: bool) -> bool:
        every = self.options.every
        return every is not None and (step % every == 0 or (done and self.options.at_end))

    def after_step(self, state: RunState) -> None:
        """When due: run the diagnostics on the current parameters, add their scalars to the step's (pending) row
        and write their records to diagnostics.jsonl. Skipped when the step's loss is not finite."""
        row, device = state.row, state.device
        if not self.due(state.step, state.done) or not math.isfinite(float(row.get("loss", 0.0))):
            return
        synchronize(device)
        t0 = time.perf_counter()
        loss, records = self.evaluate(state.model, self.loss_fn)
        synchronize(device)
        seconds = time.perf_counter() - t0
        row.update(metric_scalars(loss, records, seconds))
        if device.type == "cuda":  # the diagnostics' peak, kept out of the next step's memory/peak_mb
            row["diag/peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            torch.cuda.reset_peak_memory_stats(device)
        dumped = {name: record.to_dict() for name, record in records.items()}
        note = taylor_note(records["taylor"]) if "taylor" in records else None
        if note is not None:
            dumped["taylor"]["note"] = note
            if not self.noted:  # once per run: the reason does not change from one evaluation to the next
                log.warning(f"diagnostics at step {state.step}: {note}")
                self.noted = True
        if self.path is not None:
            self.write({"step": state.step, "epoch": state.epoch, "batch_size": self.options.batch_size,
                        "mode": self.options.mode, "loss": loss, "time": seconds, **dumped})

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as one complete, fsynced line (JSONLSink: a failed write is cut off again)."""
        sink = JSONLSink(self.path, keep_rows=self.records)  # reopened per record: no file stays open after a run
        try:
            sink.log(record)
            sink.sync()
        finally:
            sink.close()
        self.records += 1

    def evaluate(self, model: torch.nn.Module, loss_fn: Any) -> tuple[float, dict[str, Record]]:
        """(loss on the diagnostic batch, {name: record}) at the current parameters; the model is left as it was."""
        modes = {module: module.training for module in model.modules()}
        with diag.isolated(model):
            model.train(self.options.mode == "train")
            try:
                objective = self.make_objective(model, loss_fn, self.inputs, self.targets, **self.objective_options,
                                                global_batch_size=self.options.batch_size)
                loss = float(objective.loss())
                records = {name: DIAGNOSTICS[name].run(objective, self.options) for name in self.options.what}
            finally:
                for module, training in modes.items():
                    module.training = training
        return loss, records


def metric_scalars(loss: float, records: dict[str, Record], seconds: float) -> dict[str, float]:
    """`diag/<scalar>` for every record's scalars (`*_seconds` renamed `*_time`), plus diag/loss and diag/time."""
    out = {"diag/loss": loss, "diag/time": seconds}
    for record in records.values():
        for key, value in record.scalars().items():
            name = key.removesuffix("_seconds") + "_time" if key.endswith("_seconds") else key
            out[f"diag/{name}"] = value
    return out


def records_to_keep(resume: Resume | None, out: Path) -> int:
    """How many records of diagnostics.jsonl a resumed run keeps: those up to the checkpoint's step (copied into
    `out` first when it resumes another folder). 0 for a fresh run."""
    if resume is None:
        return 0
    source = resume.folder / FILE
    lines = source.read_bytes().split(b"\n")[:-1] if source.exists() else []   # complete lines only
    kept = [line for line in lines if json.loads(line)["step"] <= resume.step]
    if kept and resume.folder != out:
        atomic_write_bytes(out / FILE, b"".join(line + b"\n" for line in kept))
    return len(kept)
