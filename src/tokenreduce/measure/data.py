"""Image lists for evaluation: an ImageFolder tree, or a folder of images plus a ``file,label`` CSV.

Broken files do not stop an evaluation: the dataset returns a marker for them and ``collate_skip_broken``
drops the markers from the batch and passes their names on, so they are reported and counted.

The shared data and models (the benchmark classifier, CIFAR-10, the ImageNet photos) are found in one place,
:func:`data_root`: the ``--data-root`` flag, else ``$TOKENREDUCE_DATA_ROOT``, else ``shared`` beside the
repository root (``../shared`` from a checkout); the benchmarks and the tests ask it too.

>>> from tokenreduce.measure.data import image_list
>>> files, labels, classes = image_list("val/")  # doctest: +SKIP
>>> data_root() / "models" / "dinov2_s14_cifar10.safetensors"  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..core.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")

#: The environment variable naming the shared data folder (``data/``, ``models/``); the ``--data-root`` flag wins.
DATA_ROOT_ENV = "TOKENREDUCE_DATA_ROOT"
#: The default shared data folder's name, beside the repository root.
SHARED_NAME = "shared"
_OUR_PYPROJECT = re.compile(r"""^name\s*=\s*["']tokenreduce["']""", re.MULTILINE)


class DataRootNotFound(InputError):
    """No shared data folder: the flag or the environment variable names none, or the default is missing."""


def repo_root(start: str | os.PathLike | None = None) -> Path | None:
    """The tokenreduce checkout holding ``start`` (default: this package): the nearest folder above it with a
    ``pyproject.toml`` of the project named ``tokenreduce``; None for an installed package outside a checkout."""
    here = Path(start if start is not None else __file__).resolve()
    for folder in (here, *here.parents):
        pyproject = folder / "pyproject.toml"
        try:
            if pyproject.is_file() and _OUR_PYPROJECT.search(pyproject.read_text(encoding="utf-8")):
                return folder
        except OSError:
            continue
    return None


def data_root(root: str | os.PathLike | None = None, *, start: str | os.PathLike | None = None,
              check: bool = True) -> Path:
    """The shared data folder: ``root`` (a ``--data-root`` flag) when given, else ``$TOKENREDUCE_DATA_ROOT``,
    else ``shared`` beside the repository root that holds ``start`` (default: this package, see
    :func:`repo_root`).

    With ``check`` the folder must exist: otherwise :class:`DataRootNotFound` says which setting named it
    and how to set one. ``check=False`` returns the folder that would be used (a script's module-level
    default), still raising when there is no setting and no repository to take the default from.
    """
    env = os.environ.get(DATA_ROOT_ENV, "")
    if root is not None and str(root) != "":
        folder, source = Path(root).expanduser(), f"--data-root {str(root)!r}"
    elif env:
        folder, source = Path(env).expanduser(), f"{DATA_ROOT_ENV}={env!r}"
    else:
        repo = repo_root(start)
        if repo is None:
            raise DataRootNotFound(f"no shared data folder: tokenreduce is not inside its repository, so there is "
                                   f"no '../{SHARED_NAME}' beside it; set {DATA_ROOT_ENV} (or pass --data-root) "
                                   f"to the folder holding data/ and models/")
        folder, source = repo.parent / SHARED_NAME, f"the default ('{SHARED_NAME}' beside the repository {repo.name})"
    if check and not folder.is_dir():
        raise DataRootNotFound(f"the shared data folder {str(folder)!r} of {source} does not exist; set "
                               f"{DATA_ROOT_ENV} (or pass --data-root) to the folder holding data/ and models/")
    return folder


def shared_path(*parts: str, root: str | os.PathLike | None = None) -> Path:
    """A file or folder of the shared data (``shared_path("models", "x.safetensors")``); a clear error naming
    the data root and how to change it when it is not there."""
    path = data_root(root).joinpath(*parts)
    if not path.exists():
        raise DataRootNotFound(f"{str(path)!r} does not exist in the shared data folder; set {DATA_ROOT_ENV} "
                               f"(or pass --data-root) to the folder holding {'/'.join(parts)}")
    return path


def resolve_data_path(path: str | None, root: str | os.PathLike | None = None) -> str | None:
    """A command-line path, looked up in the shared data folder when it is relative and not found from the
    current folder (``--data data/cifar10/test`` from anywhere); unchanged otherwise, so the command's own
    "does not exist" error follows. A ``--data-root`` that is not a folder is an error of its own."""
    if path is None or Path(path).expanduser().is_absolute() or Path(path).exists():
        return path
    try:
        folder = data_root(root)
    except DataRootNotFound:
        if root is not None:
            raise
        return path
    candidate = folder / path
    return str(candidate) if candidate.exists() else path


def portable_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """How results files name a shared file: ``../shared/models/x`` (or ``$TOKENREDUCE_DATA_ROOT/models/x`` when
    the variable or ``root`` chose the folder), never this machine's absolute path; other paths unchanged."""
    try:
        folder = data_root(root, check=False).resolve()
        relative = Path(path).resolve().relative_to(folder)
    except (DataRootNotFound, ValueError):
        return str(path)
    prefix = f"../{SHARED_NAME}" if root is None and not os.environ.get(DATA_ROOT_ENV) else f"${DATA_ROOT_ENV}"
    return f"{prefix}/{relative.as_posix()}"


def image_list(data_dir: str | Path, labels_csv: str | Path | None = None) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) of a dataset; labels are -1 when unknown.

    - ``labels_csv`` given: rows ``file,label`` (a header row is skipped), files relative to ``data_dir``;
    - ``data_dir`` with sub-folders: an ImageFolder tree, label = index of the sorted folder name;
    - otherwise every image file in ``data_dir`` (sorted), without labels (agreement still works).
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    if labels_csv is not None:
        files, labels = [], []
        with open(labels_csv, newline="") as handle:
            for row_number, row in enumerate(csv.reader(handle), start=1):
                if not row or (row_number == 1 and not row[-1].strip().lstrip("-").isdigit()):
                    continue  # blank line or header
                if len(row) < 2:
                    raise InputError(f"{labels_csv}:{row_number}: expected 'file,label', got {row!r}")
                try:
                    labels.append(int(row[1]))
                except ValueError as err:
                    raise InputError(f"{labels_csv}:{row_number}: label {row[1]!r} is not an integer") from err
                files.append(root / row[0].strip())
        return files, labels, []
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes:
        files, labels = [], []
        for index, name in enumerate(classes):
            for path in sorted((root / name).rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(path)
                    labels.append(index)
        return files, labels, classes
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return files, [-1] * len(files), []


class ImageListDataset(Dataset):
    """Images by index; a file that cannot be read yields ``(None, label, index)`` instead of raising."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], transform: Callable[[Image.Image], Any]):
        self.files, self.labels, self.transform = list(files), list(labels), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, int]:
        try:
            with Image.open(self.files[index]) as image:
                tensor = self.transform(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            return None, self.labels[index], index
        return tensor, self.labels[index], index


def collate_skip_broken(batch: list[tuple[torch.Tensor | None, int, int]]) -> dict[str, Any]:
    """Stack the readable samples; the indices of broken ones go to ``broken``."""
    good = [item for item in batch if item[0] is not None]
    return {
        "images": torch.stack([item[0] for item in good]) if good else None,
        "labels": torch.tensor([item[1] for item in good], dtype=torch.long),
        "indices": [item[2] for item in good],
        "broken": [item[2] for item in batch if item[0] is None],
    }


def shard_indices(count: int, rank: int, world_size: int) -> list[int]:
    """Indices ``rank, rank + world, ...``: every sample on exactly one rank, none repeated as padding."""
    return list(range(rank, count, world_size))
