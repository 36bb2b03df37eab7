"""Peak memory of one HF and one CurveBall step, whole batch against micro-batches (objective.micro_batch_size).

    python scripts/bench_memory.py                                   # ResNet-18 (CIFAR stem), batch 64, CPU
    python scripts/bench_memory.py --models resnet18,resnet50 --batch 128 --micro 32 --device cuda

Each measurement runs in a fresh process (one step after a warm-up step, fixed CG budget), so the peak belongs to that
configuration alone: on CUDA ``torch.cuda.max_memory_allocated``, on the CPU the process's peak resident set size
(which includes the interpreter and torch, about the same for every row). Printed: peak MiB and the step's seconds.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def measure(model: str, method: str, batch: int, micro: int | None, device: str) -> dict[str, float]:
    """One configuration, in this process (called in a child process by ``main``)."""
    import torch

    from models.resnet import build_resnet18, build_resnet50
    from optimizers import CurveBall, HessianFree
    from runner.train import make_objective

    torch.manual_seed(0)
    shape = (3, 32, 32) if model == "resnet18" else (3, 224, 224)
    build = build_resnet18 if model == "resnet18" else build_resnet50
    net = build(shape, 10 if model == "resnet18" else 1000).to(device)
    opt = HessianFree(net.parameters(), cg_max_iters=3, cg_min_iters=3) if method == "hf" else CurveBall(net.parameters())
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for step in range(2):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        opt.step(make_objective(net, "cross_entropy", x, y, micro_batch_size=micro, ggn_backend="forward_ad"))
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"peak_mib": peak, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18")
    parser.add_argument("--methods", default="hf,curveball")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return
    print(f"device {args.device}, batch {args.batch}, one step after a warm-up step (HF: 3 CG iterations)")
    print("| model | method | micro-batch | peak MiB | step s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for model in args.models.split(","):
        for method in args.methods.split(","):
            for micro in (None, args.micro):
                child = json.dumps([model, method, args.batch, micro, args.device])
                out = subprocess.run([sys.executable, "-m", "runner.bench.memory", "--child", child], cwd=REPO,
                                     capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()[-1]
                result = json.loads(out)
                print(f"| {model} | {method} | {micro or 'whole batch'} | {result['peak_mib']:.0f} | "
                      f"{result['seconds']:.2f} |")


if __name__ == "__main__":
    main()
