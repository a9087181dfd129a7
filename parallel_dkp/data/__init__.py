"""Datasets and seeded loaders: Fashion-MNIST, CIFAR-10/100, Tiny ImageNet, image folders, synthetic.

Every dataset is read offline from its canonical on-disk layout (see each module); only
Fashion-MNIST and CIFAR can be downloaded, and only with ``data.download = true``.

Example::

    train_loader, test_loader, info = build_loaders(cfg.data, seed=cfg.run.seed)
    for x, y in train_loader:  # x: [B, *info.input_shape] float32, y: [B] int64
        ...
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import Dataset

from parallel_dkp.config import DataConfig
from parallel_dkp.data.cifar import load_cifar
from parallel_dkp.data.common import ChecksumWarning, DatasetInfo, TensorImageDataset
from parallel_dkp.data.idx import load_fashion_mnist
from parallel_dkp.data.loader import BatchLoader
from parallel_dkp.data.synthetic import load_synthetic
from parallel_dkp.data.transforms import build_views

__all__ = ["BatchLoader", "ChecksumWarning", "DatasetInfo", "TensorImageDataset", "build_datasets", "build_loaders"]



# torchvision (image decoding and transforms) takes seconds to import; every rank of every
# launch would pay that, so the lazily-read datasets import it only when chosen.
def load_tiny_imagenet(cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    from parallel_dkp.data.tiny_imagenet import load_tiny_imagenet as load

    return load(cfg)


def load_image_folder(cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    from parallel_dkp.data.folder import load_image_folder as load

    return load(cfg)


_LOADERS: dict[str, Callable[[DataConfig], tuple[Dataset, Dataset, DatasetInfo]]] = {
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar,
    "cifar100": load_cifar,
    "tiny_imagenet": load_tiny_imagenet,
    "image_folder": load_image_folder,
    "synthetic": load_synthetic,
}


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    """The training and test datasets named by ``cfg.name``, with limits applied.

    ``ds[i]`` is ``(x, y)``: ``x`` a normalised float32 tensor at its stored size (the native
    size; an image folder's images each at their own), ``y`` an int in ``0 .. info.num_classes - 1``.
    ``info.input_shape`` is the shape the loaders of :func:`build_loaders` bring every example to
    (``data.image_size``). Fashion-MNIST, CIFAR and synthetic data are held in memory
    (:class:`TensorImageDataset`); Tiny ImageNet and image folders are read lazily.

    Raises:
        FileNotFoundError: the data is not on disk; the message lists where it looked and how
            to fix it.
        ValueError: a config value or a data file is invalid; the message says which.
    """
    if cfg.name not in _LOADERS:
        raise ValueError(f"data.name = {cfg.name!r} is not one of {', '.join(_LOADERS)}")
    return _LOADERS[cfg.name](cfg)


def build_loaders(cfg: DataConfig, *, seed: int) -> tuple[BatchLoader, BatchLoader, DatasetInfo]:
    """Training and test loaders yielding ``(x [B, *input_shape] float32, y [B] int64)``.

    The training loader reshuffles every epoch with a generator seeded by ``(seed, epoch)``,
    so every rank that builds it with the same seed sees the same batches in the same order,
    epoch after epoch; it drops the last incomplete batch so that every batch has
    ``cfg.batch_size`` examples, and applies ``cfg.augment`` (the random crop
    ``cfg.augment_crop`` + horizontal flip, flips included for Fashion-MNIST). The test loader
    keeps the dataset order, keeps the last smaller batch, never augments, and resizes (with
    ``cfg.test_crop_fraction`` < 1: resizes and centre-crops). Neither touches the global RNG; see
    :mod:`parallel_dkp.data.transforms` for the views.
    """
    train, test, info = build_datasets(cfg)
    is_image = len(info.input_shape) == 3
    if cfg.augment and not is_image:
        raise ValueError(
            f"data.augment crops and flips images, but {cfg.name} examples have shape {info.input_shape}; "
            "set data.augment=false"
        )
    train_view, test_view = build_views(cfg, info.input_shape[1:] if is_image else None)
    if len(train) < cfg.batch_size:
        raise ValueError(
            f"the {cfg.name} training set has {len(train)} examples (after data.train_limit = "
            f"{cfg.train_limit}), fewer than data.batch_size = {cfg.batch_size}, so it would yield "
            "no full batch; lower data.batch_size or raise data.train_limit"
        )
    if len(test) == 0:
        where = f" in data.root = {cfg.root!r}" if cfg.root else ""
        raise ValueError(
            f"the {cfg.name} test set{where} has no examples, so nothing can be evaluated; check its test "
            "files (or folder), or get the dataset again"
        )
    common = dict(batch_size=cfg.batch_size, seed=seed, num_workers=cfg.num_workers)
    train_loader = BatchLoader(train, shuffle=True, drop_last=True, view=train_view, **common)
    test_loader = BatchLoader(test, shuffle=False, drop_last=False, view=test_view, **common)
    return train_loader, test_loader, info
