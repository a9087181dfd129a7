"""Fashion-MNIST from its four IDX files (gzipped or not), parsed with numpy.

IDX format (http://yann.lecun.com/exdb/mnist/): a 4-byte magic number ``00 00 TT DD`` where
``TT`` is the element type and ``DD`` the number of dimensions, then ``DD`` big-endian
uint32 sizes, then the elements in C order, big-endian.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import torch

from parallel_dkp.config import DataConfig
from parallel_dkp.data.common import (
    CACHE_DIR,
    FASHION_MNIST_STATS,
    DatasetInfo,
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

IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the four ``.gz`` files."""

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# md5 of the *decompressed* files: the .gz archives are re-compressed by packagers (Debian's
# differ from torchvision's), while the content inside is the same everywhere.
RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}

NUM_CLASSES = 10
IMAGE_SIZE = (28, 28)


def parse_idx(data: bytes, *, source: str | Path = "<bytes>") -> np.ndarray:
    """Decode one IDX file's bytes into a (read-only) numpy array of its native dtype.

    Raises:
        ValueError: naming ``source`` when the magic number, the sizes or the length are wrong.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(
            f"{source}: not an IDX file (magic number {data[:4].hex(' ')!r}; expected "
            "'00 00 TT DD' with TT an IDX type code such as 08 for uint8). Is it a truncated "
            "download or a gzip file without the .gz suffix?"
        )
    dtype = IDX_DTYPES[data[2]]
    ndim = data[3]
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{source}: IDX header announces {ndim} dimensions but the file ends early")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected_len = header_len + math.prod(shape) * dtype.itemsize  # Python ints: a corrupt header may overflow int64
    if len(data) != expected_len:
        raise ValueError(
            f"{source}: IDX header says shape {shape} ({expected_len} bytes) but the file has "
            f"{len(data)} bytes; the file is truncated or corrupt, get it again"
        )
    return np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)


def read_idx_file(path: Path, *, md5: str | None = None) -> np.ndarray:
    """Read ``path`` (gunzipped first when it ends in ``.gz``); warn if the content's md5 differs."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: cannot gunzip ({err}); the file is corrupt, get it again") from None
    if md5 is not None:
        check_md5(data, md5, what=path)
    return parse_idx(data, source=path)


def find_file(folder: Path, name: str) -> Path | None:
    """``folder/name.gz`` or ``folder/name``, whichever exists (gz first)."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _has_all_files(folder: Path) -> bool:
    return all(find_file(folder, name) is not None for pair in FILES.values() for name in pair)


def locate(cfg: DataConfig) -> Path:
    """The folder holding the four files; downloads them first when allowed and missing."""
    check_root_is_folder(cfg.root)
    root = Path(cfg.root).expanduser() if cfg.root else None
    download_root = root if root is not None else CACHE_DIR / "fashion_mnist"
    # torchvision.datasets.FashionMNIST keeps its files in <root>/FashionMNIST/raw.
    torchvision_dir = download_root / "FashionMNIST" / "raw"
    candidates = [root, torchvision_dir] if root is not None else [DEBIAN_DIR, torchvision_dir]
    for folder in candidates:
        if _has_all_files(folder):
            return folder
    if cfg.download:
        _download(download_root)
        if _has_all_files(torchvision_dir):
            return torchvision_dir
    names = ", ".join(f"{n}[.gz]" for pair in FILES.values() for n in pair)
    raise missing_data_error(
        f"Fashion-MNIST (the four IDX files {names})",
        candidates,
        [
            f"on Debian/Ubuntu: apt-get install dataset-fashion-mnist (installs them in {DEBIAN_DIR})",
            "put the files in a folder and set data.root=<that folder>",
            f"set data.download=true to download them with torchvision into {download_root}",
        ],
    )


def _download(root: Path) -> None:
    # Imported here: torchvision is only needed when downloading.
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(root), train=True, download=True)
    except Exception as err:  # network errors come in many types
        raise download_failed_error(
            "Fashion-MNIST", root, err,
            f"on Debian/Ubuntu: apt-get install dataset-fashion-mnist (installs it in {DEBIAN_DIR}); or download "
            "the four IDX files by hand, put them in a folder and set data.root=<that folder>",
        ) from None


def read_split(folder: Path, split: str, *, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 28, 28]`` uint8 and labels ``[N]`` of ``split`` ('train' or 'test')."""
    images_name, labels_name = FILES[split]
    images_path, labels_path = find_file(folder, images_name), find_file(folder, labels_name)
    images = read_idx_file(images_path, md5=RAW_MD5[images_name])
    labels = read_idx_file(labels_path, md5=RAW_MD5[labels_name])
    if images.ndim != 3 or images.dtype != np.uint8 or images.shape[1:] != IMAGE_SIZE:
        raise ValueError(
            f"{images_path}: expected uint8 Fashion-MNIST images [N, 28, 28], got {images.dtype} {images.shape}; "
            "the file is corrupt or another dataset's, get it again (data.name=image_folder reads other images)"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{images_path}: holds no images; the file is truncated or corrupt, get it again")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{labels_path}: expected {images.shape[0]} labels (one per image in {images_path.name}), "
            f"got shape {labels.shape}; one of the two files is truncated, corrupt or from another copy, get both again"
        )
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if bad.size:
        raise ValueError(
            f"{labels_path}: labels must lie in 0..{NUM_CLASSES - 1}, but {bad.size} are not (e.g. {int(bad[0])}); "
            "the file is corrupt or another dataset's, get it again"
        )
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def load_fashion_mnist(cfg: DataConfig) -> tuple[TensorImageDataset, TensorImageDataset, DatasetInfo]:
    """Fashion-MNIST as two in-memory datasets of ``[1, 28, 28]`` images (loaders resize them to
    ``data.image_size``, which ``info.input_shape`` gives)."""
    folder = locate(cfg)
    size = target_size(cfg.image_size)
    limits = {"train": check_limit("train_limit", cfg.train_limit), "test": check_limit("test_limit", cfg.test_limit)}
    datasets = []
    for split in ("train", "test"):
        images, labels = read_split(folder, split, limit=limits[split])
        x = to_normalized_tensor(images[:, None], FASHION_MNIST_STATS)
        y = torch.from_numpy(labels.astype(np.int64))
        datasets.append(TensorImageDataset(x, y))
    train, test = datasets
    return train, test, DatasetInfo("fashion_mnist", NUM_CLASSES, served_shape(train.native_shape, size))
