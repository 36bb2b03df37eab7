"""Curvature diagnostics of a finished run, from its folder: ``python scripts/diagnose.py <run folder> [what...]``.

Loads the run's resolved ``config.yaml`` and the model weights of ``checkpoint.pt`` (``weights_only=True``), takes a
fixed diagnostic batch (the first ``--batch-size`` training samples, in the run's dtype), and writes into
``<run folder>/diagnostics/`` (or ``--out``) a ``diagnostics.json`` with every record (``to_dict()``) and the plots:

    spectrum   top-k and bottom-k Hessian eigenvalues (Lanczos), top-k GGN eigenvalues  -> spectrum.png
    density    Hessian spectral density by stochastic Lanczos quadrature                 -> spectrum.png (right)
    trace      Hutchinson and Hutch++ estimates of tr(H) and tr(G)                        -> JSON only
    taylor     seed 000's Taylor test along a random direction and the top eigenvector    -> taylor.png, taylor_top.png
    surface    loss along the top-2 Hessian eigenvectors (seed 000 Fig. 15.1) -> surface_contour.png, surface_3d.png
    full       the explicit Hessian's full spectrum (models up to --max-explicit params)   -> full_spectrum.png

Without ``what``, all of them (``full`` only when the model is small enough). Examples:

    python scripts/diagnose.py outputs/2026-11-22/06-22-55
    python scripts/diagnose.py outputs/2026-11-22/06-22-55 spectrum taylor --k 5 --batch-size 500
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimizers import diagnostics as diag  # noqa: E402
from optimizers.diagnostics import plots  # noqa: E402
from optimizers.objective import Objective  # noqa: E402

WHAT = ("spectrum", "density", "trace", "taylor", "surface", "full")


def fail(message: str) -> None:
    print(f"diagnose: {message}", file=sys.stderr)
    sys.exit(2)


def load_run(folder: Path, device: str, dtype_name: str | None) -> tuple[Any, Any, Any]:
    """(model with the checkpoint's weights, diagnostic split, loss name) from a run folder."""
    import hydra.utils
    from omegaconf import OmegaConf

    for name in ("config.yaml", "checkpoint.pt"):
        if not (folder / name).is_file():
            fail(f"{folder} has no {name}; pass a run folder (the one 'curvlab: results in ...' named).")
    cfg = OmegaConf.load(folder / "config.yaml")
    splits = hydra.utils.instantiate(cfg.dataset)
    model = hydra.utils.instantiate(cfg.model, input_shape=splits.input_shape, num_outputs=splits.num_outputs)
    dtype = getattr(torch, dtype_name or str(cfg.get("dtype", "float32")))
    model.load_state_dict(load_weights(folder / "checkpoint.pt"))
    return model.to(device=device, dtype=dtype), splits, dtype


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's state_dict from checkpoint.pt, by the weights-only unpickler. The current checkpoint also holds
    NumPy's RNG state (an array), so NumPy's array-rebuilding globals are allowed, and nothing else."""
    import numpy as np

    dtypes = [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "bool")]
    allowed = [np.core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]
    with torch.serialization.safe_globals(allowed):
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"]


def diagnostic_batch(splits: Any, size: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``size`` training samples (fixed, so two calls diagnose the same loss)."""
    data = splits.train
    if hasattr(data, "inputs"):
        x, y = data.inputs[:size], data.targets[:size]
    else:
        pairs = [data[i] for i in range(min(size, len(data)))]
        x = torch.stack([p[0] for p in pairs])
        y = torch.as_tensor([int(p[1]) for p in pairs]) if not torch.is_tensor(pairs[0][1]) else torch.stack(
            [p[1] for p in pairs])
    y = y.to(device) if not y.is_floating_point() else y.to(device=device, dtype=dtype)
    return x.to(device=device, dtype=dtype), y


def run_spectrum(obj: Objective, args: argparse.Namespace, out: Path, records: dict, what: list[str]) -> None:
    if "spectrum" in what:
        records["hessian_top"] = diag.eigenpairs(obj, k=args.k, seed=args.seed)
        records["hessian_bottom"] = diag.eigenpairs(obj, k=args.k, which="smallest", seed=args.seed)
        records["ggn_top"] = diag.eigenpairs(obj, k=args.k, curvature="ggn", seed=args.seed)
    if "density" in what:
        records["hessian_density"] = diag.spectral_density(obj, num_probes=args.slq_probes,
                                                           num_steps=args.slq_steps, seed=args.seed)
    pairs = [records[k] for k in ("hessian_top", "hessian_bottom", "ggn_top") if k in records]
    if pairs or "hessian_density" in records:
        fig = plots.plot_spectrum(pairs, records.get("hessian_density"), title=f"{args.run.name}: curvature spectrum")
        fig.savefig(out / "spectrum.png", dpi=120)
    if "trace" in what:
        for curvature in ("hessian", "ggn"):
            records[f"{curvature}_trace"] = diag.hutchinson_trace(obj, args.probes, curvature, seed=args.seed)
            records[f"{curvature}_trace_hutchpp"] = diag.hutchpp_trace(obj, args.probes, curvature, seed=args.seed)


def top_two(obj: Objective, records: dict, args: argparse.Namespace) -> Any:
    if "hessian_top" not in records or len(records["hessian_top"].eigenvalues) < 2:
        records["hessian_top"] = diag.eigenpairs(obj, k=max(2, args.k), seed=args.seed)
    return records["hessian_top"]


def run_taylor_and_surface(obj: Objective, args: argparse.Namespace, out: Path, records: dict,
                           what: list[str]) -> None:
    if "taylor" in what:
        records["taylor_random"] = diag.taylor_test(obj, seed=args.seed)
        records["taylor_top"] = diag.taylor_test(obj, direction=top_two(obj, records, args).eigenvectors[0])
        plots.plot_taylor(records["taylor_random"], "Taylor test, random unit direction").savefig(out / "taylor.png")
        plots.plot_taylor(records["taylor_top"], "Taylor test, top Hessian eigenvector").savefig(
            out / "taylor_top.png")
    if "surface" in what:
        top = top_two(obj, records, args)
        grid = torch.linspace(-args.radius, args.radius, args.grid)
        surface = diag.loss_surface(obj, (top.eigenvectors[0], top.eigenvectors[1]), grid, grid)
        records["surface"] = surface
        lam = top.eigenvalues.tolist()
        labels = (f"v1 (lambda = {lam[0]:.4g})", f"v2 (lambda = {lam[1]:.4g})")
        plots.plot_surface(surface, "contour", "loss along the top-2 Hessian eigenvectors", labels).savefig(
            out / "surface_contour.png", dpi=120)
        plots.plot_surface(surface, "3d", "loss along the top-2 Hessian eigenvectors", labels).savefig(
            out / "surface_3d.png", dpi=120)


def run_full(obj: Objective, args: argparse.Namespace, out: Path, records: dict) -> None:
    """The explicit Hessian's eigenvalues (``Objective.hessian_matrix``, numel^2 memory)."""
    values = torch.linalg.eigvalsh(obj.hessian_matrix().double())
    records["full_spectrum"] = {"eigenvalues": values.tolist(), "numel": obj.numel}
    plots.plot_spectrum(full=values, title=f"explicit Hessian, {obj.numel} eigenvalues").savefig(
        out / "full_spectrum.png", dpi=120)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the run folder (holds config.yaml and checkpoint.pt)")
    p.add_argument("what", nargs="*", help=f"any of {list(WHAT)} (default: all)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/diagnostics)")
    p.add_argument("--batch-size", type=int, default=1000, help="diagnostic batch: the first N training samples")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="default: the run's dtype; float64 makes the Taylor test meaningful down to h ~ 1e-5")
    p.add_argument("--mode", choices=["eval", "train"], default="eval",
                   help="network mode for the loss (train: batch-norm batch statistics, fixed dropout masks)")
    p.add_argument("--k", type=int, default=5, help="eigenpairs from each end")
    p.add_argument("--probes", type=int, default=100, help="products for the trace estimates")
    p.add_argument("--slq-probes", type=int, default=5)
    p.add_argument("--slq-steps", type=int, default=40)
    p.add_argument("--radius", type=float, default=1.0, help="surface grid: [-radius, radius]^2")
    p.add_argument("--grid", type=int, default=21, help="surface grid points per axis")
    p.add_argument("--max-explicit", type=int, default=5000, help="largest model for the explicit Hessian")
    p.add_argument("--seed", type=int, default=0, help="seed of the diagnostics' private generator")
    args = p.parse_args(argv)
    bad = [w for w in args.what if w not in WHAT]
    if bad:
        fail(f"unknown diagnostic(s) {bad}; choose from {list(WHAT)}.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    model, splits, dtype = load_run(args.run, args.device, args.dtype)
    model.train(args.mode == "train")
    x, y = diagnostic_batch(splits, args.batch_size, args.device, dtype)
    obj = Objective(model, splits.loss, x, y)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = args.what or [w for w in WHAT if w != "full" or numel <= args.max_explicit]
    if "full" in what and numel > args.max_explicit:
        fail(f"'full' needs the explicit {numel} x {numel} Hessian; the limit is --max-explicit={args.max_explicit}.")
    out = args.out or args.run / "diagnostics"
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, Any] = {}
    run_spectrum(obj, args, out, records, what)
    run_taylor_and_surface(obj, args, out, records, what)
    if "full" in what:
        run_full(obj, args, out, records)
    summary = {"run": str(args.run), "batch_size": int(x.shape[0]), "mode": args.mode, "numel": numel,
               "loss": float(obj.loss()),
               **{k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in records.items()}}
    (out / "diagnostics.json").write_text(json.dumps(summary, indent=1))
    for name, record in records.items():
        if hasattr(record, "scalars"):
            print(name, {k: round(v, 6) for k, v in record.scalars().items()})
    print(f"diagnose: results in {out}")


if __name__ == "__main__":
    main()
