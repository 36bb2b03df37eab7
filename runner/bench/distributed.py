"""Data-parallel scaling: step time on 1 and 2 ranks for the same global batch, and the all-reduce share of a step.

    python scripts/bench_distributed.py                          # CPU, gloo: 1 vs 2 ranks, 1 thread per rank
    python scripts/bench_distributed.py --methods hf --models mlp --steps 5
    python scripts/bench_distributed.py --device cuda            # NCCL, one rank on one GPU (all-reduce cost only)

Every rank trains the same model (MNIST MLP 784-800-10 or the CIFAR basic CNN of seed 003) on its shard of the same
global batch of random data, through the library's step contract (the Objective's one weighted all-reduce per
gradient and product). Printed per case: median step time on 1 rank and on 2, speed-up, scaling efficiency
(speed-up / ranks), and the share of a 2-rank step spent in all-reduces (``comm/time`` of the step statistics), with
the all-reduce count and megabytes per step. On one GPU NCCL has no second rank: the script then reports the step
time and the time of an NCCL all-reduce of the step's gradient-sized messages on one rank.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


from models.basic_cnn import build_cifar_basic_cnn
from models.mlp import build_mlp
from optimizers import SGD, CurveBall, HessianFree, Objective

MODELS = {
    "mlp": ("MNIST MLP 784-800-10", lambda: build_mlp((1, 28, 28), 10, hidden=[800]), (1, 28, 28)),
    "cnn": ("CIFAR basic CNN", lambda: build_cifar_basic_cnn((3, 32, 32), 10), (3, 32, 32)),
}
METHODS = {"sgd": (SGD, dict(lr=0.01)), "hf": (HessianFree, dict(cg_max_iters=10)), "curveball": (CurveBall, {})}


def run_steps(model_key: str, method: str, batch: int, steps: int, device: torch.device, rank: int,
              world: int) -> list[dict[str, float]]:
    """Per-step wall time and all-reduce statistics of ``steps`` steps after two warm-up steps."""
    torch.manual_seed(0)
    _, build, shape = MODELS[model_key]
    model = build().to(device)
    cls, options = METHODS[method]
    opt = cls(model.parameters(), **options)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, *shape, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device)
    xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    out = []
    for i in range(steps + 2):
        if world > 1:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        stats = opt.step(Objective(model, "cross_entropy", xs, ys, global_batch_size=batch))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            out.append({"time": time.perf_counter() - t0, "comm": float(stats.get("comm/time", 0.0)),
                        "calls": float(stats.get("comm/all_reduces", 0.0)), "bytes": float(stats.get("comm/bytes", 0.0))})
    return out


def _worker(rank: int, store: str, cases: list[tuple[str, str]], batch: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        results = {f"{m}/{k}": run_steps(m, k, batch, steps, torch.device("cpu"), rank, 2) for m, k in cases}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def cpu_table(cases: list[tuple[str, str]], batch: int, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(f"{tmp}/store", cases, batch, steps, f"{tmp}/out.pt"), nprocs=2, join=True)
        two = torch.load(f"{tmp}/out.pt", weights_only=True)
    torch.set_num_threads(1)
    print(f"\ntorch {torch.__version__}, gloo, 1 thread per rank, global batch {batch}, median of {steps} steps")
    print("| model | method | 1 rank ms | 2 ranks ms | speed-up | efficiency | all-reduce share | all-reduces / step "
          "| MB / step |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m, k in cases:
        one = run_steps(m, k, batch, steps, torch.device("cpu"), 0, 1)
        t1 = statistics.median(s["time"] for s in one)
        rows = two[f"{m}/{k}"]
        t2 = statistics.median(s["time"] for s in rows)
        share = statistics.median(s["comm"] / s["time"] for s in rows)
        calls = statistics.median(s["calls"] for s in rows)
        mb = statistics.median(s["bytes"] for s in rows) / 2**20
        print(f"| {MODELS[m][0]} | {k} | {t1 * 1e3:.1f} | {t2 * 1e3:.1f} | {t1 / t2:.2f} | {t1 / t2 / 2:.0%} | "
              f"{share:.1%} | {calls:.0f} | {mb:.1f} |")


def cuda_table(cases: list[tuple[str, str]], batch: int, steps: int) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    device = torch.device("cuda", 0)
    print(f"\ntorch {torch.__version__}, NCCL, 1 rank on {torch.cuda.get_device_name(device)}, global batch {batch}")
    print("| model | method | step ms | gradient-sized NCCL all-reduce ms |")
    print("| --- | --- | ---: | ---: |")
    for m, k in cases:
        t = statistics.median(s["time"] for s in run_steps(m, k, batch, steps, device, 0, 1))
        flat = torch.zeros(sum(p.numel() for p in MODELS[m][1]().parameters()), device=device)
        times = []
        for _ in range(steps + 2):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dist.all_reduce(flat)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        print(f"| {MODELS[m][0]} | {k} | {t * 1e3:.2f} | {statistics.median(times[2:]) * 1e3:.3f} |")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--methods", default="sgd,hf,curveball")
    parser.add_argument("--batch", type=int, default=256, help="the global batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    cases = [(m, k) for m in args.models.split(",") for k in args.methods.split(",")]
    (cuda_table if args.device == "cuda" else cpu_table)(cases, args.batch, args.steps)


if __name__ == "__main__":
    main()
