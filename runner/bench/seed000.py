"""Seed 000 Tables 14.1-14.2: time of the explicit Hessian and of one Hessian-vector product of the simple CNN
(3,192 parameters, float64, MNIST) against the batch size, with the thesis's two sanity checks.

    python scripts/bench_seed000.py                                  # Hessian at b = 1, 10, 100; HVP up to 60,000
    python scripts/bench_seed000.py --hessian-batches 1,10,100,1000 --hvp-batches 1,10,100,1000,10000 --repeats 3

The thesis (sec. 14.1-14.2) timed TensorFlow 1's ``tf.hessians`` and a double-backward ``Hs`` on a 2.7 GHz Core i7
laptop. Here, on the same model, dtype and data, in one process:

* ``gradient``: forward + backward on a fresh batch (``Objective.gradient``);
* ``HVP (fresh)``: the thesis's ``Hs`` -- forward, gradient with a graph and the double backward, for one v;
* ``HVP (cached)``: one more product on the same batch (what each CG iteration costs);
* ``explicit Hessian``: ``Objective.hessian_matrix`` (columns H e_i, forward-over-reverse, vmapped in chunks).

Checks (thesis sec. 14.1-14.2): the Hessian is symmetric, and |H s - Hs(s)| for a random s at b = 100 (the thesis
measured 2.40e-13 between its explicit Hessian and its product).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch


from data.vision import build_mnist
from models.simple_cnn import build_simple_cnn
from optimizers.objective import Objective

THESIS_HESSIAN = {1: 6.529, 10: 15.722, 100: 145.366, 1000: 1256.274}       # Table 14.1, seconds
THESIS_HVP = {1: 0.030, 10: 0.064, 100: 0.204, 1000: 1.173, 10000: 11.580}  # Table 14.2, seconds


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and dispatch caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def batch(train, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first b training images (float64) and labels."""
    return train.inputs[:b].double(), train.targets[:b]


def time_batch(model, train, b: int, repeats: int, hessian: bool) -> dict[str, float]:
    x, y = batch(train, b)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    fresh = lambda: Objective(model, "cross_entropy", x, y)  # noqa: E731
    row = {"gradient": median_time(lambda: fresh().gradient(), repeats),
           "hvp_fresh": median_time(lambda: fresh().hvp(v), repeats)}
    cached = fresh()
    cached.hvp(v)
    row["hvp_cached"] = median_time(lambda: cached.hvp(v), repeats)
    if hessian:
        # Columns in chunks of at most ~2^22 activations' worth (memory grows with chunk x batch).
        chunk = max(1, min(512, 2 ** 22 // (b * 784 * 4)))
        row["hessian"] = median_time(lambda: fresh().hessian_matrix(chunk_size=chunk), 1 if b >= 100 else repeats)
    return row


def sanity(model, train) -> tuple[float, float]:
    """(|H - H^T|_F, |H s - Hs(s)|_2) at b = 100 with random weights and a random s (thesis sec. 14.2)."""
    x, y = batch(train, 100)
    objective = Objective(model, "cross_entropy", x, y)
    h = objective.hessian_matrix(chunk_size=8)
    s = torch.randn(h.shape[0], dtype=torch.float64)
    return float((h - h.T).norm()), float((h @ s - Objective(model, "cross_entropy", x, y).hvp(s)).norm())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hessian-batches", default="1,10,100")
    parser.add_argument("--hvp-batches", default="1,10,100,1000,10000,60000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train = build_mnist(os.environ.get("CURVLAB_DATA", "../shared/data")).train
    model = build_simple_cnn((1, 28, 28), 10).double()
    hessian_batches = [int(b) for b in args.hessian_batches.split(",") if b]
    batches = sorted({int(b) for b in args.hvp_batches.split(",") if b} | set(hessian_batches))
    print(f"simple CNN, {sum(p.numel() for p in model.parameters())} parameters, float64, MNIST; torch "
          f"{torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs; medians of {args.repeats}")
    asym, remainder = sanity(model, train)
    print(f"b = 100: |H - H^T|_F = {asym:.2e}, |H s - Hs(s)|_2 = {remainder:.2e} (thesis: 2.40e-13)\n")
    print("| batch | gradient s | HVP fresh s | HVP cached s | HVP fresh / gradient | explicit Hessian s | "
          "Hessian / HVP fresh | thesis Hessian s | thesis HVP s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for b in batches:
        row = time_batch(model, train, b, args.repeats, b in hessian_batches)
        hess = row.get("hessian")
        cells = [f"{b:,}", f"{row['gradient']:.4f}", f"{row['hvp_fresh']:.4f}", f"{row['hvp_cached']:.4f}",
                 f"{row['hvp_fresh'] / row['gradient']:.2f}", "—" if hess is None else f"{hess:.3f}",
                 "—" if hess is None else f"{hess / row['hvp_fresh']:.0f}",
                 f"{THESIS_HESSIAN[b]:.3f}" if b in THESIS_HESSIAN else "—",
                 f"{THESIS_HVP[b]:.3f}" if b in THESIS_HVP else "—"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
