"""Griffe extension (loaded by mkdocstrings, see ``mkdocs.yml``): Sphinx markup in docstrings, rewritten to Markdown.

curvlab's docstrings are read by ``help()`` and by Sphinx-minded readers, so a few of them use reStructuredText:
roles (``:class:`X```, ``:func:`~pkg.mod.f```, ``:meth:``, ``:attr:``, ``:mod:``, ``:exc:``, ``:data:``, ``:obj:``,
with or without the ``py:`` domain) and a paragraph ending in ``::`` before a literal block. Markdown renders those
as ``:class:<code>X</code>`` and a stray ``::``. This extension rewrites every docstring of the collected packages
before mkdocstrings renders it; the code is not touched:

* a role becomes a cross-reference to the object where the API reference renders it, as the code span
  ``<code>X</code>``; the target is the role's dotted path, or the name resolved in the docstring's scope. The
  reference is *optional* (mkdocs-autorefs renders an unresolved one as the plain code span, without a warning),
  so a role naming an object that the reference does not render (or a Python builtin) still builds under
  ``--strict``. ``~`` keeps the last component as the title, as in Sphinx; an explicit title (``:func:`text
  <target>```) is kept;
* ``text::`` at the end of a paragraph becomes ``text:`` and a ``::`` alone on its line is dropped (reST's literal
  block marker; the indented block after it is a Markdown code block already).

``docs/hooks/generated_tables.py`` covers the pages' own tables; this covers the docstrings.
"""
from __future__ import annotations

import html
import re
from typing import Any

from griffe import Alias, Extension, Object

_ROLE = re.compile(
    r":(?:py:)?(?P<role>class|func|meth|attr|mod|exc|data|obj|const|type|attribute|function|method)"
    r":`(?P<body>[^`]+)`"
)
_LITERAL_MARKER = re.compile(r"(?m)(?<=\S)::[ \t]*$")
_LONE_MARKER = re.compile(r"(?m)^[ \t]*::[ \t]*$\n?")


def _target(obj: Object, name: str) -> str:
    """The dotted path the role names: as written when dotted, else resolved in ``obj``'s scope when griffe can."""
    if "." in name.lstrip("."):
        return name.lstrip(".")
    try:
        return obj.resolve(name)
    except Exception:  # noqa: BLE001 - an unresolvable name stays a plain (optional) reference
        return name


def rewrite(text: str, obj: Object | None = None) -> str:
    """``text`` with its Sphinx roles as optional cross-references and reST literal markers removed."""

    def role(match: re.Match) -> str:
        body = match["body"].strip()
        explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^<>]+)>", body)
        if explicit:
            title, target = explicit["title"], explicit["target"]
        else:
            target = body.lstrip("~!")
            title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
        target = target.lstrip("~!")
        if match["role"] in ("func", "meth", "function", "method") and not title.endswith(")") and not explicit:
            title += "()"
        identifier = _target(obj, target) if obj is not None else target
        return (f'<autoref identifier="{html.escape(identifier, quote=True)}" optional>'
                f"<code>{html.escape(title)}</code></autoref>")

    text = _ROLE.sub(role, text)
    text = _LONE_MARKER.sub("", text)
    return _LITERAL_MARKER.sub(":", text)


class SphinxRoles(Extension):
    """Rewrites the docstrings of every package mkdocstrings collects (see the module docstring)."""

    def on_package(self, *, pkg: Object, **kwargs: Any) -> None:
        self._walk(pkg, set())

    def _walk(self, obj: Object, seen: set[int]) -> None:
        if isinstance(obj, Alias) or id(obj) in seen:
            return
        seen.add(id(obj))
        if obj.docstring is not None and obj.docstring.value:
            obj.docstring.value = rewrite(obj.docstring.value, obj)
        for member in obj.members.values():
            self._walk(member, seen)
