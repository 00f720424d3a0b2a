"""Image lists for evaluation: an ImageFolder tree, or a folder of images plus a ``file,label`` CSV.

Broken files do not stop an evaluation: the dataset returns a marker for them and ``collate_skip_broken``
drops the markers from the batch and passes their names on, so they are reported and counted.

>>> from tokenreduce.measure.data import image_list
>>> files, labels, classes = image_list("val/")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..core.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


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
