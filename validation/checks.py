"""One set of checks for every user-facing option, and one message format.

A check is a function ``check(key, value) -> value`` that returns the value (normalised: ``int`` for an integer
option, ``float`` for a number, ``list`` for a list) or raises :class:`OptionError` naming the key as the user types
it on the command line::

    optimizer.lr=abc must be a finite number.
    optimizer.cg_min_iters=2.5 must be an integer >= 0.

Hyperparameters of a method are a frozen dataclass (:class:`Options`) whose fields carry their check, so each
hyperparameter is written once: its name, default, check and comment live on one line.

    @dataclass(frozen=True)
    class SGDOptions(Options):
        lr: float = option(0.05, positive)          # step size

``Options.build(owner, kwargs)`` turns keyword arguments (from Python or from a Hydra config) into a validated
instance; unknown keys are rejected with the list of valid ones. :func:`check_call` gives the same guarantees to the
builder functions of the free-form config groups (datasets, models) from their type annotations.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

Check = Callable[[str, Any], Any]


class OptionError(ValueError):
    """A user-facing option has a wrong type or value. The message names the key as typed on the command line."""


def _show(value: Any) -> str:
    """The value as the user typed it: strings without quotes, containers as lists."""
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return repr(value)


def fail(key: str, value: Any, requirement: str) -> typing.NoReturn:
    raise OptionError(f"{key}={_show(value)} {requirement}")


# ---------------------------------------------------------------------------------------------- scalar checks
def finite(key: str, value: Any) -> float:
    """A finite real number (not a bool, not nan or inf)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        fail(key, value, "must be a finite number.")
    return float(value)


def positive(key: str, value: Any) -> float:
    if not finite(key, value) > 0:
        fail(key, value, "must be a finite number > 0.")
    return float(value)


def nonnegative(key: str, value: Any) -> float:
    if not finite(key, value) >= 0:
        fail(key, value, "must be a finite number >= 0.")
    return float(value)


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """A finite number in [low, high]; ``low_open``/``high_open`` exclude the end points (an infinite end is open)."""
    if math.isinf(high):
        requirement = f"must be a finite number {'>' if low_open else '>='} {low:g}."
    elif math.isinf(low):
        requirement = f"must be a finite number {'<' if high_open else '<='} {high:g}."
    else:
        requirement = f"must lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}."

    def check(key: str, value: Any) -> float:
        x = finite(key, value)
        if x < low or (low_open and x == low) or x > high or (high_open and x == high):
            fail(key, value, requirement)
        return x

    return check


def integer(minimum: int) -> Check:
    """An integer >= ``minimum`` (bools are rejected; 3.0 is accepted as 3)."""

    def check(key: str, value: Any) -> int:
        if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                or value != int(value) or value < minimum):
            fail(key, value, f"must be an integer >= {minimum}.")
        return int(value)

    return check


positive_int = integer(1)
nonnegative_int = integer(0)


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        fail(key, value, "must be true or false.")
    return value


def one_of(*choices: Any) -> Check:
    def check(key: str, value: Any) -> Any:
        if isinstance(value, bool) or value not in choices:
            fail(key, value, f"is not one of: {', '.join(map(str, choices))}.")
        return value

    return check


def optional(inner: Check) -> Check:
    """``None`` (null in YAML) or what ``inner`` accepts."""

    def check(key: str, value: Any) -> Any:
        return None if value is None else inner(key, value)

    return check


def sequence_of(inner: Check, *, length: int | None = None) -> Check:
    """A list (or tuple) whose every item passes ``inner``; returned as a list."""

    def check(key: str, value: Any) -> list:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            fail(key, value, "must be a list, e.g. [1,2].")
        if length is not None and len(value) != length:
            fail(key, value, f"must be a list of {length} items.")
        return [inner(f"{key}[{i}]", item) for i, item in enumerate(value)]

    return check


# ---------------------------------------------------------------------------------------------- options records
def option(default: Any, check: Check | None = None) -> Any:
    """A dataclass field holding a default and the check its value must pass."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"check": check})
    return dataclasses.field(default=default, metadata={"check": check})


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every method's hyperparameters: each field is validated once, when the record is made.

    Subclasses list fields made with :func:`option` and may override :meth:`validate` for rules that tie several
    fields together. ``group`` is the config group the keys live in (for the messages).
    """

    group: ClassVar[str] = "optimizer"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            value = _plain(getattr(self, f.name))
            object.__setattr__(self, f.name, check(self.key(f.name), value) if check else value)
        self.validate()

    def key(self, name: str) -> str:
        return f"{self.group}.{name}"

    def validate(self) -> None:
        """Rules across fields; raise with :func:`fail`."""

    @classmethod
    def build(cls, owner: str, kwargs: Mapping[str, Any]) -> Options:
        """An instance from keyword arguments; an unknown key is an OptionError listing the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise OptionError(
                f"{cls.group}.{unknown[0]} is not an option of {owner}. Valid keys: {', '.join(names)}.")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _plain(value: Any) -> Any:
    """OmegaConf containers (Hydra passes ListConfig/DictConfig) as plain lists and dicts."""
    if hasattr(value, "_content") or hasattr(value, "_metadata"):  # an OmegaConf node, without importing omegaconf
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


# ---------------------------------------------------------------------------------------------- builder calls
def check_call(group: str, fn: Callable, kwargs: Mapping[str, Any], *, supplied: Sequence[str] = ()) -> dict:
    """Keyword arguments for ``fn`` from a config group, checked against its signature and annotations.

    Unknown keys, missing required ones and values whose type contradicts the annotation (``int``, ``float``,
    ``bool``, ``str``, sequences of those, ``Optional``/unions, ``Literal``) raise OptionError naming ``group.key``.
    ``supplied`` lists the arguments the caller passes itself (e.g. ``input_shape``); they are not config keys, and
    setting one in the group is an error too. Value ranges stay the builder's job.
    """
    params = inspect.signature(fn).parameters
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in supplied]
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)  # a class: its __init__
    except Exception:  # noqa: BLE001 -- unresolvable annotations: check names only
        hints = {}
    out = {}
    for key, value in kwargs.items():
        value = _plain(value)
        if (key not in params and not open_kwargs) or key in supplied:
            raise OptionError(f"{group}.{key} is not an option of {group} '{_name(fn)}'. "
                              f"Valid keys: {', '.join(valid) or 'none'}.")
        if key in hints and not _matches(value, hints[key]):
            fail(f"{group}.{key}", value, f"must be {_describe(hints[key])}.")
        out[key] = value
    missing = [n for n in valid if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise OptionError(f"{group}.{missing[0]} is missing: {group} '{_name(fn)}' needs it (set it with "
                          f"+{group}.{missing[0]}=...).")
    return out


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", getattr(fn, "__name__", str(fn)))


def _args(tp: Any) -> tuple:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    if _is_union(tp):
        return any(_matches(value, t) for t in _args(tp))
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in _args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            return False
        inner = _args(tp)
        if origin is tuple and len(inner) == 2 and inner[1] is Ellipsis:
            inner = inner[:1]
        if origin is tuple and inner and len(inner) > 1:
            return len(value) == len(inner) and all(_matches(v, t) for v, t in zip(value, inner))
        return not inner or all(_matches(v, inner[0]) for v in value)
    if origin in (dict, Mapping) or tp in (dict,):
        return isinstance(value, Mapping)
    return True  # other annotations (classes, callables) are the builder's to check


def _describe(tp: Any) -> str:
    if _is_union(tp):
        parts = [_describe(t) for t in _args(tp) if t is not type(None)]
        text = " or ".join(parts)
        return text + (" or null" if type(None) in _args(tp) else "")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of: " + ", ".join(map(str, _args(tp)))
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        inner = [t for t in _args(tp) if t is not Ellipsis]
        if len(inner) == 1:
            return f"a list of {_plural(_describe(inner[0]))}, e.g. [1,2]"
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _plural(text: str) -> str:
    return {"an integer": "integers", "a finite number": "numbers", "a string": "strings",
            "true or false": "booleans"}.get(text, text)
