"""The documents point at things that exist, and their commands work.

README.md, CONTRIBUTING.md, REPRODUCTION.md and every page of the documentation site (docs/, without docs/_pending/)
name scripts, tests, modules, config files and Hydra choices (``optimizer=hf``, ``experiment=seed002_mnist_hf``) and
give ``python run.py ...`` commands. A rename that forgets a document leaves a command that fails for the first
reader; these tests find every such reference and check it against the repository: files and modules exist, group
choices have their YAML file, every ``python run.py`` command composes (Hydra's compose API, in-process), and the
README's Quickstart runs as printed (``slow``). Links between the site's pages are checked by ``mkdocs build
--strict`` (.ci/run).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from runner.schema import register_configs

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TOP = ["README.md", "CONTRIBUTING.md", "REPRODUCTION.md"]
PAGES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").rglob("*.md") if "_pending" not in p.parts)
DOCS = TOP + PAGES
GROUPS = ["dataset", "model", "optimizer", "trainer", "logger", "diagnostics", "experiment", "search", "workload"]
PACKAGES = ["runner", "optimizers", "models", "data", "validation"]

# A path inside the repository, as the documents write it: scripts/report.py, runner/train.py, conf/x/y.yaml.
_PATH = re.compile(r"(?<![\w./-])((?:scripts|tests|runner|optimizers|models|data|conf|validation|docs)/[\w./-]*\w"
                   r"\.(?:py|yaml))")
# A group choice on a command line: optimizer=hf, optimizer=sgd,adam,hf (not optimizer.lr=..., not +optimizer=...).
_CHOICE = re.compile(r"(?<![\w.+/$-])(" + "|".join(GROUPS) + r")=([\w,]+)")
_LINK = re.compile(r"\]\(#([\w-]+)\)")
# A relative Markdown link to a file: [Install](docs/get-started/install.md), ![plot](docs/report_example.png).
_FILE_LINK = re.compile(r"\]\((?!https?:|#|mailto:)([^)\s#]+)(?:#[\w-]+)?\)")
# A dotted module or attribute in backticks: `runner.bench.curvature`, `optimizers.line_search.LineSearchOptions`.
_MODULE = re.compile(r"`((?:" + "|".join(PACKAGES) + r")(?:\.\w+)+)`")


def _read(doc: str) -> str:
    return (REPO / doc).read_text()


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def missing_paths(text: str) -> list[str]:
    return sorted({p for p in _PATH.findall(text) if not (REPO / p).exists()})


def missing_choices(text: str) -> list[str]:
    """Choices that have no ``conf/<group>/<choice>.yaml``. ``glob(pattern)`` must match at least one file; a name
    cut short by a placeholder (``seed003_mnist_mlp_<method>``, ``..._${C}_sgd``) must start at least one file; in
    ``optimizer=sgd,seed=0`` (a list of overrides, not a sweep) the last item is a key and not a choice."""
    bad = set()
    for match in _CHOICE.finditer(text):
        group, value = match.groups()
        folder = CONF / group
        after = text[match.end():match.end() + 1]
        if value == "glob" and after == "(":
            pattern = text[match.end() + 1:text.index(")", match.end())]
            include, *exclude = [p.strip().removeprefix("exclude=") for p in pattern.split(",")]
            if include == "...":  # the syntax itself, not a command
                continue
            for part in [include, *exclude]:
                if not list(folder.glob(part + ".yaml")):
                    bad.add(f"{group}=glob({part})")
            continue
        choices = value.rstrip(",").split(",")  # a trailing comma is prose: "optimizer=hf, curveball or ..."
        if after == "=":
            choices = choices[:-1]
        for i, choice in enumerate(choices):
            cut_short = i == len(choices) - 1 and after in {"<", "$", "{", "*"}
            found = list(folder.glob(choice + "*.yaml")) if cut_short else (folder / f"{choice}.yaml").exists()
            if choice != "null" and not found:
                bad.add(f"{group}={choice}")
    return sorted(bad)


def missing_anchors(text: str) -> list[str]:
    anchors = {_slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}
    return sorted({a for a in _LINK.findall(text) if a not in anchors})


def missing_links(doc: str, text: str) -> list[str]:
    """Relative links to files that do not exist, resolved against the document's folder."""
    folder = (REPO / doc).parent
    return sorted({link for link in _FILE_LINK.findall(text) if not (folder / link).exists()})


def missing_modules(text: str) -> list[str]:
    """Dotted names whose longest importable prefix is a module that lacks the rest as attributes."""
    bad = set()
    for name in set(_MODULE.findall(text)):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            module = ".".join(parts[:cut])
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if found:
                break
        else:
            bad.add(name)
            continue
        obj = importlib.import_module(module)
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                bad.add(name)
                break
            obj = getattr(obj, attr)
    return sorted(bad)


# ------------------------------------------------------------------------------------------------- run.py commands
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_INLINE = re.compile(r"`(python run\.py [^`]*)`")


def shell_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks, continuation lines joined and comments dropped."""
    commands = []
    for lang, body in _FENCE.findall(text):
        if lang not in {"bash", "sh", "shell"}:
            continue
        body = re.sub(r"\\\n\s*", " ", body)
        for line in body.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


def run_commands(text: str) -> list[str]:
    """Every ``python run.py ...`` / ``torchrun ... run.py ...`` command of a document: its bash blocks and its
    inline code."""
    found = [c for c in shell_commands(text) if re.search(r"(^|\s)run\.py(\s|$)", c)]
    found += [" ".join(m.split()) for m in _INLINE.findall(text)]
    return found


def run_overrides(command: str) -> list[str] | None:
    """The overrides of a run.py command, ready for compose: flags dropped, placeholders (``<folder>``, ``$X``,
    ``...``) dropped, each sweep cut to its first value, a glob to its first file. None: nothing to compose."""
    segment = next((s for s in re.split(r"&&|;", command) if re.search(r"(^|\s)run\.py(\s|$)", s)), None)
    if segment is None:
        return None
    tokens = shlex.split(segment)
    tokens = tokens[tokens.index("run.py") + 1:]
    if "--config-path" in tokens or "--config-name" in tokens:
        return None
    overrides = []
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
            continue
        if token in {"-p", "--package"}:
            skip_next = True
            continue
        if token.startswith("-") or "=" not in token:
            continue
        if any(mark in token for mark in ("<", "$", "...", "…")):
            key, _, value = token.partition("=")
            pattern = re.sub(r"<[^>]*>|\$\{?\w+\}?", "*", value)
            files = sorted((CONF / key).glob(pattern + ".yaml")) if key in GROUPS and "..." not in value else []
            if files:  # a group choice with a placeholder: its first file (seed003_table1_${C}_adam)
                overrides.append(f"{key}={files[0].stem}")
            continue
        key, _, value = token.partition("=")
        if "interval(" in value or value.startswith("tag("):  # an optuna search space, not a value
            continue
        if value.startswith("glob("):
            include = value[5:-1].split(",")[0]
            files = sorted((CONF / key.lstrip("+~")).glob(include + ".yaml"))
            value = files[0].stem if files else include
        else:
            override = OverridesParser.create().parse_overrides([token])[0]
            if override.is_sweep_override():  # a sweep composes as its first value
                value = next(override.sweep_string_iterator())
        overrides.append(f"{key}={value}")
    return overrides


def _compose(overrides: list[str]) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        compose("config", overrides, return_hydra_config=True)


def _all_run_commands() -> list[tuple[str, str]]:
    seen, out = set(), []
    for doc in DOCS:
        for command in run_commands(_read(doc)):
            overrides = run_overrides(command)
            if overrides is None or tuple(overrides) in seen:
                continue
            seen.add(tuple(overrides))
            out.append((doc, command))
    return out


RUN_COMMANDS = _all_run_commands()


# ---------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("doc", DOCS)
def test_every_named_file_exists(doc):
    assert missing_paths(_read(doc)) == []


def test_the_documents_name_files_and_choices():
    """The patterns find something in the documents at all (so the tests above can fail)."""
    text = "".join(_read(doc) for doc in DOCS)
    assert len(_PATH.findall(text)) > 100 and len(_CHOICE.findall(text)) > 100 and len(RUN_COMMANDS) > 50


@pytest.mark.parametrize("doc", DOCS)
def test_every_group_choice_on_a_command_line_exists(doc):
    assert missing_choices(_read(doc)) == []


@pytest.mark.parametrize("doc", TOP)
def test_every_section_and_file_link_has_its_target(doc):
    text = _read(doc)
    assert missing_anchors(text) == []
    assert missing_links(doc, text) == []


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_module_exists(doc):
    assert missing_modules(_read(doc)) == []


@pytest.mark.parametrize("doc, command", RUN_COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in RUN_COMMANDS])
def test_every_run_command_composes(doc, command):
    register_configs()
    _compose(run_overrides(command))


def test_the_checks_find_what_is_missing():
    """The extractors on a text with known good and bad references (so the tests above can fail)."""
    text = ("python scripts/report.py and scripts/no_such.py; conf/optimizer/hf.yaml; "
            "python run.py optimizer=hf,no_such_opt experiment=seed002_mnist_hf optimizer.lr=abc\n"
            "'experiment=glob(seed004_*,exclude=seed004_sgd)' 'experiment=glob(seed999_*)' experiment=seed003_mnist_mlp_<m> "
            "experiment=seed999_<m> (optimizer=sgd,seed=0)\n"
            "# A heading\nsee [it](#a-heading) and [gone](#no-heading), [a file](README.md), [none](docs/none.md)\n"
            "`runner.train.train`, `optimizers.line_search.LineSearchOptions`, `runner.no_such`, `optimizers.hf.Nope`\n")
    assert missing_paths(text) == ["scripts/no_such.py"]
    assert missing_choices(text) == ["experiment=glob(seed999_*)", "experiment=seed999_", "optimizer=no_such_opt"]
    assert missing_anchors(text) == ["no-heading"]
    assert missing_links("README.md", text) == ["docs/none.md"]
    assert missing_modules(text) == ["optimizers.hf.Nope", "runner.no_such"]
    assert _slug("Fair comparisons: tuning") == "fair-comparisons-tuning"
    assert _slug("The step contract (`optimizers/base.py`)") == "the-step-contract-optimizersbasepy"
    block = ("```bash\nCURVLAB_DATA=/d python run.py -m optimizer=sgd,adam seed=range(0,3) \\\n"
             "    'experiment=glob(seed004_*)' hydra.run.dir=<folder>   # a comment\n"
             "python scripts/report.py x\n```\nand `python run.py trainer.max_epoch=1 --cfg job`\n")
    commands = run_commands(block)
    assert [run_overrides(c) for c in commands] == [
        ["optimizer=sgd", "seed=0", "experiment=seed004_damped_newton"], ["trainer.max_epoch=1"]]
    register_configs()
    _compose(run_overrides(commands[0]))
    with pytest.raises(Exception, match="max_epoch"):
        _compose(run_overrides(commands[1]))


def test_every_script_is_documented():
    """A script nobody can find is a script nobody runs: each of scripts/*.py is named in a document."""
    text = "".join(_read(doc) for doc in DOCS)
    scripts = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "scripts").glob("*.py"))
    assert scripts, "no scripts found"
    assert [s for s in scripts if s not in text] == []


def test_the_readme_is_short_and_links_into_the_site():
    text = _read("README.md")
    assert len(text.splitlines()) <= 200
    assert "docs/get-started/install.md" in text and "docs/optimizers/index.md" in text


def _quickstart() -> list[str]:
    text = _read("README.md")
    section = text[text.index("## Quickstart"):text.index("\n## ", text.index("## Quickstart") + 5)]
    return shell_commands(section)


@pytest.mark.slow
@pytest.mark.parametrize("command", _quickstart())
def test_every_readme_quickstart_command_runs_as_printed(command, tmp_path_factory):
    """Each Quickstart command, exactly as printed, from a fresh folder (one per test session, so the report finds
    the sweeps before it), with the repository's run.py and scripts/ and the data in CURVLAB_DATA."""
    folder = tmp_path_factory.getbasetemp() / "quickstart"
    folder.mkdir(exist_ok=True)
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    if "CURVLAB_DATA=/path/to/data" in command:
        if not os.environ.get("CURVLAB_DATA"):
            pytest.skip("CURVLAB_DATA is not set")
        command = command.replace("CURVLAB_DATA=/path/to/data", f"CURVLAB_DATA={os.environ['CURVLAB_DATA']}")
    if "model=resnet50" in command:  # hours a step on a CPU and CIFAR-10 is not on disk here: composed, not run
        command = command.replace("run.py ", "run.py --cfg job ", 1)
    command = re.sub(r"(?<![\w/])(run\.py|scripts/)", lambda m: f"{REPO}/{m.group(1)}", command)
    command = re.sub(r"(^|\s)python(\s)", rf"\1{sys.executable}\2", command)
    done = subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def test_the_readme_python_example_runs():
    """The README's library example, executed as printed (digits, one epoch of HF steps)."""
    blocks = [body for lang, body in _FENCE.findall(_read("README.md")) if lang == "python"]
    assert blocks, "the README has no python example"
    for body in blocks:
        exec(compile(body, "README.md", "exec"), {})


def test_sphinx_roles_in_docstrings_become_markdown_references():
    """The API reference renders docstrings through docs/hooks/sphinx_roles.py (a griffe extension named in
    mkdocs.yml): reST roles become optional cross-references with a code title, reST's ``::`` a colon; the whole
    repository's docstrings are left as they are."""
    griffe = pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("sphinx_roles", REPO / "docs/hooks/sphinx_roles.py")
    roles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roles)
    assert "docs/hooks/sphinx_roles.py" in _read("mkdocs.yml")
    out = roles.rewrite("raises :class:`OptionError`; see :func:`~validation.checks.check_call` and "
                        ":py:meth:`the rule <Options.validate>`. Usable so::\n\n    x = 1\n\n::\n\n    y = 2\n")
    assert '<autoref identifier="OptionError" optional><code>OptionError</code></autoref>' in out
    assert '<autoref identifier="validation.checks.check_call" optional><code>check_call()</code></autoref>' in out
    assert '<autoref identifier="Options.validate" optional><code>the rule</code></autoref>' in out
    assert "Usable so:\n" in out and "::" not in out and ":class:" not in out
    module = griffe.load("validation.checks", search_paths=[str(REPO)])
    roles.SphinxRoles().on_package(pkg=module)
    text = module.docstring.value
    assert ":class:" not in text and ":func:" not in text
    assert '<autoref identifier="validation.checks.OptionError" optional>' in text
