"""The floors of pyproject.toml's dependencies (``torch>=X`` -> ``X``), for .ci/lowest.

    python3 .ci/floors.py [pyproject.toml]     # prints: TORCH TORCHVISION TIMM

Runs on every Python the package claims (``requires-python >= 3.10``): ``tomllib`` is 3.11+, so on 3.10 it
uses ``tomli`` when installed, else :func:`project_dependencies_fallback`, a reader of just the one array it
needs (``[project]`` ``dependencies = [...]``: quoted strings, commas, comments, several lines).
Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import re
import sys

FLOOR = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*")


def project_dependencies(text: str) -> list[str]:
    """``[project] dependencies`` of a pyproject.toml text: tomllib (3.11+), else tomli, else the fallback."""
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            return project_dependencies_fallback(text)
    return list(tomllib.loads(text)["project"]["dependencies"])


def project_dependencies_fallback(text: str) -> list[str]:
    """The ``dependencies`` array of the ``[project]`` table, without a TOML library.

    Reads basic ("...", with backslash escapes) and literal ('...') strings separated by commas, with comments
    and line breaks between them; anything else in the array is an error (a ValueError naming it).
    """
    section = None
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines):
        header = re.match(r"\s*\[\s*([^\]\s]+)\s*\]\s*(#.*)?$", line)
        if header:
            section = header.group(1)
            continue
        start = re.match(r"\s*dependencies\s*=\s*\[", line)
        if section == "project" and start:
            rest = line[start.end():] + "".join(lines[number + 1:])
            return _string_array(rest)
    raise ValueError("no [project] dependencies = [...] in the pyproject.toml text")


def _string_array(rest: str) -> list[str]:
    """The strings of a TOML array whose opening ``[`` was just read, up to its closing ``]``."""
    items, i = [], 0
    while i < len(rest):
        char = rest[i]
        if char in " \t\r\n,":
            i += 1
        elif char == "#":
            i = rest.find("\n", i) if "\n" in rest[i:] else len(rest)
        elif char == "]":
            return items
        elif char == "'":
            end = rest.index("'", i + 1)
            items.append(rest[i + 1:end])
            i = end + 1
        elif char == '"':
            value, i = [], i + 1
            while rest[i] != '"':
                if rest[i] == "\\":
                    value.append({"n": "\n", "t": "\t", '"': '"', "\\": "\\"}.get(rest[i + 1], rest[i + 1]))
                    i += 2
                else:
                    value.append(rest[i])
                    i += 1
            items.append("".join(value))
            i += 1
        else:
            raise ValueError(f"unexpected {rest[i:i + 20]!r} in the dependencies array")
    raise ValueError("the dependencies array is not closed")


def floors(dependencies: list[str]) -> dict[str, str]:
    """``{name: lowest version}`` of the ``name>=version`` requirements (others are left out)."""
    out = {}
    for dep in dependencies:
        match = FLOOR.fullmatch(dep)
        if match:
            out[match.group(1).lower()] = match.group(2)
    return out


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "pyproject.toml"
    with open(path, encoding="utf-8") as handle:
        floor = floors(project_dependencies(handle.read()))
    print(floor["torch"], floor["torchvision"], floor["timm"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
