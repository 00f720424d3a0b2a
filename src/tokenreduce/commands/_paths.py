"""``--data-root``: the shared data folder of the commands that read data (eval, bench, train).

A relative ``--data``, ``--labels``, ``--checkpoint`` (or ``--val-data``) that does not exist from the current
folder is looked up in the data root, so ``--data data/cifar10/test --checkpoint
models/dinov2_s14_cifar10.safetensors`` works from anywhere; paths that exist, and absolute ones, are used as
given. The folder itself is found by ``tokenreduce.measure.data.data_root`` (the one place): this flag, else
``$TOKENREDUCE_DATA_ROOT``, else ``shared`` beside the repository root.
"""

from __future__ import annotations

import argparse

from ..measure.data import DATA_ROOT_ENV, SHARED_NAME, data_root, resolve_data_path


def add_data_root_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help=f"the shared data folder: relative data and checkpoint paths not found from the current "
                             f"folder are looked up in it (default: ${DATA_ROOT_ENV}, else '{SHARED_NAME}' beside "
                             f"the repository root)")


def resolve_data_paths(args: argparse.Namespace, *names: str) -> None:
    """Replace each named path of ``args`` by its place in the data root when it is only found there; a
    ``--data-root`` that is not a folder is an error (exit 2) even when no path needs it."""
    root = getattr(args, "data_root", None)
    if root is not None:
        data_root(root)
    for name in names:
        setattr(args, name, resolve_data_path(getattr(args, name, None), root))
