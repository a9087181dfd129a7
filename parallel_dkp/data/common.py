"""Pieces every dataset reader shares: the in-memory dataset, checksums, errors, resizing.

Readers return datasets whose examples are normalised float32 tensors at their stored size;
the loaders in :mod:`parallel_dkp.data.loader` batch and shuffle them and bring them to the
final ``input_shape`` with the views of :mod:`parallel_dkp.data.transforms` (resize, crops, flip).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

CACHE_DIR = Path.home() / ".cache" / "parallel_dkp"
"""Where downloads go and where a dataset is looked for when ``data.root`` is empty."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Attributes:
        name: ``data.name`` of the dataset.
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        input_shape: Shape of one example after resizing, e.g. ``(1, 28, 28)`` or ``(64,)``.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and standard deviation of the raw pixels scaled to [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


# Standard constants of each dataset's training split (pixels in [0, 1]).
FASHION_MNIST_STATS = Normalization(mean=(0.2860,), std=(0.3530,))
CIFAR10_STATS = Normalization(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
CIFAR100_STATS = Normalization(mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))
IMAGENET_STATS = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
"""Used for Tiny ImageNet and for user image folders, whose own statistics are unknown."""


class ChecksumWarning(UserWarning):
    """A dataset file's md5 differs from the canonical one (a re-packed copy, or corruption)."""


class TensorImageDataset(Dataset):
    """A dataset held in memory as one normalised float tensor, plus int64 labels.

    Args:
        x: ``[N, *native_shape]`` float32, already normalised, at the native size: loaders
            resize and crop each batch (:mod:`parallel_dkp.data.transforms`), because e.g.
            60 000 Fashion-MNIST images at 224x224 would need 12 GB.
        y: ``[N]`` int64 labels.

    ``ds[i]`` is ``(x_i, y_i)`` with ``x_i`` of the native shape and ``y_i`` an ``int``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} examples but {y.shape[0]} labels")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.x[index], int(self.y[index])

    @property
    def native_shape(self) -> tuple[int, ...]:
        """Shape of one stored example."""
        return tuple(self.x.shape[1:])

    def head(self, limit: int) -> TensorImageDataset:
        """The first ``limit`` examples (all when ``limit`` is 0), copied so the rest is freed."""
        if limit <= 0 or limit >= len(self):
            return self
        return TensorImageDataset(self.x[:limit].clone(), self.y[:limit].clone())


def resize_images(x_BCHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[B, C, H, W]`` to ``[B, C, *size]``, antialiased when shrinking.

    Resizing is linear, so it commutes with per-channel normalisation: resizing normalised
    images equals normalising resized ones.
    """
    return F.interpolate(x_BCHW, size=size, mode="bilinear", antialias=True, align_corners=False)


def to_normalized_tensor(pixels_u8: np.ndarray, stats: Normalization) -> torch.Tensor:
    """uint8 array ``[N, C, H, W]`` -> float32 tensor ``(pixels / 255 - mean) / std``."""
    # np.array copies, so read-only buffers (np.frombuffer) are fine and torch does not warn.
    x = torch.from_numpy(np.array(pixels_u8, dtype=np.float32))
    mean = torch.tensor(stats.mean).view(1, -1, 1, 1)
    std = torch.tensor(stats.std).view(1, -1, 1, 1)
    # In place: the float copy of CIFAR-10's training set alone is 600 MB.
    return x.div_(255.0).sub_(mean).div_(std)


def target_size(image_size: int) -> tuple[int, int] | None:
    """``data.image_size`` as ``(H, W)``, or ``None`` for the native size."""
    if image_size < 0:
        raise ValueError(f"data.image_size must be >= 0 (0 = native size), got {image_size}")
    return (image_size, image_size) if image_size else None


def served_shape(native_shape: tuple[int, ...], size: tuple[int, int] | None) -> tuple[int, ...]:
    """Shape of the examples the loaders yield: ``(C, *size)``, or ``native_shape`` without a size."""
    return tuple(native_shape) if size is None else (native_shape[0], *size)


def check_limit(name: str, value: int) -> int:
    if value < 0:
        raise ValueError(f"data.{name} must be >= 0 (0 = all examples), got {value}")
    return value


def check_md5(data: bytes, expected: str, *, what: str | Path) -> None:
    """Warn with :class:`ChecksumWarning` when ``md5(data) != expected``; never raise.

    Copies re-packed by someone else legitimately differ, so a mismatch is worth a note but
    not a refusal.
    """
    actual = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if actual != expected:
        warnings.warn(
            f"{what}: md5 {actual} differs from the canonical {expected}. Re-packed copies are "
            "fine; if results look wrong, re-download the dataset.",
            ChecksumWarning,
            stacklevel=3,
        )


def check_root_is_folder(root: str) -> None:
    """``data.root`` names a file (a common slip: the archive, or one of the dataset's files)."""
    if root and Path(root).expanduser().is_file():
        raise ValueError(
            f"data.root = {root!r} is a file, not a folder; set data.root to the folder that holds the "
            "dataset (extract archives first)"
        )


def download_failed_error(dataset: str, root: Path, err: BaseException, remedy: str) -> FileNotFoundError:
    """The data is not on disk and ``data.download`` could not fetch it (offline, a proxy, a full disk)."""
    reason = " ".join(str(err).split()) or type(err).__name__
    return FileNotFoundError(
        f"{dataset} is not in {root} and downloading it failed ({reason}). To fix, either:\n"
        f"  - {remedy}\n  - or retry data.download=true where the internet can be reached"
    )


def missing_data_error(dataset: str, looked_in: Iterable[Path], remedy: Sequence[str]) -> FileNotFoundError:
    """A ``FileNotFoundError`` naming every place looked in and each way to fix it."""
    places = "\n".join(f"  - {p}" for p in looked_in)
    fixes = "\n".join(f"  - {r}" for r in remedy)
    return FileNotFoundError(f"{dataset} not found. Looked in:\n{places}\nTo fix, either:\n{fixes}")
