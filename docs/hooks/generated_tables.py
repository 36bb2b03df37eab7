"""MkDocs hook: tables generated from the code and the configs, so that the documentation cannot drift from them.

A page asks for a table with an HTML comment on a line of its own (invisible where the Markdown is read raw):

    <!-- curvlab:options optimizer/hf -->      every option of conf/optimizer/hf.yaml: key, default, accepted, meaning
    <!-- curvlab:yaml trainer/default -->      every key of a YAML file in conf/ with its default and its comment
    <!-- curvlab:search -->                    the search space of every conf/search/ preset
    <!-- curvlab:choices model -->             every choice of a config group, its target and its header comment
    <!-- curvlab:experiments seed003_table1 --> every conf/experiment/ file whose name starts so, with its header

Optimiser options come from the method's ``Options`` dataclass (each hyperparameter is written once, there): the
default from the field, the accepted values from the field's check, the meaning from the comment that follows the
field in the source (read with ``ast``/``tokenize``; the nearest class in the ``Options`` MRO that comments the field),
else from the comment in the YAML file. An unknown request fails the build.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import math
import re
import sys
import tokenize
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
_DIRECTIVE = re.compile(r"^<!-- curvlab:(\w+)(?: +([\w/.-]+))? -->[ \t]*$", re.M)


# --------------------------------------------------------------------------------------------------- YAML comments
_YAML_KEY = re.compile(r"^(\s*)(?:- )?([\w.]+):(?:\s+(.*?))?\s*$")


def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment), leaving a ``#`` inside quotes alone."""
    quote = None
    for i, ch in enumerate(text):
        if ch in "'\"":
            quote = None if quote == ch else (quote or ch)
        elif ch == "#" and quote is None and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip(), text[i + 1:].strip()
    return text.rstrip(), ""


def yaml_entries(path: Path) -> list[tuple[str, str, str]]:
    """(dotted key, value as written, comment) for every leaf of a YAML file; comment-only lines right below a leaf
    that are indented past its key continue the leaf's comment, and a comment block right above a leaf that has no
    comment of its own describes it. ``defaults`` and ``# @package`` lines are skipped."""
    entries: list[list[str]] = []
    stack: list[tuple[int, str]] = []
    last_leaf_indent = None
    above: list[str] = []
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            indent = len(raw) - len(raw.lstrip())
            if entries and last_leaf_indent is not None and indent > last_leaf_indent:
                entries[-1][2] = f"{entries[-1][2]} {stripped.lstrip('#').strip()}".strip()
            else:
                last_leaf_indent = None
                above.append(stripped.lstrip("#").strip())
            continue
        if not stripped:
            last_leaf_indent = None
            above = []
            continue
        comment_above, above = " ".join(above), []
        body, comment = _split_comment(raw)
        match = _YAML_KEY.match(body)
        if not match:
            continue
        indent, key, value = len(match.group(1)), match.group(2), match.group(3) or ""
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        if value == "" and not comment.startswith("@"):
            stack.append((indent, key))
            last_leaf_indent = None
            continue
        if dotted.split(".")[0] == "defaults":
            continue
        entries.append([dotted, value, comment or comment_above])
        last_leaf_indent = indent
    return [tuple(e) for e in entries]


def yaml_header(path: Path) -> str:
    """The comment block at the top of a YAML file as one paragraph, up to its first command line (``python ...``);
    ``# @package`` lines are left out."""
    lines = []
    for raw in path.read_text().splitlines():
        if not raw.startswith("#"):
            break
        text = raw.lstrip("#").strip()
        if text.startswith(("python ", "torchrun ")):
            break
        if not text.startswith("@package"):
            lines.append(text)
    return " ".join(lines).strip()


# ------------------------------------------------------------------------------------------ Options field comments
@lru_cache(maxsize=None)
def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on the field's line(s) in ``cls``'s own source (not its bases')."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    source = inspect.cleandoc("\n" + source) if source[:1].isspace() else source
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    import ast

    tree = ast.parse(source)
    found: dict[str, str] = {}
    for node in tree.body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = " ".join(comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments)
            if text:
                found[node.target.id] = text
    return found


def field_comment(options_cls: type, name: str) -> str:
    for klass in options_cls.__mro__:
        if dataclasses.is_dataclass(klass) and name in _field_comments(klass):
            return _field_comments(klass)[name]
    return ""


def _fmt(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "inf" if value == math.inf else f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def describe_check(check) -> str:
    """What a ``validation.checks`` check accepts, read from the check function and its closure."""
    if check is None:
        return "any"
    name = check.__qualname__.split(".<locals>")[0]
    free = inspect.getclosurevars(check).nonlocals
    simple = {"finite": "finite number", "positive": "number > 0", "nonnegative": "number ≥ 0",
              "boolean": "true, false", "positive_int": "integer ≥ 1", "nonnegative_int": "integer ≥ 0"}
    if name in simple:
        return simple[name]
    if name == "in_range":
        low, high = free["low"], free["high"]
        left = "(" if free.get("low_open") else "["
        right = ")" if free.get("high_open") or high == math.inf else "]"
        return f"number in {left}{_fmt(low)}, {_fmt(high)}{right}".replace("-inf", "−∞").replace("inf", "∞")
    if name == "integer":
        return f"integer ≥ {free['minimum']}"
    if name == "one_of":
        return ", ".join(_fmt(c) for c in free["choices"])
    if name == "optional":
        return f"null or {describe_check(free['inner'])}"
    if name == "sequence_of":
        size = f"{free['length']} " if free.get("length") else ""
        return f"list of {size}× {describe_check(free['inner'])}"
    return name.replace("_", " ")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _compose(group: str, choice: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from runner.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", [f"{group}={choice}"])


def options_table(spec: str) -> str:
    group, _, choice = spec.partition("/")
    if group != "optimizer" or not (CONF / "optimizer" / f"{choice}.yaml").exists():
        raise ValueError(f"curvlab:options {spec}: no conf/optimizer/{choice}.yaml")
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    node = _compose("optimizer", choice).optimizer
    cls = get_class(node._target_)
    values = OmegaConf.to_container(node, resolve=True)
    yaml_comments = {k: c for k, _, c in yaml_entries(CONF / "optimizer" / f"{choice}.yaml")}
    rows = ["| key | default | accepted | meaning |", "| --- | --- | --- | --- |"]
    own = set(cls.Options.__dict__.get("__annotations__", {}))
    fields = sorted(dataclasses.fields(cls.Options), key=lambda f: f.name not in own)  # the method's own keys first
    for f in fields:
        default = values.get(f.name, None)
        meaning = field_comment(cls.Options, f.name) or yaml_comments.get(f.name, "")
        rows.append(f"| `{f.name}` | `{_cell(_fmt(default))}` | {_cell(describe_check(f.metadata.get('check')))} "
                    f"| {_cell(meaning)} |")
    module = cls.__module__
    intro = (f"`optimizer={choice}` builds `{module}.{cls.__name__}`; its keys are the fields of "
             f"`{cls.__name__}.Options` (defaults as composed from `conf/optimizer/{choice}.yaml`).")
    return intro + "\n\n" + "\n".join(rows) + "\n"


def yaml_table(spec: str) -> str:
    """Every key of conf/<spec>.yaml (Hydra's own ``hydra.*`` settings left out)."""
    path = CONF / f"{spec}.yaml"
    if not path.exists():
        raise ValueError(f"curvlab:yaml {spec}: no conf/{spec}.yaml")
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, value, comment in yaml_entries(path):
        if key.startswith("hydra.") and not spec.startswith("hydra/"):
            continue
        rows.append(f"| `{key}` | `{_cell(value)}` | {_cell(comment)} |")
    return f"Generated from `conf/{spec}.yaml`:\n\n" + "\n".join(rows) + "\n"


def search_table(_: str | None = None) -> str:
    rows = ["| preset | optimizer | key | searched (optuna distribution) | meaning |", "| --- | --- | --- | --- | --- |"]
    for path in sorted((CONF / "search").glob("*.yaml")):
        text = path.read_text()
        opt = re.search(r"override /optimizer: (\w+)", text)
        for key, value, comment in yaml_entries(path):
            if key.startswith("hydra.sweeper.params."):
                rows.append(f"| `{path.stem}` | `{opt.group(1) if opt else '?'}` | `{key.split('params.')[1]}` | "
                            f"`{_cell(value)}` | {_cell(comment)} |")
    return "\n".join(rows) + "\n"


def choices_table(group: str) -> str:
    folder = CONF / group
    if not folder.is_dir():
        raise ValueError(f"curvlab:choices {group}: no conf/{group}/")
    rows = ["| choice | builds | keys (defaults) | about |", "| --- | --- | --- | --- |"]
    for path in sorted(folder.glob("*.yaml")):
        entries = yaml_entries(path)
        target = next((v for k, v, _ in entries if k == "_target_"), "")
        keys = ", ".join(f"`{k}={_cell(v)}`" for k, v, _ in entries if k not in {"_target_", "_partial_"})
        rows.append(f"| `{path.stem}` | `{target}` | {keys} | {_cell(yaml_header(path))} |")
    return "\n".join(rows) + "\n"


def experiments_table(prefix: str | None) -> str:
    paths = sorted((CONF / "experiment").glob(f"{prefix or ''}*.yaml"))
    if not paths:
        raise ValueError(f"curvlab:experiments {prefix}: no conf/experiment/{prefix}*.yaml")
    rows = ["| experiment | what (the file's header) |", "| --- | --- |"]
    for path in paths:
        header = yaml_header(path)
        rows.append(f"| `{path.stem}` | {_cell(header[:400] + ('…' if len(header) > 400 else ''))} |")
    return "\n".join(rows) + "\n"


TABLES = {"options": options_table, "yaml": yaml_table, "search": search_table, "choices": choices_table,
          "experiments": experiments_table}


def render(markdown: str) -> str:
    def one(match: re.Match) -> str:
        kind, arg = match.group(1), match.group(2)
        if kind not in TABLES:
            raise ValueError(f"unknown table curvlab:{kind}; known: {', '.join(TABLES)}")
        return TABLES[kind](arg)

    return _DIRECTIVE.sub(one, markdown)


# ------------------------------------------------------------------------------------------------- MkDocs events
def on_startup(**_) -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def on_page_markdown(markdown: str, **_) -> str:
    return render(markdown)
