"""Tiny ImageNet 200 from the extracted ``tiny-imagenet-200/`` folder, images read lazily.

Layout (http://cs231n.stanford.edu/tiny-imagenet-200.zip)::

    tiny-imagenet-200/wnids.txt                       one WordNet id per line; class = line number
    tiny-imagenet-200/train/<wnid>/images/*.JPEG      500 per class
    tiny-imagenet-200/val/images/*.JPEG               10 000, labelled by
    tiny-imagenet-200/val/val_annotations.txt         "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>"

The test split is ``val/`` (the real test split has no labels). No download: the archive is
not in torchvision.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from parallel_dkp.config import DataConfig
from parallel_dkp.data.common import (
    CACHE_DIR,
    IMAGENET_STATS,
    DatasetInfo,
    check_limit,
    check_root_is_folder,
    missing_data_error,
    target_size,
)
from parallel_dkp.data.folder import ImageListDataset, head, image_transform

FOLDER = "tiny-imagenet-200"
ARCHIVE_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
REEXTRACT = f"the archive was extracted incompletely or edited; unzip {ARCHIVE_URL} again"
NATIVE_SIZE = (64, 64)
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def locate(cfg: DataConfig) -> Path:
    """The ``tiny-imagenet-200`` folder; ``data.root`` may be that folder or its parent."""
    check_root_is_folder(cfg.root)
    root = Path(cfg.root).expanduser() if cfg.root else CACHE_DIR / "tiny_imagenet"
    candidates = [root, root / FOLDER]
    for folder in candidates:
        if (folder / "wnids.txt").is_file():
            return folder
    raise missing_data_error(
        "Tiny ImageNet (tiny-imagenet-200/wnids.txt)",
        [c / "wnids.txt" for c in candidates],
        [
            f"download {ARCHIVE_URL} and unzip it into {root}, so that {root / FOLDER / 'wnids.txt'} "
            "exists (it cannot be downloaded automatically, data.download does not apply)",
            "or set data.root=<folder containing tiny-imagenet-200/>",
        ],
    )


def read_wnids(folder: Path) -> list[str]:
    wnids = [line.strip() for line in (folder / "wnids.txt").read_text().splitlines() if line.strip()]
    if not wnids:
        raise ValueError(f"{folder / 'wnids.txt'}: is empty, expected one WordNet id per line; {REEXTRACT}")
    repeated = sorted({w for w in wnids if wnids.count(w) > 1})
    if repeated:
        raise ValueError(
            f"{folder / 'wnids.txt'}: lists {', '.join(repeated[:3])} more than once, expected distinct WordNet ids, "
            f"one per line; {REEXTRACT}"
        )
    if len(wnids) < 2:
        raise ValueError(f"{folder / 'wnids.txt'}: lists one class, a classifier needs two or more; {REEXTRACT}")
    return wnids


def _images_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def train_samples(folder: Path, wnids: list[str]) -> list[tuple[str, int]]:
    """``(path, label)`` for every training image, class by class in ``wnids.txt`` order."""
    samples = []
    for label, wnid in enumerate(wnids):
        images_dir = folder / "train" / wnid / "images"
        if not images_dir.is_dir():
            raise FileNotFoundError(f"{images_dir} is missing, but wnids.txt lists {wnid}; {REEXTRACT}")
        samples.extend((str(p), label) for p in _images_in(images_dir))
    return samples


def val_samples(folder: Path, wnids: list[str]) -> list[tuple[str, int]]:
    """``(path, label)`` for every line of ``val/val_annotations.txt``, in file order."""
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise FileNotFoundError(f"{annotations} is missing; it labels the validation images; {REEXTRACT}")
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    samples = []
    for line_number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise ValueError(
                f"{annotations}:{line_number}: expected '<file>\\t<wnid>\\t...' with a wnid from "
                f"wnids.txt, got {line!r}; {REEXTRACT}"
            )
        samples.append((str(folder / "val" / "images" / fields[0]), label_of[fields[1]]))
    # Checked now rather than when evaluation reaches them, after a whole epoch of training.
    missing = [path for path, _ in samples if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{annotations} labels {len(missing)} image(s) that do not exist, e.g. {missing[0]}; {REEXTRACT}"
        )
    return samples


def load_tiny_imagenet(cfg: DataConfig) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Tiny ImageNet as two lazy datasets of ``[3, 64, 64]`` images (loaders resize or crop them
    to ``data.image_size``, which ``info.input_shape`` gives).

    Class index = line in ``wnids.txt``. Limits take the first N images in class-interleaved
    order, so that a small limit still covers every class.
    """
    folder = locate(cfg)
    wnids = read_wnids(folder)
    size = target_size(cfg.image_size) or NATIVE_SIZE
    transform = image_transform(IMAGENET_STATS)
    train = ImageListDataset(train_samples(folder, wnids), transform=transform)
    test = ImageListDataset(val_samples(folder, wnids), transform=transform)
    if len(train) == 0:
        raise FileNotFoundError(f"no training images under {folder / 'train'}/<wnid>/images/; {REEXTRACT}")
    if len(test) == 0:
        raise FileNotFoundError(f"{folder / 'val' / 'val_annotations.txt'} labels no images; {REEXTRACT}")
    info = DatasetInfo("tiny_imagenet", len(wnids), (3, *size))
    train_limit = check_limit("train_limit", cfg.train_limit)
    test_limit = check_limit("test_limit", cfg.test_limit)
    return head(train, train.targets, train_limit), head(test, test.targets, test_limit), info
