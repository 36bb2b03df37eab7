"""The documents point at things that exist.

README.md and REPRODUCTION.md name scripts, tests, modules, config files and Hydra choices
(``optimizer=hf``, ``experiment=seed002_mnist_hf``) and link to their own sections. A rename that forgets a document
leaves a command that fails for the first reader; these tests find every such reference and check it against the
repository.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "REPRODUCTION.md"]
GROUPS = ["dataset", "model", "optimizer", "trainer", "logger", "diagnostics", "experiment", "search"]

# A path inside the repository, as the documents write it: scripts/report.py, runner/train.py, conf/x/y.yaml.
_PATH = re.compile(r"(?<![\w./-])((?:scripts|tests|runner|optimizers|models|data|conf)/[\w./-]*\w\.(?:py|yaml))")
# A group choice on a command line: optimizer=hf, optimizer=sgd,adam,hf (not optimizer.lr=..., not +optimizer=...).
_CHOICE = re.compile(r"(?<![\w.+/$-])(" + "|".join(GROUPS) + r")=([\w,]+)")
_LINK = re.compile(r"\]\(#([\w-]+)\)")


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
        folder = REPO / "conf" / group
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
        choices = value.split(",")
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


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_file_exists(doc):
    text = (REPO / doc).read_text()
    assert _PATH.findall(text), f"{doc} names no file at all: the pattern is broken"
    assert missing_paths(text) == []


@pytest.mark.parametrize("doc", DOCS)
def test_every_group_choice_on_a_command_line_exists(doc):
    text = (REPO / doc).read_text()
    assert _CHOICE.findall(text), f"{doc} names no group choice at all: the pattern is broken"
    assert missing_choices(text) == []


@pytest.mark.parametrize("doc", DOCS)
def test_every_section_link_has_its_section(doc):
    assert missing_anchors((REPO / doc).read_text()) == []


def test_the_checks_find_what_is_missing():
    """The extractors on a text with known good and bad references (so the tests above can fail)."""
    text = ("python scripts/report.py and scripts/no_such.py; conf/optimizer/hf.yaml; "
            "python run.py optimizer=hf,no_such_opt experiment=seed002_mnist_hf optimizer.lr=abc\n"
            "'experiment=glob(seed004_*,exclude=seed004_sgd)' 'experiment=glob(seed999_*)' experiment=seed003_mnist_mlp_<m> "
            "experiment=seed999_<m> (optimizer=sgd,seed=0)\n"
            "# A heading\nsee [it](#a-heading) and [gone](#no-heading)\n")
    assert missing_paths(text) == ["scripts/no_such.py"]
    assert missing_choices(text) == ["experiment=glob(seed999_*)", "experiment=seed999_", "optimizer=no_such_opt"]
    assert missing_anchors(text) == ["no-heading"]
    assert _slug("Fair comparisons: tuning") == "fair-comparisons-tuning"
    assert _slug("The step contract (`optimizers/base.py`)") == "the-step-contract-optimizersbasepy"


def test_every_script_is_documented():
    """A script nobody can find is a script nobody runs: each of scripts/*.py is named in a document."""
    text = "".join((REPO / doc).read_text() for doc in DOCS)
    scripts = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "scripts").glob("*.py"))
    assert scripts, "no scripts found"
    assert [s for s in scripts if s not in text] == []
