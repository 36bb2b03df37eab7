"""Curvature diagnostics of a run, from its folder: ``python scripts/diagnose.py <run folder> [what...]``.

Loads the run's resolved ``config.yaml`` and the model weights of its checkpoint (``runner.checkpoint.load_latest``:
``checkpoint.pt``, else ``checkpoint.prev.pt``; ``torch.load(weights_only=True)``), or with ``--weights init`` the
run's initial weights (rebuilt from its seed as the runner builds them). The diagnostic batch is drawn as the runner
draws it (``runner.diagnostics.diagnostic_batch``: ``--batch-size`` training samples, seeded with ``--batch-seed``,
by default the run's ``diagnostics.seed``), in the run's dtype (or ``--dtype``). Writes into
``<run folder>/diagnostics/`` (or ``--out``) a ``diagnostics.json`` with every record (``to_dict()``) and the plots:

    spectrum   top-k and bottom-k Hessian eigenvalues, top-k GGN eigenvalues (Lanczos;
               --power N adds seed 000's power iteration, Algorithm 5, N iterations each)  -> spectrum.png (bars)
    density    Hessian spectral density by stochastic Lanczos quadrature                   -> spectrum.png (right)
    trace      Hutchinson and Hutch++ estimates of tr(H) and tr(G)                          -> JSON only
    taylor     seed 000's Taylor test (ch. 13) along --taylor-directions: random, ones (the constant unit
               vector, seed 000 Fig. 14.1), top (the top eigenvector, Table 15.1)  -> taylor.png, taylor_ones.png,
               taylor_top.png (log-log remainders with fitted slopes)
    surface    loss along the top-2 Hessian eigenvectors (seed 000 Fig. 15.1)   -> surface_contour.png, surface_3d.png
    full       the explicit Hessian (models up to --max-explicit parameters): its full spectrum, and seed 000's
               Hessian-product check ||H s - Hv(s)||_2 for a Gaussian s (sec. 14.2)        -> full_spectrum.png

Without ``what``, all of them (``full`` only when the model is small enough). Bad input: one line, exit code 2.

    python scripts/diagnose.py outputs/2026-11-22/06-22-55
    python scripts/diagnose.py outputs/2026-11-22/06-22-55 spectrum taylor --k 5 --batch-size 500 --dtype float64
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimizers import diagnostics as diag  # noqa: E402
from optimizers.diagnostics import plots, probes  # noqa: E402
from optimizers.objective import Objective  # noqa: E402

WHAT = ("spectrum", "density", "trace", "taylor", "surface", "full")
DIRECTIONS = ("random", "ones", "top")
PNG = {"random": "taylor.png", "ones": "taylor_ones.png", "top": "taylor_top.png"}


def fail(message: str) -> None:
    print(f"diagnose: {message}", file=sys.stderr)
    sys.exit(2)


def load_run(folder: Path, args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(config, model with the chosen weights on args.device in the dtype, splits, dtype) of a run folder."""
    import hydra.utils
    from omegaconf import OmegaConf

    from runner.checkpoint import load_latest
    from runner.seeding import seed_everything

    if not (folder / "config.yaml").is_file():
        fail(f"{folder} has no config.yaml; pass a run folder (the one 'curvlab: results in ...' named).")
    cfg = OmegaConf.load(folder / "config.yaml")
    seed_everything(cfg.seed)  # the runner's order: seed, dataset, model (so --weights init is the run's start)
    splits = hydra.utils.instantiate(cfg.dataset)
    model = hydra.utils.instantiate(cfg.model, input_shape=splits.input_shape, num_outputs=splits.num_outputs)
    if args.weights == "checkpoint":
        try:
            found = load_latest(folder)
        except ValueError as exc:
            fail(str(exc))
        if found is None:
            fail(f"{folder} has no checkpoint.pt; use --weights init for the run's initial weights.")
        model.load_state_dict(found[1]["model"])
    dtype = getattr(torch, args.dtype or str(cfg.get("dtype", "float32")))
    return cfg, model.to(device=args.device, dtype=dtype), splits, dtype


def batch(cfg: Any, splits: Any, args: argparse.Namespace, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The runner's diagnostic batch: --batch-size samples of the training split, seeded with --batch-seed."""
    from runner.diagnostics import diagnostic_batch

    run_options = cfg.get("diagnostics") or {}
    size = args.batch_size or run_options.get("batch_size") or 1000
    seed = args.batch_seed if args.batch_seed is not None else run_options.get("seed", cfg.seed)
    if size > len(splits.train):
        fail(f"--batch-size {size} is larger than the training split ({len(splits.train)} samples).")
    return diagnostic_batch(splits.train, size, seed, (0, 1), torch.device(args.device), dtype)


def run_spectrum(obj: Objective, args: argparse.Namespace, out: Path, records: dict, what: list[str]) -> None:
    if "spectrum" in what:
        records["hessian_top"] = diag.eigenpairs(obj, k=args.k, seed=args.seed)
        records["hessian_bottom"] = diag.eigenpairs(obj, k=args.k, which="smallest", seed=args.seed)
        records["ggn_top"] = diag.eigenpairs(obj, k=args.k, curvature="ggn", seed=args.seed)
        if args.power:   # seed 000 Algorithm 5: a fixed number of iterations per eigenpair (tol 0 never stops early)
            records["hessian_top_power"] = diag.power_iteration(obj, k=args.k, seed=args.seed, tol=0.0,
                                                                max_iters=args.power)
    if "density" in what:
        records["hessian_density"] = diag.spectral_density(obj, num_probes=args.slq_probes,
                                                           num_steps=args.slq_steps, seed=args.seed)
    names = ("hessian_top", "hessian_bottom", "ggn_top", "hessian_top_power")
    pairs = [records[k] for k in names if k in records]
    if pairs or "hessian_density" in records:
        shown = " and ".join(([f"Hessian top/bottom-{args.k} and GGN top-{args.k} eigenvalues (Lanczos)"] if pairs
                              else []) + (["Hessian spectral density (SLQ)"] if "hessian_density" in records else []))
        fig = plots.plot_spectrum(pairs, records.get("hessian_density"), title=f"{shown}\n{args.label}")
        fig.savefig(out / "spectrum.png", dpi=args.dpi)
    if "trace" in what:
        for curvature in ("hessian", "ggn"):
            records[f"{curvature}_trace"] = diag.hutchinson_trace(obj, args.probes, curvature, seed=args.seed)
            records[f"{curvature}_trace_hutchpp"] = diag.hutchpp_trace(obj, args.probes, curvature, seed=args.seed)


def top_two(obj: Objective, records: dict, args: argparse.Namespace) -> Any:
    if "hessian_top" not in records or len(records["hessian_top"].eigenvalues) < 2:
        records["hessian_top"] = diag.eigenpairs(obj, k=max(2, args.k), seed=args.seed)
    return records["hessian_top"]


def taylor_direction(obj: Objective, records: dict, args: argparse.Namespace, name: str) -> torch.Tensor | None:
    """None: the test's own random unit direction (from --seed)."""
    if name == "ones":  # seed 000 sec. 14.1: "a uniform (unit) vector across all 3192 dimensions"
        return torch.ones(obj.numel, dtype=obj.params[0].dtype, device=obj.params[0].device)
    return top_two(obj, records, args).eigenvectors[0] if name == "top" else None


def run_taylor(obj: Objective, args: argparse.Namespace, out: Path, records: dict) -> None:
    titles = {"random": "random unit direction", "ones": "constant unit direction", "top": "top Hessian eigenvector"}
    distances = torch.logspace(args.h_max, args.h_min, args.h_max - args.h_min + 1, dtype=torch.float64)
    for name in args.taylor_directions:
        direction = taylor_direction(obj, records, args, name)
        test = diag.taylor_test(obj, direction=direction, distances=distances, seed=args.seed)
        records[f"taylor_{name}"] = test
        plots.plot_taylor(test, f"Taylor test, {titles[name]}\n{args.label}").savefig(out / PNG[name], dpi=args.dpi)


def run_surface(obj: Objective, args: argparse.Namespace, out: Path, records: dict) -> None:
    top = top_two(obj, records, args)
    grid = torch.linspace(-args.radius, args.radius, args.grid)
    surface = diag.loss_surface(obj, (top.eigenvectors[0], top.eigenvectors[1]), grid, grid)
    records["surface"] = surface
    lam = top.eigenvalues.tolist()
    labels = (f"v1 (lambda = {lam[0]:.4g})", f"v2 (lambda = {lam[1]:.4g})")
    for kind, name in (("contour", "surface_contour.png"), ("3d", "surface_3d.png")):
        plots.plot_surface(surface, kind, f"loss along the top-2 Hessian eigenvectors\n{args.label}", labels).savefig(
            out / name, dpi=args.dpi)


def run_full(obj: Objective, args: argparse.Namespace, out: Path, records: dict) -> None:
    """The explicit Hessian (``Objective.hessian_matrix``, numel^2 memory): its eigenvalues, and seed 000's check of
    the Hessian-vector product against it (sec. 14.2): ||H s - Hv(s)||_2 for s ~ N(0, I)."""
    t0 = time.perf_counter()
    hessian = obj.hessian_matrix(chunk_size=max(1, min(512, 25_600 // obj.inputs.shape[0])))  # columns per vmap
    seconds = time.perf_counter() - t0
    values = torch.linalg.eigvalsh(hessian.double())
    s = probes.draw(obj.numel, probes.generator(args.seed), hessian.dtype, hessian.device, "gaussian")
    explicit, product = hessian @ s, obj.hvp(s)
    remainder = float((explicit - product).norm())
    records["full_spectrum"] = {"eigenvalues": values.tolist(), "numel": obj.numel, "seconds": seconds}
    records["hvp_check"] = {"remainder_norm": remainder, "relative": remainder / float(explicit.norm()),
                            "direction_norm": float(s.norm()), "dtype": str(hessian.dtype).split(".")[1]}
    title = f"all {obj.numel} eigenvalues of the explicit Hessian\n{args.label}"
    plots.plot_spectrum(full=values, title=title).savefig(
        out / "full_spectrum.png", dpi=args.dpi)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the run folder (holds config.yaml and checkpoint.pt)")
    p.add_argument("what", nargs="*", help=f"any of {list(WHAT)} (default: all)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/diagnostics)")
    p.add_argument("--weights", choices=["checkpoint", "init"], default="checkpoint",
                   help="the checkpoint's weights, or the run's initial weights (rebuilt from its seed)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="diagnostic batch (default: the run's diagnostics.batch_size)")
    p.add_argument("--batch-seed", type=int, default=None, help="its draw's seed (default: the run's diagnostics.seed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="default: the run's dtype; float64 makes the Taylor test meaningful down to h ~ 1e-5")
    p.add_argument("--mode", choices=["eval", "train"], default="eval",
                   help="network mode for the loss (train: batch-norm batch statistics, fixed dropout masks)")
    p.add_argument("--k", type=int, default=5, help="eigenpairs from each end")
    p.add_argument("--power", type=int, default=0, help="also power iteration (Algorithm 5), this many iterations")
    p.add_argument("--probes", type=int, default=100, help="products for the trace estimates")
    p.add_argument("--slq-probes", type=int, default=5)
    p.add_argument("--slq-steps", type=int, default=40)
    p.add_argument("--taylor-directions", type=lambda s: s.split(","), default=["random", "top"],
                   help=f"comma-separated, of {list(DIRECTIONS)}")
    p.add_argument("--h-max", type=int, default=-1, help="Taylor distances 10^h-max ... 10^h-min")
    p.add_argument("--h-min", type=int, default=-6)
    p.add_argument("--radius", type=float, default=1.0, help="surface grid: [-radius, radius]^2")
    p.add_argument("--grid", type=int, default=21, help="surface grid points per axis")
    p.add_argument("--max-explicit", type=int, default=5000, help="largest model for the explicit Hessian")
    p.add_argument("--seed", type=int, default=0, help="seed of the diagnostics' private generator")
    p.add_argument("--dpi", type=int, default=100)
    return check(p.parse_args(argv))


def check(args: argparse.Namespace) -> argparse.Namespace:
    bad = [w for w in args.what if w not in WHAT]
    if bad:
        fail(f"unknown diagnostic(s) {bad}; choose from {list(WHAT)}.")
    wrong = [d for d in args.taylor_directions if d not in DIRECTIONS]
    if wrong:
        fail(f"--taylor-directions: unknown direction(s) {wrong}; choose from {list(DIRECTIONS)}.")
    for name in ("k", "probes", "slq_probes", "slq_steps", "grid", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} {value} must be a positive integer.")
    if args.h_min >= args.h_max or args.power < 0 or not args.radius > 0:
        fail("need --h-min < --h-max, --power >= 0 and --radius > 0.")
    return args


def describe(folder: Path, args: argparse.Namespace, samples: int) -> str:
    """What the plots show, for their titles: `workload mnist_mlp800 (mnist + mlp_800) trained by sgd, weights at
    step 600, 1000 training samples` (the run folder's name is only a job number in a sweep)."""
    from runner.report.load import is_missing, load_run as read_run

    run = read_run(folder)

    def choice(key: str) -> str:
        value = run.get(key)
        return "?" if value is None or is_missing(value) else str(value)

    problem = f"{choice('dataset')} + {choice('model')}"
    workload = (run.config.get("workload") or {}).get("name") if isinstance(run.config.get("workload"), dict) else None
    step = (run.summary or {}).get("checkpoint_step")
    weights = "initial weights" if args.weights == "init" else (
        f"weights at step {step}" if step is not None else "checkpoint weights")
    return (f"{f'workload {workload} ({problem})' if workload else problem} trained by {choice('optimizer')}, "
            f"{weights}, {samples} training samples ({args.mode} mode)")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    cfg, model, splits, dtype = load_run(args.run, args)
    model.train(args.mode == "train")
    x, y = batch(cfg, splits, args, dtype)
    args.label = describe(args.run, args, int(x.shape[0]))
    obj = Objective(model, splits.loss, x, y)
    what = args.what or [w for w in WHAT if w != "full" or obj.numel <= args.max_explicit]
    if "full" in what and obj.numel > args.max_explicit:
        fail(f"'full' needs the explicit {obj.numel} x {obj.numel} Hessian; the limit is "
             f"--max-explicit={args.max_explicit}.")
    out = args.out or args.run / "diagnostics"
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, Any] = {}
    run_spectrum(obj, args, out, records, what)
    if "taylor" in what:
        run_taylor(obj, args, out, records)
    if "surface" in what:
        run_surface(obj, args, out, records)
    if "full" in what:
        run_full(obj, args, out, records)
    summary = {"run": str(args.run), "label": args.label, "weights": args.weights, "batch_size": int(x.shape[0]),
               "mode": args.mode,
               "dtype": str(dtype).split(".")[1], "numel": obj.numel, "loss": float(obj.loss()),
               **{k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in records.items()}}
    (out / "diagnostics.json").write_text(json.dumps(summary, indent=1))
    for name, record in records.items():
        print(name, {k: round(v, 6) for k, v in record.scalars().items()} if hasattr(record, "scalars") else
              {k: v for k, v in record.items() if k != "eigenvalues"})
    print(f"diagnose: results in {out}")


if __name__ == "__main__":
    main()
