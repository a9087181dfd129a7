"""Image files on disk, loaded lazily with PIL: a user's own ``root/{train,val}/<class>/`` tree.

Also the building blocks :mod:`parallel_dkp.data.tiny_imagenet` uses: a dataset over a list of
``(path, label)`` pairs, the per-image transform, and class-interleaved limits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from parallel_dkp.config import DataConfig
from parallel_dkp.data.common import (
    IMAGENET_STATS,
    DatasetInfo,
    Normalization,
    check_limit,
    check_root_is_folder,
    missing_data_error,
    target_size,
)

TEST_SPLIT_NAMES = ("val", "test")


def image_transform(stats: Normalization) -> transforms.Compose:
    """PIL image -> normalised float32 ``[3, H, W]`` at the image's own size.

    No resize: the loader's view (:mod:`parallel_dkp.data.transforms`) resizes or crops each
    image to ``info.input_shape``, in the worker that read it, so a random crop sees the whole
    original image, as torchvision's ``RandomResizedCrop`` on a PIL image would.
    """
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(stats.mean, stats.std)])


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB (some Tiny ImageNet JPEGs are greyscale).

    Raises:
        ValueError: naming the file when it cannot be read or decoded (corrupt, truncated, not
            an image, too large), so that a bad file deep in an epoch says which one it is.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # PIL's decoding errors
        raise ValueError(
            f"{path}: cannot read this image ({err}); replace the file with a good copy, or delete it"
        ) from None


class ImageListDataset(Dataset):
    """Images listed as ``(path, label)`` pairs, opened on access.

    ``ds[i]`` is ``(x, label)`` with ``x = transform(RGB image)``.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], *, transform):
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label


def class_interleaved_order(targets: Sequence[int]) -> list[int]:
    """Indices visiting the classes round-robin, each class in its original order.

    Folder datasets list all of class 0 first, so "the first N examples" would otherwise be a
    single class; interleaved, a small ``train_limit`` still covers every class.
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(targets):
        by_class[label].append(index)
    queues = [by_class[label] for label in sorted(by_class)]
    order = []
    for rank in range(max((len(q) for q in queues), default=0)):
        order.extend(q[rank] for q in queues if rank < len(q))
    return order


def head(dataset: Dataset, targets: Sequence[int], limit: int) -> Dataset:
    """The first ``limit`` examples in class-interleaved order (all when ``limit`` is 0)."""
    if limit <= 0 or limit >= len(targets):
        return dataset
    return Subset(dataset, class_interleaved_order(targets)[:limit])


class _FixedClassesImageFolder(ImageFolder):
    """An ImageFolder whose class-to-index map is given (the training split's), not re-derived."""

    def __init__(self, root: str, *, class_to_idx: dict[str, int], **kwargs):
        self._given_class_to_idx = class_to_idx
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return list(self._given_class_to_idx), self._given_class_to_idx


def _first_image_size(dataset: ImageFolder) -> tuple[int, int]:
    width, height = load_rgb(dataset.samples[0][0]).size
    return height, width


def load_image_folder(cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    """A user's ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test/``) images.

    Classes are the training split's sub-folder names, sorted; the test split uses the same
    indices and may lack some classes. Images are converted to RGB and normalised with ImageNet
    statistics; ``ds[i]`` is at the image's own size, and the loaders resize every image to
    ``data.image_size`` or, when that is 0, to the first training image's size, so that batches
    stack. ``input_shape`` is ``(3, H, W)``.
    """
    if not cfg.root:
        raise ValueError(
            "data.name = 'image_folder' needs data.root: set data.root to a folder with train/<class>/ and "
            "val/<class>/ (or test/<class>/) sub-folders of images"
        )
    check_root_is_folder(cfg.root)
    root = Path(cfg.root).expanduser()
    train_dir = root / "train"
    test_dirs = [root / name for name in TEST_SPLIT_NAMES]
    test_dir = next((d for d in test_dirs if d.is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        missing = ([train_dir] if not train_dir.is_dir() else []) + ([] if test_dir else test_dirs)
        raise missing_data_error(
            f"image folder {root}",
            missing,
            [
                f"create {train_dir}/<class>/<images> and {root}/val/<class>/<images>",
                "or set data.root=<folder that has train/ and val/ (or test/) inside>",
            ],
        )
    try:
        train = ImageFolder(str(train_dir), loader=load_rgb)
    except FileNotFoundError as err:  # no class folders, or no images in them
        raise FileNotFoundError(f"{train_dir}: {err}; put the images in {train_dir}/<class>/<images>") from None
    unknown = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(train.class_to_idx))
    if unknown:
        raise ValueError(
            f"{test_dir} has classes {unknown} that {train_dir} lacks; every test class needs "
            "training images (or remove those folders)"
        )
    if len(train.classes) < 2:
        raise ValueError(
            f"{train_dir} has one class folder ({train.classes[0]}), but a classifier needs two or more; add a "
            f"folder of images per class, e.g. {train_dir}/<another class>/"
        )
    test = _FixedClassesImageFolder(str(test_dir), class_to_idx=train.class_to_idx, loader=load_rgb, allow_empty=True)
    if len(test) == 0:
        raise FileNotFoundError(
            f"{test_dir} holds no images in any of the classes {train.classes}; put test images in "
            f"{test_dir}/<class>/ (the class names of {train_dir})"
        )

    size = target_size(cfg.image_size) or _first_image_size(train)
    train.transform = test.transform = image_transform(IMAGENET_STATS)
    info = DatasetInfo("image_folder", len(train.classes), (3, *size))
    train_limit = check_limit("train_limit", cfg.train_limit)
    test_limit = check_limit("test_limit", cfg.test_limit)
    return head(train, train.targets, train_limit), head(test, test.targets, test_limit), info
