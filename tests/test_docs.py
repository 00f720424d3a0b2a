"""The documentation site without building it (CI builds it with `make docs`, --strict): every page of the
navigation exists and every page is in it, the tables benchmarks/leaderboard.py writes from the committed JSONs
are up to date (the leaderboard, the method pages' numbers, the README's headline table), the README stays a first
visit's page, and the site's helpers (CLI reference, doctest blocks) do what the pages rely on."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        for value in (entry.values() if isinstance(entry, dict) else [entry]):
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_of_the_navigation_exists_and_every_page_is_in_it():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), "a page is in the navigation twice"
    missing = [page for page in nav if not (DOCS / page).is_file()]
    assert not missing, f"pages in mkdocs.yml's nav that do not exist: {missing}"
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "_generated" not in p.parts}
    assert pages == set(nav), f"pages not in the navigation: {sorted(pages - set(nav))}"


def test_included_snippets_exist():
    for page in DOCS.rglob("*.md"):
        for name in re.findall(r'^--8<-- "([^"]+)"', page.read_text(), flags=re.M):
            assert (DOCS / "_generated" / name).is_file(), f"{page.name} includes a missing snippet {name}"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()


def test_leaderboard_and_generated_tables_are_up_to_date():
    """Regenerate every output of benchmarks/leaderboard.py in memory and compare it with the committed file."""
    if _git("rev-parse", "--is-shallow-repository") != "false":
        pytest.skip("needs the git history (the commit of each result JSON); not a full git checkout")
    leaderboard = _module(ROOT / "benchmarks" / "leaderboard.py")
    stale = [path.relative_to(ROOT).as_posix() for path, text in leaderboard.outputs().items()
             if not path.is_file() or path.read_text() != text]
    assert not stale, f"out of date, run `python benchmarks/leaderboard.py`: {stale}"


def test_leaderboard_covers_every_method_and_links_every_number():
    page = (DOCS / "leaderboard.md").read_text()
    table = [line for line in page.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table) > 50
    methods = {line.split(" | ")[1].rstrip(" *") for line in table}
    assert {"unreduced", "GTP", "PPT", "STViT", "STViT-R", "ToMe", "Top-K", "EViT"} <= methods
    for line in table:
        values = line.strip("| ").split(" | ")[3:]
        numbers = [v for i, v in enumerate(values) if i != 1 and v]   # all but the options column
        assert numbers and all(re.fullmatch(r'\[[^\]]+\]\(/benchmarks/results/\S+\.json "\S+ @ \w+"\)', v)
                               for v in numbers), line
    for path in re.findall(r"\]\(/(benchmarks/results/[^ )]+)", page):
        assert (ROOT / path).is_file(), path


def test_readme_is_a_first_visits_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    commands = re.findall(r"^make \w+", readme, flags=re.M)
    assert commands[:2] == ["make demo", "make test"]
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), f"README links a missing page {target}"


def test_cli_reference_has_every_subcommand():
    pytest.importorskip("mkdocs")
    from tokenreduce.cli import COMMANDS

    hooks = _module(DOCS / "hooks.py")
    reference = hooks.cli_reference()
    for name in COMMANDS:
        assert f"### `tokenreduce {name}`" in reference
        assert f"usage: tokenreduce {name} " in reference


def test_doctest_blocks_become_code():
    pytest.importorskip("griffe")
    fence = _module(DOCS / "griffe_doctest.py").fence_doctests
    text = "Text.\n\n    >>> x = [1, 2][-1]\n    >>> x\n    2\n\nMore."
    assert fence(text) == "Text.\n\n    ```pycon\n    >>> x = [1, 2][-1]\n    >>> x\n    2\n    ```\n\nMore."
    roles = _module(DOCS / "griffe_doctest.py").plain_roles
    assert roles("see :func:`unwrap` and :class:`~tokenreduce.Method`") == "see `unwrap` and `tokenreduce.Method`"
