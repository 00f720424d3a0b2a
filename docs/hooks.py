"""mkdocs hooks of the documentation site (registered in mkdocs.yml).

- The committed benchmark results (``benchmarks/results/**`` plots and JSONs) are served in the site at the same
  path, ``benchmarks/results/...``, without being copied into ``docs/``: pages link them as
  ``/benchmarks/results/...`` and mkdocs checks those links like any other (``--strict`` fails on a missing one).
- The command-line reference: the marker ``<!-- tokenreduce-cli-help -->`` in a page becomes the ``--help`` of
  ``tokenreduce`` and of every subcommand, rendered from the argparse parsers of this checkout (``src/``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SERVED = (".png", ".json")
CLI_MARKER = "<!-- tokenreduce-cli-help -->"
HELP_WIDTH = "100"


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.rglob("*")):
        if path.is_file() and path.suffix in SERVED:
            uri = path.relative_to(ROOT).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def _parsers():
    """``(name, parser)`` of the ``tokenreduce`` command and of each subcommand, in the order of ``--help``."""
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokenreduce.cli import build_parser

    parser = build_parser()
    yield "tokenreduce", parser
    for action in parser._subparsers._group_actions:  # argparse keeps the subcommands here
        for name, sub in action.choices.items():
            yield f"tokenreduce {name}", sub


def cli_reference() -> str:
    """Markdown: one section per command with its ``--help`` as a code block (argparse's own text)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH  # argparse wraps to the terminal width: make the page the same everywhere
    try:
        parts = []
        for name, parser in _parsers():
            parts.append(f"### `{name}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
        return "\n".join(parts)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return markdown
