"""A griffe extension of the documentation site (mkdocs.yml, mkdocstrings): the docstrings' doctest examples
(``>>>`` lines and their output, which ``tests/test_doctests.py`` runs) are shown as ``pycon`` code blocks instead of
being read as Markdown prose, and Sphinx roles (``:func:`x```) as code."""

from __future__ import annotations

import re

import griffe


def fence_doctests(text: str) -> str:
    """Wrap each run of lines starting with ``>>>`` (up to the next blank line: the example and its output) in a
    fenced ``pycon`` block, at the run's indentation."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        if not line.lstrip().startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


#: Sphinx roles (``:func:`unwrap```, ``:class:`~x.Y```), which Markdown does not know: shown as code.
SPHINX_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`~?([^`]+)`")


def plain_roles(text: str) -> str:
    return SPHINX_ROLE.sub(r"`\1`", text)


class DoctestBlocks(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain_roles(fence_doctests(obj.docstring.value))
