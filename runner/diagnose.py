"""Curvature diagnostics of a run, from its folder: ``curvlab-diagnose <run folder> [name...]`` (also
``python scripts/diagnose.py ...``).

Loads the run's resolved ``config.yaml`` and the model weights of its checkpoint (``runner.checkpoint.load_latest``:
``checkpoint.pt``, else ``checkpoint.prev.pt``; ``torch.load(weights_only=True)``), or with ``--weights init`` the
run's initial weights (rebuilt from its seed as the runner builds them). The diagnostic batch is drawn as the runner
draws it (``runner.diagnostics.diagnostic_batch``: ``--batch-size`` training samples, seeded with ``--batch-seed``,
by default the run's ``diagnostics.seed``), in the run's dtype (or ``--dtype``). Writes into
``<run folder>/diagnostics/`` (or ``--out``) a ``diagnostics.json`` with every record (``to_dict()``) and the plots.

The names are those of the one registry (``runner.diagnostics.DIAGNOSTICS``, the names ``diagnostics.what`` takes
during training), plus the two that need plots or an explicit matrix:

    hessian_top hessian_bottom ggn_top   Lanczos eigenpairs (--k per end; --power N adds seed 000's power
                                         iteration, Algorithm 5, N iterations each)               -> spectrum.png
    hessian_density ggn_density          spectral density by stochastic Lanczos quadrature      -> spectrum.png
    hessian_trace ggn_trace              Hutchinson and Hutch++ estimates of tr(H), tr(G)        -> JSON only
    taylor                               seed 000's Taylor test (ch. 13) along --taylor-directions: random, ones
                                         (seed 000 Fig. 14.1), top (the top eigenvector, Table 15.1)
                                         -> taylor.png, taylor_ones.png, taylor_top.png
    gradcheck                            seed 001's finite-difference gradient check             -> JSON only
    surface                              loss along the top-2 Hessian eigenvectors (seed 000 Fig. 15.1)
                                         -> surface_contour.png, surface_3d.png
    hessian_explicit                     the explicit Hessian (models up to --max-explicit parameters): its full
                                         spectrum and seed 000's check ||H s - Hv(s)||_2 (sec. 14.2) -> full_spectrum.png

Shorthands: spectrum = hessian_top hessian_bottom ggn_top; density = hessian_density; trace = hessian_trace
ggn_trace; full = hessian_explicit. Without names: spectrum density trace taylor surface, and full when the model is
small enough. A Taylor test whose slopes are nan or rest on too few points (float32: the remainders sink below
round-off) prints why. Bad input: one line, exit code 2.

    curvlab-diagnose outputs/2026-11-22/06-22-55
    curvlab-diagnose outputs/2026-11-22/06-22-55 spectrum taylor --k 5 --batch-size 500 --dtype float64
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

from optimizers import diagnostics as diag
from optimizers.diagnostics import plots
from optimizers.objective import Objective
from runner.diagnostics import DIAGNOSTICS, SHORTHANDS, DiagnosticsOptions, taylor_note
from validation.checks import OptionError

DEFAULT = ("spectrum", "density", "trace", "taylor", "surface", "full")
DIRECTIONS = ("random", "ones", "top")
PNG = {"random": "taylor.png", "ones": "taylor_ones.png", "top": "taylor_top.png"}
SPECTRA = ("hessian_top", "hessian_bottom", "ggn_top", "hessian_top_power")


def fail(message: str) -> NoReturn:
    print(f"diagnose: {message}", file=sys.stderr)
    sys.exit(2)


def expand(names: list[str]) -> list[str]:
    """Registry names (shorthands expanded, in order, each once); exit 2 naming the valid names for any other."""
    bad = [name for name in names if name not in DIAGNOSTICS and name not in SHORTHANDS]
    if bad:
        shorthands = "; ".join(f"{k} = {' '.join(v)}" for k, v in SHORTHANDS.items())
        fail(f"unknown diagnostic(s) {bad}; choose from {list(DIAGNOSTICS)} or the shorthands ({shorthands}).")
    out: list[str] = []
    for name in names:
        out += [n for n in SHORTHANDS.get(name, (name,)) if n not in out]
    return out


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


def options(args: argparse.Namespace, trace_method: str = "hutchinson") -> DiagnosticsOptions:
    """The registry's options record from the command line (the keys the training loop reads from its config)."""
    return DiagnosticsOptions(k=args.k, probes=args.probes, trace_method=trace_method, slq_probes=args.slq_probes,
                              slq_steps=args.slq_steps, seed=args.seed)


def run_registered(obj: Objective, args: argparse.Namespace, names: list[str], records: dict) -> None:
    """Every name whose registry entry runs as it does during training (Lanczos, traces, densities, gradcheck); the
    traces with both estimators (`<name>` Hutchinson, `<name>_hutchpp` Hutch++)."""
    for name in names:
        if name in ("taylor", "surface", "hessian_explicit"):
            continue
        records[name] = DIAGNOSTICS[name].run(obj, options(args))
        if name.endswith("_trace"):
            records[f"{name}_hutchpp"] = DIAGNOSTICS[name].run(obj, options(args, "hutch++"))
    if args.power and "hessian_top" in names:  # seed 000 Algorithm 5: a fixed number of iterations per eigenpair
        records["hessian_top_power"] = diag.power_iteration(obj, k=args.k, seed=args.seed, tol=0.0,
                                                            max_iters=args.power)


def plot_spectrum(args: argparse.Namespace, out: Path, records: dict) -> None:
    pairs = [records[k] for k in SPECTRA if k in records]
    density = records.get("hessian_density") or records.get("ggn_density")
    if pairs or density is not None:
        shown = " and ".join(([f"Hessian top/bottom-{args.k} and GGN top-{args.k} eigenvalues (Lanczos)"] if pairs
                              else []) + (["spectral density (SLQ)"] if density is not None else []))
        fig = plots.plot_spectrum(pairs, density, title=f"{shown}\n{args.label}")
        fig.savefig(out / "spectrum.png", dpi=args.dpi)


def top_two(obj: Objective, records: dict, args: argparse.Namespace) -> diag.Eigenpairs:
    if "hessian_top" not in records or len(records["hessian_top"].eigenvalues) < 2:
        records["hessian_top"] = diag.eigenpairs(obj, k=max(2, args.k), seed=args.seed)
    return records["hessian_top"]


def taylor_direction(obj: Objective, records: dict, args: argparse.Namespace, name: str) -> torch.Tensor | None:
    """None: the test's own random unit direction (from --seed)."""
    if name == "ones":  # seed 000 sec. 14.1: "a uniform (unit) vector across all 3192 dimensions"
        return torch.ones(obj.numel, dtype=obj.params[0].dtype, device=obj.params[0].device)
    return top_two(obj, records, args).eigenvectors[0] if name == "top" else None


def run_taylor(obj: Objective, args: argparse.Namespace, out: Path, records: dict, notes: dict) -> None:
    titles = {"random": "random unit direction", "ones": "constant unit direction", "top": "top Hessian eigenvector"}
    distances = torch.logspace(args.h_max, args.h_min, args.h_max - args.h_min + 1, dtype=torch.float64)
    for name in args.taylor_directions:
        direction = taylor_direction(obj, records, args, name)
        test = DIAGNOSTICS["taylor"].run(obj, options(args), direction=direction, distances=distances)
        records[f"taylor_{name}"] = test
        note = taylor_note(test)
        title = f"Taylor test, {titles[name]}\n{args.label}"
        if note is not None:
            notes[f"taylor_{name}"] = note
            title += f"\n{str(test.direction.dtype).removeprefix('torch.')}: slopes below round-off, see diagnostics.json"
        plots.plot_taylor(test, title).savefig(out / PNG[name], dpi=args.dpi)


def run_surface(obj: Objective, args: argparse.Namespace, out: Path, records: dict) -> None:
    top = top_two(obj, records, args)
    surface = DIAGNOSTICS["surface"].run(obj, options(args), radius=args.radius, grid=args.grid, top=top)
    records["surface"] = surface
    lam = top.eigenvalues.tolist()
    labels = (f"v1 (lambda = {lam[0]:.4g})", f"v2 (lambda = {lam[1]:.4g})")
    for kind, name in (("contour", "surface_contour.png"), ("3d", "surface_3d.png")):
        plots.plot_surface(surface, kind, f"loss along the top-2 Hessian eigenvectors\n{args.label}", labels).savefig(
            out / name, dpi=args.dpi)


def run_explicit(obj: Objective, args: argparse.Namespace, out: Path, records: dict) -> None:
    """``hessian_explicit``: records ``full_spectrum`` and ``hvp_check`` (runner.diagnostics._explicit_hessian)."""
    found = DIAGNOSTICS["hessian_explicit"].run(obj, options(args))
    records.update(found)
    values = torch.tensor(found["full_spectrum"]["eigenvalues"], dtype=torch.float64)
    title = f"all {obj.numel} eigenvalues of the explicit Hessian\n{args.label}"
    plots.plot_spectrum(full=values, title=title).savefig(
        out / "full_spectrum.png", dpi=args.dpi)


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


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="curvlab-diagnose", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="names: " + ", ".join(DIAGNOSTICS) + "; shorthands: " + ", ".join(SHORTHANDS))
    p.add_argument("run", type=Path, help="the run folder (holds config.yaml and checkpoint.pt)")
    p.add_argument("what", nargs="*", help=f"diagnostic names or shorthands (default: {' '.join(DEFAULT)})")
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
    p.add_argument("--probes", type=int, default=100, help="products for the trace estimates (at least 3: Hutch++)")
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
    args.names = expand(args.what) if args.what else None
    wrong = [d for d in args.taylor_directions if d not in DIRECTIONS]
    if wrong:
        fail(f"--taylor-directions: unknown direction(s) {wrong}; choose from {list(DIRECTIONS)}.")
    for name in ("k", "probes", "slq_probes", "slq_steps", "grid", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} {value} must be a positive integer.")
    if args.probes < 3:
        fail(f"--probes {args.probes} must be at least 3 (Hutch++ splits them in three).")
    if args.h_min >= args.h_max or args.power < 0 or not args.radius > 0 or args.seed < 0:
        fail("need --h-min < --h-max, --power >= 0, --radius > 0 and --seed >= 0.")
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0, or 2 (bad input; `fail` exits)."""
    args = parse(argv)
    cfg, model, splits, dtype = load_run(args.run, args)
    model.train(args.mode == "train")
    x, y = batch(cfg, splits, args, dtype)
    args.label = describe(args.run, args, int(x.shape[0]))
    obj = Objective(model, splits.loss, x, y)
    names = args.names or [n for n in expand(list(DEFAULT)) if n != "hessian_explicit" or obj.numel <= args.max_explicit]
    if "hessian_explicit" in names and obj.numel > args.max_explicit:
        fail(f"'hessian_explicit' (full) needs the explicit {obj.numel} x {obj.numel} Hessian; the limit is "
             f"--max-explicit={args.max_explicit}.")
    out = args.out or args.run / "diagnostics"
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, Any] = {}
    notes: dict[str, str] = {}
    try:
        run_registered(obj, args, names, records)
    except OptionError as exc:
        fail(str(exc))
    plot_spectrum(args, out, records)
    if "taylor" in names:
        run_taylor(obj, args, out, records, notes)
    if "surface" in names:
        run_surface(obj, args, out, records)
    if "hessian_explicit" in names:
        run_explicit(obj, args, out, records)
    dumped = {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in records.items()}
    for name, note in notes.items():
        dumped[name]["note"] = note
    summary = {"run": str(args.run), "label": args.label, "weights": args.weights, "batch_size": int(x.shape[0]), "mode": args.mode,
               "dtype": str(dtype).split(".")[1], "numel": obj.numel, "loss": float(obj.loss()), **dumped}
    (out / "diagnostics.json").write_text(json.dumps(summary, indent=1))
    for name, record in records.items():
        print(name, {k: round(v, 6) for k, v in record.scalars().items()} if hasattr(record, "scalars") else
              {k: v for k, v in record.items() if k != "eigenvalues"})
        if name in notes:
            print(f"  note: {notes[name]}")
    print(f"diagnose: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
