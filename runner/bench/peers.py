"""Per-step cost of curvlab's second-order methods against an SGD step and against the public implementations of the
same methods, all measured in one process, interleaved (issue 17, item 2):

    python scripts/bench_peers.py --threads 1                      # MLP 784-800-10 (b=1000), basic CIFAR CNN (b=128)
    python scripts/bench_peers.py --models mlp_800 --repeats 9
    python scripts/bench_peers.py --device cuda                    # on a GPU (wall-clock time)
    python scripts/bench_peers.py --floors                         # the components behind each method's floor
    PYTHONPATH=$PWD:/path/to/kfac-pytorch:/path/to/pytorch-curveball:/path/to/PyTorchHessianFree \\
        python scripts/bench_peers.py                               # with the peers

Rows (each method on its own copy of the same initial network, the same batch, interleaved within every repeat in a
rotating order; the median over repeats of the time per step):

* SGD step: curvlab's ``optimizer=sgd`` (momentum 0.9) through the Objective: the unit of every ratio;
* CurveBall (defaults: automatic rho, beta, lambda test every 5 steps), the mean of 5 steps (one lambda test);
  peer: the authors' PyTorch port (jotaf98/pytorch-curveball, ``lr=momentum=-1``: automatic, lambda every 5 steps);
* HF with exactly 10 CG iterations (``cg_min_iters = cg_max_iters = 10``; preconditioner, warm start, backtracking
  and the Armijo line search on, as by default), with the curvature on a quarter of the batch (the default
  ``curvature_fraction: 0.25``) and on the whole batch (1.0, what the peer does); peer: ltatzel/PyTorchHessianFree
  (BackPACK's GGN products and diagonal empirical-Fisher preconditioner, ``cg_max_iter=10``, its defaults otherwise:
  warm start 0.95, backtracking, line search, Levenberg-Marquardt);
* the bare CG solve: 10 iterations of preconditioned CG on (G + lambda I) x = -g on the whole batch, cold start, the
  gradient and the product's set-up done before the clock starts; peer: PyTorchHessianFree's ``cg`` with its GGN
  product;
* K-FAC with the empirical Fisher, factors every step, eigendecompositions every 10 steps, eigenbasis damping, KL clip
  1e-3, heavy-ball momentum 0.9: the mean of 10 steps (one eigendecomposition round); peer: gpauloski/kfac-pytorch's
  ``KFACPreconditioner`` (factors in its hooks, ``factor_update_steps=1``, ``inv_update_steps=10``, eigen method)
  before ``torch.optim.SGD(momentum=0.9)``.

Conventions matched for K-FAC (docs/benchmarks/peers.md): kfac-pytorch takes the factors from the batch-mean loss's
backward (the empirical Fisher) without undoing the mean's 1/B, so its G of a dense layer is curvlab's / B^2 and its
damping, learning rate and KL bound equivalent to curvlab's ``damping``, ``lr`` and ``kl_clip`` are those divided by
B^2 (exact for dense layers; its convolution factors also divide by powers of the T output locations, where no single
damping value matches). The cost does not depend on these values.

``--floors`` prints, instead of the comparison, the components a step is made of (the Objective's own calls: the
CurveBall products alone, one GGN product, a trial loss, the gradient, Martens' preconditioner, K-FAC's rotations and
eigendecompositions), in SGD steps of the same process: the floor of each method as specified
(docs/benchmarks/peers.md, "The floors").

Clock: ``--clock cpu`` (the default on the CPU) reads the process's CPU time, which other jobs on a shared machine do
not inflate (use ``--threads 1``); ``wall`` (the default on a GPU, with a synchronisation around every unit) reads the
wall clock. A peer that cannot be imported is reported as "skipped: not importable, set PYTHONPATH to a checkout of
...".
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
import torch.nn.functional as F

from models.basic_cnn import build_cifar_basic_cnn
from models.mlp import build_mlp
from optimizers.cg import pcg
from optimizers.curveball import CurveBall
from optimizers.first_order import SGD
from optimizers.hf import HessianFree
from optimizers.kfac import KFAC
from optimizers.objective import Objective

MODELS = {
    "mlp_800": ("MLP 784-800-10 (model=mlp_800)", lambda: build_mlp((1, 28, 28), 10, hidden=[800], activation="relu"),
                (1, 28, 28), 1000),
    "cifar_basic_cnn": ("basic CIFAR CNN of seed 003 (model=cifar_basic_cnn)",
                        lambda: build_cifar_basic_cnn((3, 32, 32), 10), (3, 32, 32), 128),
}
PEERS = {  # import name -> (repository, what else it needs)
    "curveball": ("jotaf98/pytorch-curveball", ""),
    "hessianfree": ("ltatzel/PyTorchHessianFree", " (it also needs pip install backpack-for-pytorch)"),
    "kfac": ("gpauloski/kfac-pytorch", ""),
}
CG_ITERS = 10
KFAC_SETTINGS = dict(lr=0.1, momentum=0.9, damping=0.3, kl_clip=1e-3, factor_decay=0.95, inverse_every=10)
TARGETS = {"CurveBall": "<= 1.8x SGD", "HF step": "<= 12x SGD", "K-FAC": "peer / curvlab >= 1.3"}  # issue 17


def import_peer(name: str):
    """The peer's module, or None. kfac-pytorch's ``__init__`` reads its installed version, which a source checkout
    on PYTHONPATH does not have: then it is imported with that one look-up answered."""
    try:
        return importlib.import_module(name)
    except importlib.metadata.PackageNotFoundError:
        real = importlib.metadata.version
        importlib.metadata.version = lambda dist: "source-checkout" if dist == "kfac-pytorch" else real(dist)
        try:
            for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[mod]
            return importlib.import_module(name)
        except ImportError:
            return None
        finally:
            importlib.metadata.version = real
    except ImportError:
        return None


def skipped(name: str) -> str:
    repo, extra = PEERS[name]
    return f"skipped: not importable, set PYTHONPATH to a checkout of {repo}{extra}"


# ---------------------------------------------------------------------------------------------- the timed units
@dataclass
class Unit:
    """One timed thing: ``run()`` takes ``steps`` steps (the time is divided by them); ``note()`` describes them."""

    name: str
    impl: str                                   # "curvlab" or the peer's repository
    run: Callable[[], None]
    steps: int = 1
    note: Callable[[], str] = lambda: ""
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def curvlab_units(model, x, y, device) -> list[Unit]:
    units = []

    def objective(m):
        return Objective(m, "cross_entropy", x, y)

    def stepper(opt, m, n, record=None):
        def run():
            for _ in range(n):
                stats = opt.step(objective(m))
                if record is not None:
                    record(stats)
        return run

    m = copy.deepcopy(model)
    units.append(Unit("SGD step", "curvlab", stepper(SGD(m.parameters(), lr=1e-3, momentum=0.9), m, 5), steps=5))
    m = copy.deepcopy(model)
    units.append(Unit("CurveBall step", "curvlab", stepper(CurveBall(m.parameters()), m, 5), steps=5))
    for fraction in (0.25, 1.0):
        m = copy.deepcopy(model)
        hf = HessianFree(m.parameters(), cg_min_iters=CG_ITERS, cg_max_iters=CG_ITERS, curvature_fraction=fraction)
        seen: list[dict] = []
        units.append(Unit(f"HF step, {CG_ITERS} CG iterations, curvature_fraction {fraction:g}", "curvlab",
                          stepper(hf, m, 1, seen.append), note=_hf_note(seen)))
    m = copy.deepcopy(model)
    units.append(Unit(f"CG solve, {CG_ITERS} iterations (whole batch)", "curvlab", _curvlab_cg(m, x, y)))
    m = copy.deepcopy(model)
    kfac = KFAC(m.parameters(), fisher="empirical", factor_every=1, damping_mode="eigenbasis", **KFAC_SETTINGS)
    units.append(Unit("K-FAC step (empirical Fisher; mean of 10)", "curvlab", stepper(kfac, m, 10), steps=10))
    return units


def _hf_note(seen: list[dict]) -> Callable[[], str]:
    def note() -> str:
        if not seen:
            return ""
        iters = sorted({int(s["cg/iters"]) for s in seen})
        evals = statistics.median(float(s["loss_evals"]) for s in seen)
        return f"CG iterations {iters}, median loss evaluations {evals:g}"
    return note


def _cg_set_up(m, x, y):
    obj = Objective(m, "cross_entropy", x, y)
    grad = obj.gradient("ggn")
    precond = (obj.per_sample_grad_sq_mean() + 1.0).pow(0.75)
    return obj, grad, precond


def _curvlab_cg(m, x, y) -> Callable[[], None]:
    state = {}

    def run():
        if not state:  # set up once: the gradient, the backend and the preconditioner are not part of the solve
            state["obj"], state["grad"], state["precond"] = _cg_set_up(m, x, y)
        obj, grad, precond = state["obj"], state["grad"], state["precond"]
        pcg(lambda v: torch.add(obj.ggn_vp(v), v, alpha=1.0), -grad, precond=precond, min_iters=CG_ITERS,
            max_iters=CG_ITERS, martens_tol=0.0)
    return run


def peer_units(model, x, y, device) -> tuple[list[Unit], list[str]]:
    units, messages = [], []
    batch = x.shape[0]
    curveball = import_peer("curveball")
    if curveball is None or not hasattr(curveball, "CurveBall"):
        messages.append(f"CurveBall peer {skipped('curveball')}")
    else:
        m = copy.deepcopy(model)
        opt = curveball.CurveBall(m.parameters(), lr=-1, momentum=-1)  # negative: automatic (the authors' MATLAB)

        def run_cb(m=m, opt=opt):
            for _ in range(5):
                opt.step(lambda: m(x), lambda pred: F.cross_entropy(pred, y))
        units.append(Unit("CurveBall step", PEERS["curveball"][0], run_cb, steps=5))
    hessianfree = import_peer("hessianfree")
    if hessianfree is None:
        messages.append(f"HF peer {skipped('hessianfree')}")
    else:
        units += _ltatzel_units(model, x, y)
    kfac = import_peer("kfac")
    if kfac is None or not hasattr(kfac, "preconditioner"):
        messages.append(f"K-FAC peer {skipped('kfac')}")
    else:
        m = copy.deepcopy(model)
        scale = batch**2  # kfac-pytorch's G is curvlab's / B^2 (module docstring)
        lr = KFAC_SETTINGS["lr"] / scale
        sgd = torch.optim.SGD(m.parameters(), lr=lr, momentum=KFAC_SETTINGS["momentum"])
        pre = kfac.preconditioner.KFACPreconditioner(
            m, factor_update_steps=1, inv_update_steps=KFAC_SETTINGS["inverse_every"], damping=KFAC_SETTINGS["damping"] / scale,
            factor_decay=KFAC_SETTINGS["factor_decay"], kl_clip=KFAC_SETTINGS["kl_clip"] / scale, lr=lr, compute_method="eigen")

        def run_kfac(m=m, sgd=sgd, pre=pre):
            for _ in range(10):
                sgd.zero_grad(set_to_none=True)
                F.cross_entropy(m(x), y).backward()
                pre.step()
                sgd.step()
        units.append(Unit("K-FAC step (empirical Fisher; mean of 10)", PEERS["kfac"][0], run_kfac, steps=10))
    return units, messages


def _ltatzel_units(model, x, y) -> list[Unit]:
    from hessianfree.cg import cg
    from hessianfree.optimizer import HessianFree as PeerHF
    from hessianfree.preconditioners import diag_EF_preconditioner

    repo, units = PEERS["hessianfree"][0], []
    m = copy.deepcopy(model)  # BackPACK's extend() changes the module: a copy of its own
    opt = PeerHF(m.parameters(), cg_max_iter=CG_ITERS)
    loss_fn = torch.nn.CrossEntropyLoss()

    def forward():
        out = m(x)
        return F.cross_entropy(out, y), out

    def run_hf():
        # (``opt.get_preconditioner`` returns None in this snapshot; the function it wraps gives M^-1.)
        precond = diag_EF_preconditioner(m, loss_fn, x, y, "mean", damping=opt._group["damping"], exponent=0.75)
        opt.step(forward, M_func=precond)

    def note():
        iters = opt.state.get("num_cg_iters", [])
        return f"CG iterations {sorted(set(iters))}" if iters else ""

    units.append(Unit(f"HF step, {CG_ITERS} CG iterations, curvature_fraction 1", repo, run_hf, note=note))
    state = {}
    mc = copy.deepcopy(model)

    def run_cg():
        if not state:
            precond = diag_EF_preconditioner(mc, loss_fn, x, y, "mean", damping=1.0, exponent=0.75)
            out = mc(x)
            loss = F.cross_entropy(out, y)
            params = [p for p in mc.parameters() if p.requires_grad]
            grad = torch.nn.utils.parameters_to_vector(
                torch.autograd.grad(loss, params, create_graph=True, retain_graph=True)).detach()
            state.update(loss=loss, out=out, params=params, grad=grad, precond=precond)
        s = state
        cg(A=lambda v: PeerHF._Gv(s["loss"], s["out"], s["params"], v) + 1.0 * v, b=-s["grad"], M=s["precond"],
           max_iter=CG_ITERS, martens_conv_crit=True)
    units.append(Unit(f"CG solve, {CG_ITERS} iterations (whole batch)", repo, run_cg))
    return units


# ---------------------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(units: list[Unit], repeats: int, device: torch.device) -> None:
    """Warm every unit up once, then time them ``repeats`` times, interleaved in a rotating order."""
    for unit in units:
        unit.run()
    for r in range(repeats):
        shift = r % len(units)
        for unit in units[shift:] + units[:shift]:
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            unit.run()
            sync(device)
            unit.wall.append((time.perf_counter() - w0) / unit.steps)
            unit.cpu.append((time.process_time() - c0) / unit.steps)


def problem_of(key: str, device: torch.device) -> tuple[str, torch.nn.Module, Tensor, Tensor]:
    """The model of MODELS[key] (seeded weights) and a seeded random batch (x, y)."""
    label, build, shape, batch = MODELS[key]
    torch.manual_seed(0)
    model = build().to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    return label, model, x, y


def bench(key: str, repeats: int, device: torch.device, clock: str, with_peers: bool) -> None:
    label, model, x, y = problem_of(key, device)
    batch = x.shape[0]
    units = curvlab_units(model, x, y, device)
    messages: list[str] = []
    if with_peers:
        peers, messages = peer_units(model, x, y, device)
        units += peers
    t0 = time.perf_counter()
    measure(units, repeats, device)
    ms = {(u.name, u.impl): 1e3 * statistics.median(u.cpu if clock == "cpu" else u.wall) for u in units}
    wall = {(u.name, u.impl): 1e3 * statistics.median(u.wall) for u in units}
    sgd = ms[("SGD step", "curvlab")]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n{label}, batch {batch}, {device.type}, {n_params:,} parameters; median of {repeats} repeats, "
          f"{clock} time ({time.perf_counter() - t0:.0f} s)")
    print(f"| {'measurement':52s} | {'curvlab ms':>10s} | {'x SGD':>6s} | {'peer ms':>9s} | {'x SGD':>6s} | "
          f"{'peer / curvlab':>14s} | {'target':>28s} |")
    print(f"| {'-' * 52} | {'-' * 9}: | {'-' * 5}: | {'-' * 8}: | {'-' * 5}: | {'-' * 13}: | {'-' * 28} |")
    names = list(dict.fromkeys(u.name for u in units))
    for name in names:
        ours = ms.get((name, "curvlab"))
        peer = next(((impl, v) for (n, impl), v in ms.items() if n == name and impl != "curvlab"), None)
        cells = [f"{ours:10.1f}" if ours else f"{'-':>10s}", f"{ours / sgd:6.2f}" if ours else f"{'-':>6s}",
                 f"{peer[1]:9.1f}" if peer else f"{'-':>9s}", f"{peer[1] / sgd:6.2f}" if peer else f"{'-':>6s}",
                 f"{peer[1] / ours:14.2f}" if peer and ours else f"{'-':>14s}"]
        target = next((t for k, t in TARGETS.items() if name.startswith(k)), "")
        print(f"| {name:52s} | " + " | ".join(cells) + f" | {target:>28s} |")
    for unit in units:
        note = unit.note()
        extra = f" (wall {wall[(unit.name, unit.impl)]:.1f} ms)" if clock == "cpu" else ""
        if note:
            print(f"  {unit.impl}, {unit.name}: {note}{extra}")
    for line in messages:
        print(f"  {line}")


# ---------------------------------------------------------------------------------------------- the floors
def floor_units(model, x, y) -> list[Unit]:
    """The components of the methods' steps, each timed alone (``--floors``)."""
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(n_params, generator=gen).to(x) * 1e-3
    m = copy.deepcopy(model)
    sgd = SGD(m.parameters(), lr=1e-3, momentum=0.9)
    set_up = Objective(copy.deepcopy(model), "cross_entropy", x, y)
    set_up.gradient("ggn")  # the GGN backend built: ggn_vp is one product
    evaluated = Objective(copy.deepcopy(model), "cross_entropy", x, y)
    evaluated.loss()

    def forward():
        with torch.no_grad():
            m(x)

    def forward_backward():
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()

    def curveball_products():  # J z (fused into the forward), J^T (H_L J z + g_f) keeping its graph, J dz
        o = Objective(m, "cross_entropy", x, y)
        jz = o.forward_with_jvp(v)
        dz = o.vjp(o.curvature_output_grad() + o.loss_hessian_vp(jz), keep_for_jvp=True)
        o.jvp(dz, backend="double_backward")

    mk = copy.deepcopy(model)
    kfac = KFAC(mk.parameters(), fisher="empirical", factor_every=1, damping_mode="eigenbasis", **KFAC_SETTINGS)
    for _ in range(KFAC_SETTINGS["inverse_every"]):
        kfac.step(Objective(mk, "cross_entropy", x, y))
    blocks = [b for b in kfac.blocks.values() if b.A is not None]
    grads = [torch.randn(b.G.shape[0], b.A.shape[0], generator=gen).to(x) for b in blocks]

    def decompose():
        for b in blocks:
            b.decompose()

    def precondition():
        for b, g in zip(blocks, grads):
            b.precondition(g, KFAC_SETTINGS["damping"])

    return [
        Unit("SGD step", "curvlab", lambda: sgd.step(Objective(m, "cross_entropy", x, y))),
        Unit("forward + backward (plain torch)", "curvlab", forward_backward),
        Unit("forward without graph", "curvlab", forward),
        Unit("trial loss (loss_at)", "curvlab", lambda: evaluated.loss_at(v)),
        Unit("gradient + GGN set-up (gradient('ggn'))", "curvlab",
             lambda: Objective(m, "cross_entropy", x, y).gradient("ggn")),
        Unit("one GGN product (ggn_vp, set up)", "curvlab", lambda: set_up.ggn_vp(v)),
        Unit("Martens' preconditioner (per_sample_grad_sq_mean)", "curvlab", evaluated.per_sample_grad_sq_mean),
        Unit("CurveBall: J z, J^T u, J dz in sequence", "curvlab", curveball_products),
        Unit("K-FAC: eigendecompositions, all layers", "curvlab", decompose),
        Unit("K-FAC: preconditioning, all layers", "curvlab", precondition),
    ]


def floors(key: str, repeats: int, device: torch.device, clock: str) -> None:
    label, model, x, y = problem_of(key, device)
    batch = x.shape[0]
    units = floor_units(model, x, y)
    measure(units, repeats, device)
    ms = {u.name: 1e3 * statistics.median(u.cpu if clock == "cpu" else u.wall) for u in units}
    sgd = ms["SGD step"]
    print(f"\n{label}, batch {batch}, {device.type}: the components of a step; median of {repeats} repeats, {clock} time")
    print(f"| {'component':52s} | {'ms':>9s} | {'x SGD':>6s} |")
    print(f"| {'-' * 52} | {'-' * 8}: | {'-' * 5}: |")
    for name, t in ms.items():
        print(f"| {name:52s} | {t:9.1f} | {t / sgd:6.2f} |")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = ["?"]
    return (f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {cpu}, commit {commit}, "
            f"load average {' '.join(load)}, {time.strftime('%Y-%m-%d %H:%M')}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="cpu: process CPU time (default on the CPU); wall: wall clock (default on a GPU)")
    parser.add_argument("--no-peers", action="store_true", help="curvlab only")
    parser.add_argument("--floors", action="store_true",
                        help="print the components of each method's step (its floor) instead of the comparison")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
    print(machine())
    for key in args.models:
        if args.floors:
            floors(key, args.repeats, device, clock)
        else:
            bench(key, args.repeats, device, clock, with_peers=not args.no_peers)


if __name__ == "__main__":
    main()
