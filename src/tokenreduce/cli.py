"""The ``tokenreduce`` command: one subcommand per module of ``tokenreduce.commands``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .core.errors import TokenReduceError

COMMANDS = ("flops", "bench", "eval", "viz", "demo", "train", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenreduce", description="Token reduction for Vision Transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tokenreduce.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"tokenreduce.commands.{name}":
                raise
            continue  # a command not built yet
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (TokenReduceError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        # Bad input (tokenreduce's own errors) or a bad path: one line, exit 2. Anything else is a bug in the
        # library and keeps its traceback (exit 1).
        print(f"tokenreduce {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
