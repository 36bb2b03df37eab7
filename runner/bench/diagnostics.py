"""Cost and accuracy of the curvature diagnostics against PyHessian and curvlinops (issue 9, benchmark).

For each model, on one batch of random data of the dataset's shape (the diagnostics do not care what the data is):
top-1 and top-5 Hessian eigenvalues and the Hessian trace from 100 Rademacher probes, by curvlab
(``optimizers.diagnostics``: Lanczos, power iteration, Hutchinson) and by

* PyHessian 0.1 (Yao et al. 2020): power iteration with orthogonal deflation (``eigenvalues``, its default relative
  tolerance 1e-3, at most 100 products a pair) and Hutchinson (``trace``, its tolerance set to 0 so it uses all 100
  probes);
* curvlinops 3 (Dangel et al.): its ``HessianLinearOperator`` through scipy's ``eigsh`` (ARPACK implicitly restarted
  Lanczos, machine-precision tolerance) and ``hutchinson_trace``.

Products are curvature-vector products; seconds are wall time in this process, measured one after the other on the
same model and batch (so ratios hold on a shared machine; absolute seconds do not). The trace is a random estimate in
every library: its relative difference is a sample of the estimators' error (compare with the printed stderr).

    python scripts/bench_diagnostics.py               # MNIST MLP 784-128-10 (b=1000) and basic CIFAR CNN (b=128)
    python scripts/bench_diagnostics.py --models mlp --device cuda
Needs the ``[bench]`` extra: pip install -e ".[bench]".
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F


from models.basic_cnn import build_cifar_basic_cnn
from models.mlp import build_mlp
from optimizers import diagnostics as diag
from optimizers.objective import Objective

SETUPS = {
    "mlp": ("MNIST MLP 784-128-10", lambda: build_mlp((1, 28, 28), 10, hidden=[128]), (1, 28, 28), 1000),
    "mlp800": ("MNIST MLP 784-800-10", lambda: build_mlp((1, 28, 28), 10, hidden=[800]), (1, 28, 28), 1000),
    "cnn": ("CIFAR basic CNN", lambda: build_cifar_basic_cnn((3, 32, 32), 10), (3, 32, 32), 128),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], tuple], device: torch.device) -> tuple:
    """Run fn() -> (value, products); return (value, products, seconds)."""
    sync(device)
    t0 = time.perf_counter()
    value, products = fn()
    sync(device)
    return value, products, time.perf_counter() - t0


def ours(model, x, y) -> dict[str, Callable[[], tuple]]:
    def run(fn):   # a fresh Objective each time: every measurement pays its own forward and graph set-up
        def call():
            record = fn(Objective(model, "cross_entropy", x, y))
            return record, record.cost.products
        return call
    return {
        "top1 lanczos": run(lambda o: diag.lanczos_eigenpairs(o, k=1)),
        "top1 power": run(lambda o: diag.power_iteration(o, k=1, tol=1e-3)),
        "top5 lanczos": run(lambda o: diag.lanczos_eigenpairs(o, k=5)),
        "trace": run(lambda o: diag.hutchinson_trace(o, num_probes=100)),
    }


def pyhessian_runs(model, x, y, device) -> dict[str, Callable[[], tuple]]:
    import importlib

    ph = importlib.import_module("pyhessian.hessian")   # the module (the package re-exports the class by that name)

    count = [0]
    original = ph.hessian_vector_product

    def counted(*args):
        count[0] += 1
        return original(*args)

    ph.hessian_vector_product = counted

    def run(what):
        def call():
            count[0] = 0
            h = ph.hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=device.type == "cuda")
            value = h.eigenvalues(top_n=1)[0] if what == "top1" else (
                h.eigenvalues(top_n=5)[0] if what == "top5" else sum(h.trace(maxIter=100, tol=0.0)) / 100)
            for p in model.parameters():
                p.grad = None
            return value, count[0]
        return call
    return {"top1 power": run("top1"), "top5 power": run("top5"), "trace": run("trace")}


def curvlinops_runs(model, x, y) -> dict[str, Callable[[], tuple]]:
    import numpy as np
    from curvlinops import HessianLinearOperator, hutchinson_trace
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = [p for p in model.parameters() if p.requires_grad]

    def operator():
        return HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)

    def top(k):
        def call():
            count = [0]
            inner = operator().to_scipy()

            def matmat(m):
                count[0] += 1 if m.ndim == 1 else m.shape[1]
                return inner @ m
            wrapped = LinearOperator(inner.shape, matvec=matmat, matmat=matmat, dtype=np.float32)
            values = eigsh(wrapped, k=k, which="LA", return_eigenvectors=False)
            return sorted(values.tolist(), reverse=True), count[0]
        return call

    def trace():
        return float(hutchinson_trace(operator(), 100)), 100
    return {"top1 eigsh": top(1), "top5 eigsh": top(5), "trace": trace}


def value_of(quantity: str, value) -> float:
    """The number a row compares: the top eigenvalue, the 5th eigenvalue, or the trace."""
    if hasattr(value, "eigenvalues"):
        return float(value.eigenvalues[-1])
    if hasattr(value, "trace"):
        return float(value.trace)
    return float(value[-1]) if isinstance(value, (list, tuple)) else float(value)


PAIRS = [  # (row label, our run, library, their run)
    ("top-1 eigenvalue", "top1 lanczos", "curvlinops", "top1 eigsh"),
    ("top-1 eigenvalue", "top1 lanczos", "pyhessian", "top1 power"),
    ("top-1 eigenvalue (power)", "top1 power", "pyhessian", "top1 power"),
    ("5th eigenvalue", "top5 lanczos", "curvlinops", "top5 eigsh"),
    ("5th eigenvalue", "top5 lanczos", "pyhessian", "top5 power"),
    ("trace, 100 probes", "trace", "curvlinops", "trace"),
    ("trace, 100 probes", "trace", "pyhessian", "trace"),
]


def bench(key: str, device: torch.device, dtype: torch.dtype, libraries: list[str]) -> list[str]:
    name, build, shape, batch = SETUPS[key]
    torch.manual_seed(0)
    model = build().to(device=device, dtype=dtype)
    x = torch.randn(batch, *shape, device=device, dtype=dtype)
    y = torch.randint(0, 10, (batch,), device=device)
    runs = {"ours": ours(model, x, y)}
    if "pyhessian" in libraries:
        runs["pyhessian"] = pyhessian_runs(model, x, y, device)
    if "curvlinops" in libraries:
        runs["curvlinops"] = curvlinops_runs(model, x, y)
    warm = Objective(model, "cross_entropy", x, y)          # warm-up: first-call allocations are nobody's cost
    warm.hvp(warm.gradient())
    results = {(lib, what): timed(fn, device) for lib, table in runs.items() for what, fn in table.items()}
    n = sum(p.numel() for p in model.parameters())
    rows = [f"\n{name}, {n:,} parameters, batch {batch}, {device.type}, {str(dtype).removeprefix('torch.')}\n",
            "| quantity | vs | ours | theirs | rel. diff | our products | their products | our s | their s "
            "| time ratio (theirs / ours) |", "|" + " --- |" * 10]
    for label, our_key, lib, their_key in PAIRS:
        if lib not in runs:
            continue
        (ov, op, os_), (tv, tp, ts) = results[("ours", our_key)], results[(lib, their_key)]
        o, t = value_of(our_key, ov), value_of(their_key, tv)
        rows.append(f"| {label} | {lib} | {o:.6g} | {t:.6g} | {abs(o - t) / abs(t):.1e} | {op} | {tp} "
                    f"| {os_:.3g} | {ts:.3g} | {ts / os_:.2f} |")
    trace = results[("ours", "trace")][0]
    rows.append(f"\nour trace stderr {trace.stderr:.3g} ({trace.stderr / abs(trace.trace):.1e} relative); "
                f"Lanczos converged: top-1 {results[('ours', 'top1 lanczos')][0].converged}, "
                f"top-5 {results[('ours', 'top5 lanczos')][0].converged}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn", help=f"comma-separated, from {sorted(SETUPS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--libraries", default="curvlinops,pyhessian", help="comma-separated; '' for ours only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [m for m in args.models.split(",") if m not in SETUPS]
    if unknown:
        parser.error(f"--models: {unknown} not in {sorted(SETUPS)}")
    libraries = [lib for lib in args.libraries.split(",") if lib]
    for key in args.models.split(","):
        print("\n".join(bench(key, torch.device(args.device), getattr(torch, args.dtype), libraries)), flush=True)


if __name__ == "__main__":
    main()
