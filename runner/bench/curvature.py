"""Cost of curvature products and second-order steps as multiples of a gradient and of an SGD step (issue 3 sec. 6).

Everything is measured in one process, on the same model, batch and device, as medians of repeated runs:

    python scripts/bench_curvature.py                        # MLP 784-800-10 (b=1000) and CIFAR basic CNN (b=128)
    python scripts/bench_curvature.py --models resnet18 --repeats 3
    python scripts/bench_curvature.py --device cuda          # when a GPU is present
    python scripts/bench_curvature.py --rows execution --threads 1   # compile / bf16 / channels_last vs eager fp32

Rows: a gradient (forward + backward), an SGD step, the GGN-vector product per backend (cached: after the batch's
one-off ``prepare``, which is timed separately), the Hessian-vector product per backend, one PCG iteration (product +
vector updates), a CurveBall step and a Hessian-free step (with its CG iteration count); then a K-FAC step without
its factor and inverse work, with the factors of each Fisher type, with factors and eigendecompositions, and with the
defaults (amortised); external optimisers through optimizers.torch_optim (heavyball eagerly unless
--heavyball-compile); and the race's first-order methods (Adam, NAdamW, Schedule-Free AdamW, Muon, Shampoo).

``--rows execution`` (or ``all``): the compiled and mixed-precision path (issue 17 item 4). The same rows (SGD step,
GGN-vector product, one CG iteration, HF step with exactly 10 CG iterations, CurveBall step, K-FAC step) for each
execution of the model: eager float32 (the baseline, measured in the same process), ``objective.compile``,
``precision=bf16``, ``channels_last`` (convolutional models), bf16 + channels_last and compile + bf16; each as its
time over the baseline's. Compilation is not timed (two warm-up calls first; the batch shape stays fixed).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor


from models.basic_cnn import build_cifar_basic_cnn
from models.mlp import build_mlp
from models.resnet import build_resnet18
from optimizers.cg import pcg
from optimizers.curveball import CurveBall
from optimizers.first_order import SGD
from optimizers.hf import HessianFree
from optimizers.kfac import KFAC
from optimizers.objective import GGN_BACKENDS, HVP_BACKENDS, Objective
from optimizers.precision import set_execution

SETUPS = {
    "mlp": ("MLP 784-800-10", lambda: build_mlp((1, 28, 28), 10, hidden=[800], activation="relu"), (1, 28, 28), 1000),
    "cnn": ("CIFAR basic CNN", lambda: build_cifar_basic_cnn((3, 32, 32), 10), (3, 32, 32), 128),
    "mlp_kfac": ("Seed 003 MLP 128-64-32-10 tanh", lambda: build_mlp((1, 28, 28), 10, hidden=[128, 64, 32], activation="tanh"),
                 (1, 28, 28), 64),
    "resnet18": ("ResNet-18 (CIFAR stem)", lambda: build_resnet18((3, 32, 32), 10), (3, 32, 32), 128),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def problem_of(key: str, device: torch.device) -> tuple[str, torch.nn.Module, Tensor, Tensor, Tensor]:
    """The model of SETUPS[key] (seeded weights), a random batch (x, y) and a small random vector v of its size."""
    label, build, shape, batch = SETUPS[key]
    torch.manual_seed(0)
    model = build().to(device)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    v = torch.randn(sum(p.numel() for p in model.parameters()), device=device) * 1e-3
    return label, model, x, y, v


def bench(key: str, repeats: int, device: torch.device, backends: bool) -> list[tuple[str, float]]:
    label, model, x, y, v = problem_of(key, device)
    batch = x.shape[0]
    rows: list[tuple[str, float]] = []

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    rows.append(("gradient (forward + backward)", median_time(gradient, repeats, device)))
    sgd = SGD(model.parameters(), lr=1e-3, momentum=0.9)
    rows.append(("SGD step", median_time(lambda: sgd.step(Objective(model, "cross_entropy", x, y)), repeats, device)))

    ggn_backends = GGN_BACKENDS if backends else ("auto",)
    for backend in ggn_backends:
        obj = Objective(model, "cross_entropy", x, y, ggn_backend=backend)

        def setup(backend=backend) -> None:
            o = Objective(model, "cross_entropy", x, y, ggn_backend=backend)
            o.gradient("ggn")
            o.ggn_vp(v)

        obj.gradient("ggn")
        product = median_time(lambda: obj.ggn_vp(v), repeats, device)
        rows.append((f"GGN-vector product [{backend}]", product))
        rows.append((f"  batch set-up + first product [{backend}]", median_time(setup, max(1, repeats // 2), device)))
    hvp_backends = HVP_BACKENDS if backends else ("double_backward",)
    for backend in hvp_backends:
        obj = Objective(model, "cross_entropy", x, y, hvp_backend=backend)
        obj.gradient("hessian")
        rows.append((f"Hessian-vector product [{backend}]", median_time(lambda: obj.hvp(v), repeats, device)))

    obj = Objective(model, "cross_entropy", x, y)
    g = obj.gradient("ggn")
    iters = 10
    cg_time = median_time(lambda: pcg(lambda d: obj.ggn_vp(d) + 1.0 * d, -g, min_iters=iters, max_iters=iters,
                                      martens_tol=0.0, store_iterates=False), max(1, repeats // 2), device)
    rows.append(("one CG iteration (GGN + lambda I)", cg_time / iters))

    cb = CurveBall(model.parameters())
    rows.append(("CurveBall step", median_time(lambda: cb.step(Objective(model, "cross_entropy", x, y)), repeats, device)))
    hf = HessianFree(model.parameters(), preconditioner=True)
    cg_counts: list[float] = []

    def hf_step() -> None:
        stats = hf.step(Objective(model, "cross_entropy", x, y))
        cg_counts.append(float(stats["cg/iters"]))

    hf_time = median_time(hf_step, max(1, repeats // 2), device)
    rows.append((f"HF step ({statistics.median(cg_counts):.0f} CG iterations)", hf_time))
    rows += kfac_and_external_rows(model, x, y, repeats, device)
    rows += race_rows(model, x, y, repeats, device)
    print_table(f"{label}, batch {batch}, {device.type}, {sum(p.numel() for p in model.parameters()):,} parameters", rows)
    return rows


def kfac_and_external_rows(model, x, y, repeats: int, device: torch.device) -> list[tuple[str, float]]:
    """K-FAC's step split into its parts (issue 10), and external optimisers through the torch_optim adapter."""
    from optimizers.kfac import KFAC
    from optimizers.torch_optim import TorchOptim

    never = 10**9
    rows = []

    def steps(opt, n: int = 1) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n):
                opt.step(Objective(model, "cross_entropy", x, y))
        return run

    for label, options in (("K-FAC step without factors or inverse", dict(factor_every=never, inverse_every=never)),
                           ("K-FAC step + factors [sampled]", dict(inverse_every=never)),
                           ("K-FAC step + factors [empirical]", dict(fisher="empirical", inverse_every=never)),
                           ("K-FAC step + factors [ggn]", dict(fisher="ggn", inverse_every=never)),
                           ("K-FAC step + factors + inverse [sampled]", dict(inverse_every=1))):
        opt = KFAC(model.parameters(), lr=1e-4, **options)
        rows.append((label, median_time(steps(opt), repeats, device)))  # the warm-up step makes the factors
    opt = KFAC(model.parameters(), lr=1e-4)
    rows.append(("K-FAC step, defaults (mean of 10: inverse every 10)", median_time(steps(opt, 10), max(1, repeats // 3), device) / 10))
    external = [("torch.optim.LBFGS", {"history_size": 10}), ("pytorch_optimizer.SOAP", {}),
                ("pytorch_optimizer.ScalableShampoo", {"preconditioning_compute_steps": 1}),
                ("pytorch_optimizer.Kron", {}), ("pytorch_optimizer.AdaHessian", {}),
                ("pytorch_optimizer.SophiaH", {"update_period": 1}), ("heavyball.SOAP", {})]
    for path, options in external:
        try:
            opt = TorchOptim(model.parameters(), cls=path, lr=1e-4, options=options)
        except ValueError as exc:  # package not installed
            print(f"skipped {path}: {exc}")
            continue
        rows.append((f"{path} step [{opt.mode}]", median_time(steps(opt), repeats, device)))
    return rows


def race_rows(model, x, y, repeats: int, device: torch.device) -> list[tuple[str, float]]:
    """The race's first-order methods (issue 18): Adam and NAdamW, Schedule-Free AdamW, Muon (Newton-Schulz in
    bfloat16, the authors', and in float32), and pytorch-optimizer's Shampoo (conf/optimizer/shampoo.yaml)."""
    from optimizers.first_order import Adam
    from optimizers.muon import Muon
    from optimizers.nadamw import NAdamW
    from optimizers.schedule_free import ScheduleFreeAdamW
    from optimizers.torch_optim import TorchOptim

    methods = [("Adam step", lambda p: Adam(p, lr=1e-4)), ("NAdamW step", lambda p: NAdamW(p, lr=1e-4)),
               ("Schedule-Free AdamW step", lambda p: ScheduleFreeAdamW(p, lr=1e-4)),
               ("Muon step [Newton-Schulz in bfloat16]", lambda p: Muon(p, lr=1e-4, adam_lr=1e-5)),
               ("Muon step [Newton-Schulz in float32]", lambda p: Muon(p, lr=1e-4, adam_lr=1e-5, ns_dtype="float32")),
               ("pytorch_optimizer.Shampoo step [plain]",
                lambda p: TorchOptim(p, cls="pytorch_optimizer.Shampoo", lr=1e-6))]
    rows = []
    for label, make in methods:
        try:
            opt = make(model.parameters())
        except ValueError as exc:  # package not installed
            print(f"skipped {label}: {exc}")
            continue
        rows.append((label, median_time(lambda: opt.step(Objective(model, "cross_entropy", x, y)), repeats, device)))
    return rows


EXECUTIONS = {  # name -> (set_execution keywords, objective.compile)
    "eager float32": ({}, False),
    "compile": ({}, True),
    "bf16": ({"precision": "bf16"}, False),
    "channels_last": ({"channels_last": True}, False),
    "bf16 + channels_last": ({"precision": "bf16", "channels_last": True}, False),
    "compile + bf16": ({"precision": "bf16"}, True),
}


def execution_rows(key: str, repeats: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Seconds per row for each execution in EXECUTIONS (channels_last variants only for convolutional models), on
    the same batch and the same initial weights; prints the table of ratios against eager float32."""
    import copy

    label, base, x, y, v = problem_of(key, device)
    batch = x.shape[0]
    convolutional = any(isinstance(m, torch.nn.Conv2d) for m in base.modules())
    fns: dict[str, dict[str, tuple[Callable[[], object], int]]] = {}  # execution -> row -> (fn, calls per sample)
    for name, (execution, compile) in EXECUTIONS.items():
        if execution.get("channels_last") and not convolutional:
            continue
        model = copy.deepcopy(base)
        set_execution(model, **execution)

        def objective(model=model, compile=compile) -> Objective:
            return Objective(model, "cross_entropy", x, y, compile=compile)

        sgd = SGD(model.parameters(), lr=1e-3, momentum=0.9)
        obj = objective()
        g = obj.gradient("ggn")
        iters = 10
        hf = HessianFree(model.parameters(), cg_min_iters=iters, cg_max_iters=iters, curvature_fraction=1.0)
        cb, kfac = CurveBall(model.parameters()), KFAC(model.parameters())
        fns[name] = {
            "SGD step": (lambda sgd=sgd, objective=objective: sgd.step(objective()), 1),
            "GGN-vector product": (lambda obj=obj: obj.ggn_vp(v), 1),
            "one CG iteration (GGN + lambda I)": (lambda obj=obj, g=g: pcg(
                lambda d: obj.ggn_vp(d) + 1.0 * d, -g, min_iters=iters, max_iters=iters, martens_tol=0.0,
                store_iterates=False), iters),
            "HF step (10 CG iterations)": (lambda hf=hf, objective=objective: hf.step(objective()), 1),
            "CurveBall step": (lambda cb=cb, objective=objective: cb.step(objective()), 1),
            "K-FAC step (defaults, amortised)": (lambda kfac=kfac, objective=objective: kfac.step(objective()), 1),
        }
        for fn, _ in fns[name].values():  # the first calls compile; K-FAC's first step decomposes its factors
            fn(), fn()
    # interleaved: each repeat times every execution once, so a change of the machine's load hits all of them alike
    samples: dict[str, dict[str, list[float]]] = {n: {r: [] for r in rows} for n, rows in fns.items()}
    for _ in range(repeats):
        for row in next(iter(fns.values())):
            for name in fns:
                fn, calls = fns[name][row]
                n = 10 if row.startswith("K-FAC") else 1  # K-FAC: amortise the eigendecompositions (every 10 steps)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                sync(device)
                samples[name][row].append((time.perf_counter() - t0) / (n * calls))
    times = {n: {r: statistics.median(t) for r, t in rows.items()} for n, rows in samples.items()}
    names = list(times)
    base_row = times[names[0]]
    print(f"\n{label}, batch {batch}, {device.type}: time over eager float32 (same process, same batch, interleaved)")
    print("| measurement | eager float32 ms | " + " | ".join(f"{n} x" for n in names[1:]) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in names[1:]) + " |")
    for row in base_row:
        ratios = " | ".join(f"{times[n][row] / base_row[row]:.2f}" for n in names[1:])
        print(f"| {row} | {base_row[row] * 1e3:.2f} | {ratios} |")
    return times


def print_table(title: str, rows: list[tuple[str, float]]) -> None:
    grad, sgd = rows[0][1], rows[1][1]
    print(f"\n{title}")
    print(f"| {'measurement':44s} | {'ms':>9s} | {'x gradient':>10s} | {'x SGD step':>10s} |")
    print(f"| {'-' * 44} | {'-' * 9}: | {'-' * 10}: | {'-' * 10}: |")
    for name, seconds in rows:
        print(f"| {name:44s} | {seconds * 1e3:9.2f} | {seconds / grad:10.2f} | {seconds / sgd:10.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(SETUPS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-backends", action="store_true", help="only the default backends")
    parser.add_argument("--heavyball-compile", action="store_true", help="heavyball with torch.compile (slow start)")
    parser.add_argument("--rows", choices=("standard", "execution", "all"), default="standard",
                        help="execution: only the compile / bf16 / channels_last table; all: both")
    args = parser.parse_args(argv)
    if not args.heavyball_compile:
        try:
            import heavyball.utils

            heavyball.utils.compile_mode = None  # eager: its torch.compile start-up takes minutes on the CPU
        except ImportError:
            pass
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}")
    for key in args.models:
        if args.rows != "execution":
            bench(key, args.repeats, device, backends=not args.no_backends)
        if args.rows != "standard":
            execution_rows(key, args.repeats, device)


if __name__ == "__main__":
    main()
