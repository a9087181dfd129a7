"""CIFAR-10 and CIFAR-100 from the canonical "python version" pickle batches.

Layouts (https://www.cs.toronto.edu/~kriz/cifar.html)::

    cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}   keys b"data", b"labels"
    cifar-100-python/{train, test, meta}                              keys b"data", b"fine_labels"

``b"data"`` is ``[N, 3072]`` uint8, each row the red, green and blue 32x32 planes.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from parallel_dkp.config import DataConfig
from parallel_dkp.data.common import (
    CACHE_DIR,
    CIFAR10_STATS,
    CIFAR100_STATS,
    DatasetInfo,
    Normalization,
    TensorImageDataset,
    check_limit,
    check_md5,
    check_root_is_folder,
    download_failed_error,
    missing_data_error,
    served_shape,
    target_size,
    to_normalized_tensor,
)


@dataclass(frozen=True)
class CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    stats: Normalization
    md5: dict[str, str]
    """Canonical md5 of each file (as listed by torchvision)."""
    torchvision_class: str
    archive_url: str


LAYOUTS = {
    "cifar10": CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key=b"labels",
        num_classes=10,
        stats=CIFAR10_STATS,
        md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        },
        torchvision_class="CIFAR10",
        archive_url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key=b"fine_labels",
        num_classes=100,
        stats=CIFAR100_STATS,
        md5={"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
        torchvision_class="CIFAR100",
        archive_url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, strings and numbers, and nothing else.

    A pickle can run arbitrary code; a dataset copied from somewhere has no business doing so.
    The allowed globals are those that numpy arrays pickled by Python 2 (the real files) and
    Python 3 (re-packed copies) refer to.
    """

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
        ("__builtin__", "bytes"),  # ... and empty bytes (an empty array's buffer)
        ("builtins", "bytes"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: a CIFAR batch holds only arrays")
        return super().find_class(module, name)


def load_batch(path: Path, *, label_key: bytes, md5: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch -> images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` int64."""
    raw = path.read_bytes()
    if md5 is not None:
        check_md5(raw, md5, what=path)
    try:
        # encoding="bytes": the real files were written by Python 2, whose str is bytes.
        batch = _ArraysOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:
        raise ValueError(f"{path}: not a CIFAR python pickle batch ({err}); get the file again") from None
    again = "the file is corrupt or not a CIFAR batch, get it again"
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict in the pickle, got {type(batch).__name__}; {again}")
    # Re-packed copies written by Python 3 may use str keys.
    batch = {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}
    for key in (b"data", label_key):
        if key not in batch:
            raise ValueError(f"{path}: no {key!r} entry (has {sorted(batch, key=repr)}); {again}")
    data = np.asarray(batch[b"data"])
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {label_key!r} must be integer class indices ({err}); {again}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}; {again}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}; {again}")
    return data.reshape(-1, 3, 32, 32), labels


def _has_files(folder: Path, layout: CifarLayout) -> bool:
    return all((folder / f).is_file() for f in layout.train_files + layout.test_files)


def locate(cfg: DataConfig, layout: CifarLayout) -> Path:
    """The ``cifar-*`` folder; ``data.root`` may be that folder or its parent."""
    check_root_is_folder(cfg.root)
    root = Path(cfg.root).expanduser() if cfg.root else CACHE_DIR / cfg.name
    candidates = [root, root / layout.folder]
    for folder in candidates:
        if _has_files(folder, layout):
            return folder
    if cfg.download:
        _download(root, layout)
        if _has_files(root / layout.folder, layout):
            return root / layout.folder
    files = ", ".join(layout.train_files + layout.test_files)
    raise missing_data_error(
        f"{cfg.name} (the python pickle files {files})",
        candidates,
        [
            f"download {layout.archive_url}, extract it and set data.root=<folder containing {layout.folder}/>",
            f"set data.download=true to download it with torchvision into {root}",
        ],
    )


def _download(root: Path, layout: CifarLayout) -> None:
    import torchvision.datasets  # only needed when downloading

    dataset_class = getattr(torchvision.datasets, layout.torchvision_class)
    try:
        dataset_class(str(root), train=True, download=True)
    except Exception as err:  # network errors come in many types
        raise download_failed_error(
            layout.torchvision_class, root, err,
            f"download {layout.archive_url} by hand, extract it and set data.root=<folder containing {layout.folder}/>",
        ) from None


def _read_split(
    folder: Path, files: tuple[str, ...], layout: CifarLayout, *, limit: int
) -> TensorImageDataset:
    images, labels = [], []
    num_read = 0
    for name in files:
        if limit and num_read >= limit:
            break  # with a limit, later batches are never needed
        data, targets = load_batch(folder / name, label_key=layout.label_key, md5=layout.md5.get(name))
        bad = targets[(targets < 0) | (targets >= layout.num_classes)]
        if bad.size:
            raise ValueError(
                f"{folder / name}: labels must lie in 0..{layout.num_classes - 1}, but {bad.size} are not (e.g. "
                f"{int(bad[0])}); the file is corrupt or another dataset's, get it again"
            )
        images.append(data)
        labels.append(targets)
        num_read += len(targets)
    data, targets = np.concatenate(images), np.concatenate(labels)
    if limit:
        data, targets = data[:limit], targets[:limit]
    return TensorImageDataset(to_normalized_tensor(data, layout.stats), torch.from_numpy(targets))


def load_cifar(cfg: DataConfig) -> tuple[TensorImageDataset, TensorImageDataset, DatasetInfo]:
    """CIFAR-10 or CIFAR-100 (``cfg.name``) as two in-memory datasets of ``[3, 32, 32]`` images
    (loaders resize them to ``data.image_size``, which ``info.input_shape`` gives)."""
    layout = LAYOUTS[cfg.name]
    folder = locate(cfg, layout)
    size = target_size(cfg.image_size)
    train_limit = check_limit("train_limit", cfg.train_limit)
    test_limit = check_limit("test_limit", cfg.test_limit)
    train = _read_split(folder, layout.train_files, layout, limit=train_limit)
    test = _read_split(folder, layout.test_files, layout, limit=test_limit)
    return train, test, DatasetInfo(cfg.name, layout.num_classes, served_shape(train.native_shape, size))
