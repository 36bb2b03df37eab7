"""The one adapter of ``torch.optim`` optimisers to the step contract, and its configuration by import path.

``TorchAdapter`` runs a ``torch.optim.Optimizer`` built as ``cls(params, lr=lr, **kwargs)``; a configuration is a
subclass that names ``cls`` and ``kwargs`` (``torch_optimizer``): the built-in SGD and Adam (optimizers/first_order.py),
L-BFGS (optimizers/lbfgs.py), and ``TorchOptim`` here, any subclass by import path:

    python run.py optimizer=torch_optim optimizer.cls=torch.optim.RMSprop optimizer.lr=1e-3 +optimizer.options.alpha=0.9
    python run.py optimizer=soap optimizer.lr=3e-3  # conf/optimizer/soap.yaml: pytorch_optimizer.SOAP through this

``cls`` is imported and built as ``cls(params, lr=lr, **options)``. ``lr`` is the base rate of every parameter group
(the schedule multiplies it: optimizers/schedules.py, as for SGD and Adam); ``options`` are the class's other keyword arguments, checked
against its signature, so a misspelled key names ``optimizer.options.<key>``. The adapter's own keys (``lr``,
``backward``, the schedule, ``weight_decay``) live beside them. How a step reaches the gradient
(``backward``):

* ``plain``: ``objective.backward()`` fills ``p.grad`` (the Objective's one forward and backward), then ``step()``.
* ``closure``: ``step(closure)`` for methods that re-evaluate the batch (L-BFGS-style line searches). The first call
  returns the Objective's loss and gradient at the step's start; later calls evaluate afresh at the parameters the
  method has moved in place (``objective.loss_and_gradient_at()``: same batch, same dropout masks, batch-norm running
  statistics untouched). ``p.grad`` holds a copy of each gradient and is cleared after the step.
* ``create_graph``: ``loss.backward(create_graph=True)`` for methods that read Hessian-vector products from
  ``p.grad``'s graph (AdaHessian, Sophia). The Objective's detached API cannot give that graph, so this mode
  computes ``loss_fn(model(inputs), targets)`` itself (plus eta/2 |w|^2 under weight decay), attention through the
  twice-differentiable kernel (``optimizers.functional.differentiable_twice``): it bypasses the Objective's forward
  cache and its data-parallel reduction, and so refuses to run with more than one rank.
* ``auto`` (default): ``closure`` when ``cls.step`` requires a closure (torch's L-BFGS), ``create_graph`` when the
  class documents ``backward(create_graph=True)`` (pytorch-optimizer's AdaHessian and SophiaH), else ``plain``.

In ``plain`` and ``closure`` modes the wrapped optimiser draws its random numbers (PSGD's probes) from a stream of its
own (``own_random_stream``): the same on every rank of a data-parallel run, which the global stream is not.

Weight decay (``weight_decay``) is the library's shared L2 (gradient + eta w, base class); a package's own
``options.weight_decay`` is that package's (often decoupled) decay. ``state_dict`` holds the wrapped optimiser's own
state dict (copied), in values a ``weights_only`` checkpoint can hold (``_checkpointable``).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from optimizers import monitor as step_monitor
from optimizers.base import Optimizer, clone_state
from optimizers.functional import differentiable_twice
from optimizers.interface import ObjectiveLike
from optimizers.schedules import ScheduleOptions, Scheduled
from optimizers.vec import unflatten
from validation.checks import OptionError, boolean, check_call, fail, one_of, option

BACKWARDS = ("auto", "plain", "closure", "create_graph")


@dataclass(frozen=True)
class TorchOptimOptions(ScheduleOptions):
    cls: str = option("torch.optim.SGD")  # import path of a torch.optim.Optimizer subclass, e.g. heavyball.SOAP
    options: dict = option({})  # keyword arguments of cls besides params and lr, checked against its signature
    backward: str = option("auto", one_of(*BACKWARDS))  # auto | plain | closure | create_graph (module docstring)
    check_options: bool = option(True, boolean)  # reject options that are not named arguments of cls.__init__

    def validate(self) -> None:
        resolve_class(self.cls)
        if not isinstance(self.options, Mapping):
            fail(self.key("options"), self.options, "must be a mapping of keyword arguments, e.g. {momentum: 0.9}.")
        if "lr" in self.options:
            fail(self.key("options.lr"), self.options["lr"], "is not used: the learning rate is optimizer.lr (the "
                                                             "base rate of every parameter group, as for SGD and Adam).")


# The external packages of conf/optimizer/ choices: import name -> (pip name, the pyproject.toml extra that has it).
EXTRAS = {"pytorch_optimizer": ("pytorch-optimizer", "optimizers"), "heavyball": ("heavyball", "optimizers"),
          "schedulefree": ("schedulefree", "optimizers")}


def import_extra(module: str, what: str) -> Any:
    """``importlib.import_module(module)`` for an optional extra; when it is missing, an OptionError that says what
    needs it (``what``, e.g. "optimizer=schedule_free") and the extra to install (exit code 2 in a run)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.partition(".")[0]
        if top not in EXTRAS or (exc.name or top).partition(".")[0] != top:
            raise
        pip, extra = EXTRAS[top]
        raise OptionError(f"{what} needs the {pip} package, which is not installed ({type(exc).__name__}: {exc}). "
                          f"Install the extra that has it: pip install -e \".[{extra}]\" (or pip install {pip}).") \
            from None


def resolve_class(path: Any) -> type:
    """The torch.optim.Optimizer subclass at import path ``path`` (``module.Class``)."""
    key = "optimizer.cls"
    if not isinstance(path, str) or "." not in path:
        fail(key, path, "must be the import path of a torch.optim.Optimizer subclass, e.g. torch.optim.SGD.")
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(import_extra(module_name, f"{key}={path}"), name)
    except (ImportError, AttributeError) as exc:
        fail(key, path, f"cannot be imported ({type(exc).__name__}: {exc}). Install the package that provides it "
                        "(e.g. pip install -e \".[optimizers]\") or correct the path.")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        fail(key, path, "is not a torch.optim.Optimizer subclass.")
    return cls


class TorchAdapter(Optimizer):
    """A ``torch.optim.Optimizer`` behind the step contract. A configuration implements ``torch_optimizer``; its
    Options have ``lr``. Mixing in ``optimizers.schedules.Scheduled`` schedules the rate of every parameter group."""

    def __init__(self, params: Iterable[Tensor], **options: Any):
        super().__init__(params, **options)
        cls, kwargs = self.torch_optimizer()
        self.inner = self.build(cls, kwargs)
        self.mode = self.backward_mode(cls)

    def torch_optimizer(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        """The class and its keyword arguments besides the parameters and ``lr``."""
        raise NotImplementedError

    def build(self, cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> torch.optim.Optimizer:
        return cls(self.params, lr=self.options.lr, **kwargs)

    def backward_mode(self, cls: type[torch.optim.Optimizer]) -> str:
        """plain | closure | create_graph (module docstring)."""
        return "plain"

    def learning_rate(self) -> float:
        return self.options.lr  # Scheduled: times the schedule's multiplier

    def update(self, objective: ObjectiveLike) -> dict[str, Any]:
        lr = self.learning_rate()
        for group in self.inner.param_groups:
            group["lr"] = lr
        stats: dict[str, Any] = {}
        if self.mode == "plain":
            self.inner.zero_grad(set_to_none=True)
            loss = objective.backward()
            with self.own_random_stream():
                self.inner.step()
        elif self.mode == "closure":
            loss, _, stats["closure_evals"] = self.closure_step(objective)
        else:
            loss = self._create_graph_step(objective)
        return {"loss": loss, "lr": lr, **stats, **objective.stats()}

    def closure_step(self, objective: ObjectiveLike) -> tuple[Tensor, Tensor, int]:
        """``step(closure)``: returns the loss and gradient at the step's start and the number of evaluations."""
        loss, grad = objective.loss(), objective.gradient()
        evals, monitor = 0, step_monitor.current()

        def closure() -> Tensor:
            # The method moves the parameters in place between calls: the first call is at the step's start (the
            # objective's cached forward), later ones evaluate afresh where the parameters are now.
            nonlocal evals
            evals += 1
            value, g = (loss, grad) if evals == 1 else objective.loss_and_gradient_at()
            if evals > 1 and monitor.active:
                monitor.report("function evaluation", evals, loss=float(value))
            for p, gi in zip(objective.params, unflatten(g, objective.params)):
                p.grad = gi.clone()  # the method may change p.grad in place: the objective's gradient stays intact
            return value

        with self.own_random_stream():
            self.inner.step(closure)
        for p in objective.params:
            p.grad = None
        return loss, grad, evals

    def _create_graph_step(self, objective: ObjectiveLike) -> Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise OptionError("optimizer.backward=create_graph runs in one process only: its loss bypasses the "
                              "Objective's data-parallel reduction.")
        with torch.enable_grad(), warnings.catch_warnings(), differentiable_twice():
            # torch warns that p.grad now references its own graph (a cycle); the p.grad = None below breaks it.
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            # Bypasses the Objective's forward cache: the graph of p.grad is what AdaHessian/Sophia differentiate.
            loss = objective.loss_fn(objective.model(objective.inputs), objective.targets)
            eta = float(objective.l2)
            total = loss + 0.5 * eta * sum(p.pow(2).sum() for p in self.params) if eta else loss
            total.backward(create_graph=True)
        self.inner.step()
        for p in self.params:
            p.grad = None  # free the graph the gradients hold
        return total.detach()

    _random: dict[str, Any] | None = None  # the wrapped optimiser's random stream (own_random_stream)

    @contextlib.contextmanager
    def own_random_stream(self) -> Iterator[None]:
        """The wrapped optimiser draws its random numbers (PSGD's probe vectors) from a stream of its own, seeded from
        the initial parameters: the same on every rank of a data-parallel run (the runner seeds the ranks' global
        streams apart, for their dropout masks) and on 1 or N ranks; the global stream is left as it was. Part of
        ``state_dict``, so a resumed run draws the same numbers."""
        devices = sorted({p.device.index or 0 for p in self.params if p.is_cuda})
        with torch.random.fork_rng(devices=devices):
            if self._random is None:
                first = torch.cat([p.detach().reshape(-1)[:64].double().cpu() for p in self.params])[:64]
                seed = hash(tuple(first.tolist())) % 2**63  # equal parameters (broadcast at the start): equal seeds
                torch.default_generator.manual_seed(seed)
                for i in devices:
                    torch.cuda.default_generators[i].manual_seed(seed)
            else:
                torch.set_rng_state(self._random["cpu"])
                for i, cuda_state in zip(devices, self._random["cuda"]):
                    torch.cuda.set_rng_state(cuda_state, i)
            yield
            self._random = {"cpu": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state(i) for i in devices]}

    def gradients_per_step(self) -> tuple[float, str]:
        """A rough cost per step, in gradients (one forward and backward pass over the batch), and how it comes about,
        for the runner's up-front estimate (runner/cost.py)."""
        return {"plain": (1.0, "one gradient per step"),
                "create_graph": (2.0, "~2 gradients per step (a backward through the gradient's graph)"),
                "closure": (3.0, "~3 gradients per step (a gradient and ~2 closure evaluations)")}[self.mode]

    def state_dict(self) -> dict[str, Any]:
        # torch's state dict holds live buffers (updated in place): copy them.
        state = {"steps": self.steps, "inner": _checkpointable(clone_state(self.inner.state_dict()))}
        return state if self._random is None else {**state, "random": clone_state(self._random)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.inner.load_state_dict(_checkpointable(clone_state(state["inner"]), restore=True))
        self._random = clone_state(state.get("random"))


class TorchOptim(Scheduled, TorchAdapter):
    """Runs ``cls(params, lr=lr, **options)`` through the step contract (module docstring)."""

    Options = TorchOptimOptions

    def torch_optimizer(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        cls = resolve_class(self.options.cls)
        return cls, _checked_kwargs(cls, self.options.cls, dict(self.options.options), self.options.check_options)

    def build(self, cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> torch.optim.Optimizer:
        try:
            return super().build(cls, kwargs)
        except (TypeError, ValueError) as exc:
            raise OptionError(f"{self.options.cls} rejected optimizer.lr={self.options.lr} with optimizer.options="
                              f"{_show(kwargs)}: {exc}") from exc

    def backward_mode(self, cls: type[torch.optim.Optimizer]) -> str:
        return self.options.backward if self.options.backward != "auto" else auto_backward(cls)


SET_TAG = "__set__"  # a Python set in a package's state, stored as {"__set__": [sorted items]}
# Package keys that hold code (pickled bytes the package unpickles on load) and that the package rebuilds from its
# constructor arguments: left out of a checkpoint (loading a checkpoint must never unpickle anything).
REBUILT_FROM_OPTIONS = {"heavyball": ("precond_schedule",)}  # heavyball: 1 / precondition_frequency, or its schedule


def _checkpointable(state: dict[str, Any], restore: bool = False) -> dict[str, Any]:
    """A wrapped optimiser's state dict as values a checkpoint loaded with weights_only=True can hold (``restore``:
    back): torch.dtype values of the param groups by name, Python sets (heavyball's ``is_initialized``) as tagged
    sorted lists, and no pickled code (``REBUILT_FROM_OPTIONS``)."""
    state = _dtypes_named(state, restore)
    for package, keys in REBUILT_FROM_OPTIONS.items():
        if isinstance(state.get(package), dict):
            state = {**state, package: {k: v for k, v in state[package].items() if k not in keys}}
    return _sets_tagged(state, restore)


def _sets_tagged(value: Any, restore: bool) -> Any:
    if isinstance(value, set) and not restore:
        return {SET_TAG: sorted(value)}
    if isinstance(value, dict):
        if restore and set(value) == {SET_TAG}:
            return set(value[SET_TAG])
        return {k: _sets_tagged(v, restore) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_sets_tagged(v, restore) for v in value)
    return value


def _dtypes_named(state: dict[str, Any], restore: bool = False) -> dict[str, Any]:
    """The param groups' torch.dtype values (pytorch_optimizer.Kron's precondition_dtype) as their names
    ("torch.float32"), which a checkpoint loaded with weights_only=True can hold; ``restore``: names back to dtypes."""
    if "param_groups" not in state:
        return state
    convert = _dtype_of if restore else _dtype_name
    return {**state, "param_groups": [{k: convert(v) for k, v in group.items()} for group in state["param_groups"]]}


def _dtype_name(value: Any) -> Any:
    return str(value) if isinstance(value, torch.dtype) else value


def _dtype_of(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("torch."):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        return dtype if isinstance(dtype, torch.dtype) else value
    return value


def auto_backward(cls: type) -> str:
    """closure | create_graph | plain for ``backward=auto`` (module docstring)."""
    closure = inspect.signature(cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        return "closure"
    if "create_graph=True" in (inspect.getdoc(cls) or ""):
        return "create_graph"
    return "plain"


def _checked_kwargs(cls: type, path: str, kwargs: dict[str, Any], strict: bool) -> dict[str, Any]:
    """``kwargs`` checked against ``cls.__init__``: names (``strict``: even when it also takes **kwargs, which many
    packages swallow silently) and the types its annotations state."""
    params = inspect.signature(cls.__init__).parameters
    valid = [n for n, p in params.items() if n not in ("self", "params", "lr") and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                               p.KEYWORD_ONLY)]
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in valid]
    if unknown and (strict or not open_kwargs):
        hint = " (it also takes **kwargs: set optimizer.check_options=false to pass such keys on)" if open_kwargs else ""
        raise OptionError(f"optimizer.options.{unknown[0]} is not an argument of {path}{hint}. "
                          f"Valid keys: {', '.join(valid) or 'none'}.")
    if unknown:  # passed on unchecked to the class's **kwargs
        kwargs, extra = {k: v for k, v in kwargs.items() if k in valid}, {k: kwargs[k] for k in unknown}
    else:
        extra = {}
    checked = {**check_call("optimizer.options", cls.__init__, kwargs, supplied=("self", "params", "lr")), **extra}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in checked.items()}  # betas=[0.9, 0.99] -> tuple


def _show(kwargs: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in kwargs.items()) + "}"
