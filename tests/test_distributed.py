"""Data parallelism of the library: every method on 2 real gloo ranks equals the single-process run on the same global
batch, and the ranks hold bitwise identical parameters after every step.

Each rank takes its shard of the global batch (``tensor_split``, so 7 samples split 4/3); the Objective's one weighted
all-reduce turns every local batch mean into the global one. Processes are real (``torch.multiprocessing.spawn``,
gloo over a file store). The methods and their options come from the one registry (tests/registry.py,
``Method.equivalence``).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from optimizers import SGD, Objective
from optimizers.vec import params_vector
from tests import registry

WORLD = 2
STEPS = 4
METHODS = {f"{name}_{variant}" if variant else name: (name, options)  # id -> (the choice, options on top of it)
           for name, method in registry.METHODS.items() for variant, options in method.equivalence.items()}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# torch's strong-Wolfe search (L-BFGS) fits cubics through loss and slope values; in float32 that amplifies the 1e-7
# rounding difference between one batch mean and the weighted sum of two shard means to ~3e-4 after one step
# (float64 agrees to 1e-10, so the mathematics is the same).
# The same holds for methods whose step amplifies rounding: SOAP's eigenbases (a statistics matrix with close
# eigenvalues) and Shampoo's inverse 4th roots. Measured in one float32 process by permuting the batch's samples
# (a rounding-level change of the gradient): SOAP 3e-4 to 1.8e-3 over 4 steps, Shampoo 2e-5 (float64: 7e-12, 9e-14),
# and, measured the same way (5 permutations, 2026-12-07): plain Newton (explicit solve of an ill-conditioned Hessian,
# then Armijo) 4.9e-5, NLCG (its line search and PR+ beta) 7.3e-5, L-BFGS 5.1e-4 (float64: 1e-14 and below).
FLOAT32_LINE_SEARCH_TOL = {"lbfgs": 1e-3, "soap": 1e-2, "shampoo": 2e-4, "newton": 2e-4, "nlcg": 2e-4}


def problem(dtype: torch.dtype, batch: int):
    registry.seed_draws(0)  # the same draws on every rank and in the single process (PSGD's probes)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(batch, 6, generator=g, dtype=dtype), torch.randint(0, 3, (batch,), generator=g))
               for _ in range(STEPS)]
    return model, batches


def train(name: str, dtype: torch.dtype, batch: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """Parameters after each step; rank r of ``world`` steps on its shard of every global batch."""
    choice, options = METHODS[name]
    model, batches = problem(dtype, batch)
    torch.manual_seed(1000 + rank)  # as the runner does (rank-dependent dropout masks): a method's own draws must not
    opt = registry.make(choice, model.parameters(), **options)  # depend on the rank (PSGD: optimizers/torch_optim.py)
    opt.configure(total_steps=STEPS)
    trajectory = []
    for x, y in batches:
        xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
        opt.step(Objective(model, "cross_entropy", xs, ys, global_batch_size=batch))
        trajectory.append(params_vector(model.parameters()))
    return trajectory


def _worker(rank: int, store: str, dtype: torch.dtype, batch: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        torch.save({name: train(name, dtype, batch, rank, WORLD) for name in METHODS}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@functools.lru_cache(maxsize=None)
def _spawned(dtype: torch.dtype, batch: int, tmp: str) -> list[dict[str, list[torch.Tensor]]]:
    """Every method's trajectory on each of the 2 ranks (one spawn of real processes per dtype)."""
    out = f"{tmp}/dp-{str(dtype).split('.')[1]}-{batch}"
    mp.spawn(_worker, args=(f"{out}.store", dtype, batch, out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.float32, marks=pytest.mark.slow)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(METHODS))
def test_two_ranks_equal_one_process_on_the_same_global_batch(name, dtype, tmp_path_factory):
    batch = 7  # uneven shards (4 and 3): the weighted reduction, not a plain average, gives the global mean
    ranks = [r[name] for r in _spawned(dtype, batch, str(tmp_path_factory.getbasetemp()))]
    single = train(name, dtype, batch)
    for step, reference in enumerate(single):
        assert torch.equal(ranks[0][step], ranks[1][step]), f"ranks differ at step {step + 1}"
        err = ((ranks[0][step] - reference).norm() / reference.norm()).item()
        tol = FLOAT32_LINE_SEARCH_TOL.get(name, TOL[dtype]) if dtype == torch.float32 else TOL[dtype]
        assert err < tol, f"step {step + 1}: relative difference {err:.2e} from the single-process run"


# ---------------------------------------------------------------------------------------------- through the runner
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.runs import REPO, env  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")
RUN = ["device=cpu", "threads=1", "dtype=float64", "trainer.max_steps=6", "trainer.max_epochs=null",
       "trainer.eval_every=3", "trainer.batch_size=99"]  # 99 = 50 + 49 per rank: uneven shards


def _run(args: list[str], out: Path, ranks: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    launcher = [str(TORCHRUN), "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable]
    return subprocess.run([*launcher, str(REPO / "run.py"), *RUN, *args, f"hydra.run.dir={out}"], cwd=out.parent,
                          env=env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=timeout)


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["hf", "curveball", "sgd"])
def test_torchrun_two_ranks_give_the_single_process_metrics(optimizer, tmp_path):
    """The same config on 1 process and on 2 torchrun ranks: the same losses, CG iterations and (sharded,
    all-reduced) test metrics; each step's row carries its all-reduce count, bytes and time."""
    # HF's curvature mini-batch is each rank's first quarter of its shard, another subsample than one process's first
    # quarter of the batch (docs/run/distributed.md): on the whole batch the two runs are the same mathematics.
    args = [f"optimizer={optimizer}"] + (["optimizer.curvature_fraction=1.0"] if optimizer == "hf" else [])
    one, two = _run(args, tmp_path / "one"), _run(args, tmp_path / "two", 2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout.count("curvlab: results in ") == 1  # only rank 0 reports
    for a, b in zip(_rows(tmp_path / "one"), _rows(tmp_path / "two"), strict=True):
        assert a["samples_seen"] == b["samples_seen"]
        for key in ("loss", "eval/loss", "eval/accuracy", "damping", "beta"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-10, abs=1e-12), (a["step"], key)
        assert a.get("cg/iters") == b.get("cg/iters")
        assert b["comm/all_reduces"] >= 1 and b["comm/bytes"] > 0 and "comm/time" in b


class FailOnRank1(SGD):
    """SGD that raises on rank 1 at its second step (a rank that fails)."""

    def update(self, objective):
        if dist.get_rank() == 1 and self.steps == 1:
            raise RuntimeError("injected failure")
        return super().update(objective)


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_quickly_and_is_named(tmp_path):
    t0 = time.monotonic()
    result = _run(["optimizer._target_=tests.test_distributed.FailOnRank1", "optimizer.lr=0.01"], tmp_path / "run", 2,
                  timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - t0 < 60
    assert "curvlab: rank 1 of 2: failed with RuntimeError: injected failure" in result.stderr


def _buffers_worker(rank: int, store: str, out: str) -> None:
    from runner.distributed import average_buffers, broadcast_model

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)  # different initial weights per rank
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
        broadcast_model(model)
        model(torch.randn(8, 3, dtype=torch.float64))  # per-rank batch statistics move the running averages apart
        before = model[1].running_mean.clone()
        average_buffers(model)
        torch.save({"weight": model[0].weight.detach(), "before": before, "after": model[1].running_mean}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_parameters_are_broadcast_and_batch_norm_statistics_averaged(tmp_path):
    mp.spawn(_buffers_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(WORLD))
    torch.manual_seed(0)
    assert torch.equal(r0["weight"], r1["weight"]) and torch.equal(r0["weight"], nn.Linear(3, 4).double().weight)
    assert not torch.equal(r0["before"], r1["before"])
    assert torch.equal(r0["after"], r1["after"])
    assert torch.allclose(r0["after"], (r0["before"] + r1["before"]) / 2, rtol=0, atol=1e-15)
