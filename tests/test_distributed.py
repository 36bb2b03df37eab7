"""Data parallelism of the library: every method on 2 real gloo ranks equals the single-process run on the same global
batch, and the ranks hold bitwise identical parameters after every step.

Each rank takes its shard of the global batch (``tensor_split``, so 7 samples split 4/3); the Objective's one weighted
all-reduce turns every local batch mean into the global one. Processes are real (``torch.multiprocessing.spawn``,
gloo over a file store).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from optimizers import KFAC, LBFGS, NLCG, SGD, Adam, CurveBall, HessianFree, Newton, Objective
from optimizers.vec import params_vector

WORLD = 2
STEPS = 4
METHODS = {
    "sgd": (SGD, dict(lr=0.1)),
    "adam": (Adam, dict(lr=0.01)),
    "hf": (HessianFree, dict(weight_decay=1e-3)),
    "curveball": (CurveBall, dict(lambda_every=2)),
    "newton_cg": (Newton, dict(solver="cg", damping=1e-2)),
    "lbfgs": (LBFGS, dict()),
    "nlcg": (NLCG, dict()),
    "kfac": (KFAC, dict(fisher="empirical", inverse_every=2)),  # factors through the same one weighted reduction
    "kfac_ggn": (KFAC, dict(fisher="ggn", weight_decay=1e-3)),
}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# torch's strong-Wolfe search (L-BFGS) fits cubics through loss and slope values; in float32 that amplifies the 1e-7
# rounding difference between one batch mean and the weighted sum of two shard means to ~3e-4 after one step
# (float64 agrees to 1e-10, so the mathematics is the same).
FLOAT32_LINE_SEARCH_TOL = {"lbfgs": 1e-3}


def problem(dtype: torch.dtype, batch: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(batch, 6, generator=g, dtype=dtype), torch.randint(0, 3, (batch,), generator=g))
               for _ in range(STEPS)]
    return model, batches


def train(name: str, dtype: torch.dtype, batch: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """Parameters after each step; rank r of ``world`` steps on its shard of every global batch."""
    cls, options = METHODS[name]
    model, batches = problem(dtype, batch)
    opt = cls(model.parameters(), **options)
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
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
