"""Dataset readers and loaders, on tiny files written in each canonical on-disk format."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from parallel_dkp.config import DataConfig
from parallel_dkp.data import ChecksumWarning, DatasetInfo, build_datasets, build_loaders
from parallel_dkp.data import cifar as cifar_module
from parallel_dkp.data import idx as idx_module
from parallel_dkp.data.transforms import random_crop_flip

# Files written here never match the canonical checksums; the checksum tests opt back in.
pytestmark = pytest.mark.filterwarnings("ignore::parallel_dkp.data.ChecksumWarning")

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- writers


def write_idx(path: Path, array: np.ndarray, *, magic: bytes | None = None) -> None:
    """Write a uint8 array as IDX (gzipped when ``path`` ends in .gz)."""
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    data = header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def make_fashion_mnist(root: Path, *, num_train: int = 12, num_test: int = 5, gz: bool = True) -> dict:
    """The four Fashion-MNIST files with random pixels and labels; returns the arrays."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, num_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, num_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(root / (f"{name}.gz" if gz else name), array)
    return arrays


def make_cifar(root: Path, name: str, *, per_file: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A ``cifar-10-batches-py`` or ``cifar-100-python`` folder in ``root``, pickled at protocol 2
    with bytes keys like the real (Python 2) files. Returns ``{file: (data [N, 3072], labels)}``."""
    layout = cifar_module.LAYOUTS[name]
    folder = root / layout.folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for i, file in enumerate(layout.train_files + layout.test_files):
        data = rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8)
        labels = [(i * per_file + j) % layout.num_classes for j in range(per_file)]
        batch = {b"data": data, layout.label_key: labels}
        if name == "cifar100":
            batch[b"coarse_labels"] = [19] * per_file  # must not be used
        (folder / file).write_bytes(pickle.dumps(batch, protocol=2))
        written[file] = (data, labels)
    return written


TINY_WNIDS = ["n03000002", "n01000001", "n02000003"]  # deliberately not sorted


def class_colour(label: int) -> tuple[int, int, int]:
    return (40 + 80 * label, 200 - 70 * label, 120)


def make_tiny_imagenet(root: Path, *, per_class: int = 3) -> list[tuple[str, str]]:
    """A ``tiny-imagenet-200`` tree whose images are filled with their class's colour.

    Returns the validation ``(file, wnid)`` annotations, in file order.
    """
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    for label, wnid in enumerate(TINY_WNIDS):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")  # present in the real tree
        for i in range(per_class):
            image = Image.new("RGB", (64, 64), class_colour(label))
            if label == 2 and i == 0:
                image = image.convert("L")  # the real set has some greyscale JPEGs
            image.save(images / f"{wnid}_{i}.JPEG", quality=95)
    annotations = [(f"val_{i}.JPEG", TINY_WNIDS[(2 * i + 1) % 3]) for i in range(5)]
    for file, wnid in annotations:
        Image.new("RGB", (64, 64), class_colour(TINY_WNIDS.index(wnid))).save(folder / "val" / "images" / file)
    lines = [f"{file}\t{wnid}\t0\t0\t63\t63" for file, wnid in annotations]
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return annotations


def decode_colour(x_CHW: torch.Tensor) -> torch.Tensor:
    """Mean RGB in 0..255 of an ImageNet-normalised image."""
    mean = torch.tensor([0.485, 0.456, 0.406])
    std = torch.tensor([0.229, 0.224, 0.225])
    return (x_CHW.mean(dim=(1, 2)) * std + mean) * 255


def nearest_class(x_CHW: torch.Tensor) -> int:
    colours = torch.tensor([class_colour(k) for k in range(3)], dtype=torch.float32)
    return int((colours - decode_colour(x_CHW)).norm(dim=1).argmin())


def collect(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_shapes_labels_and_normalisation(tmp_path, gz):
    """IDX parsing (big-endian header, gz and plain files) or the FMNIST normalisation is wrong."""
    arrays = make_fashion_mnist(tmp_path, gz=gz)
    train, test, info = build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    assert info == DatasetInfo("fashion_mnist", 10, (1, 28, 28))
    assert (len(train), len(test)) == (12, 5)
    expected = (torch.from_numpy(arrays["train-images-idx3-ubyte"]).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(train.x[:, 0], expected)
    assert train.y.dtype == torch.int64
    assert train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    x, y = test[3]
    assert x.shape == (1, 28, 28) and y == int(arrays["t10k-labels-idx1-ubyte"][3])


def test_fashion_mnist_bad_magic_is_a_clear_error(tmp_path):
    """A corrupt IDX header is not detected, or the error does not name the file and the cause."""
    make_fashion_mnist(tmp_path)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(bad, np.zeros(12, dtype=np.uint8), magic=b"\x12\x34\x08\x01")
    with pytest.raises(ValueError, match="magic number") as err:
        build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    assert str(bad) in str(err.value)


def test_fashion_mnist_truncated_file_is_a_clear_error(tmp_path):
    """An IDX file shorter than its header announces is read silently instead of rejected."""
    make_fashion_mnist(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path)))


def test_fashion_mnist_missing_names_paths_and_remedies_without_network(tmp_path, monkeypatch):
    """The missing-data error lacks a path looked in or a remedy, or a download was attempted
    although data.download is false."""
    import torchvision.datasets

    def no_download(*args, **kwargs):
        raise AssertionError("must not download without data.download=true")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_download)
    root = tmp_path / "nothing_here"
    with pytest.raises(FileNotFoundError) as err:
        build_datasets(DataConfig(name="fashion_mnist", root=str(root)))
    message = str(err.value)
    for needle in (str(root), "apt-get install dataset-fashion-mnist", "data.root=", "data.download=true"):
        assert needle in message


def test_fashion_mnist_download_goes_through_torchvision_into_root(tmp_path, monkeypatch):
    """With data.download=true the files torchvision fetches (into <root>/FashionMNIST/raw) are not
    found afterwards."""
    import torchvision.datasets

    calls = []

    def fake_fashion_mnist(root, train, download):
        calls.append((root, download))
        make_fashion_mnist(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_fashion_mnist)
    train, _, _ = build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path), download=True))
    assert calls == [(str(tmp_path), True)] and len(train) == 12


def test_fashion_mnist_checksum_mismatch_only_warns(tmp_path, monkeypatch):
    """A non-canonical file is refused (it must load), does not warn, or a canonical one warns."""
    arrays = make_fashion_mnist(tmp_path)
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path))
    with pytest.warns(ChecksumWarning, match="train-images-idx3-ubyte"):
        train, _, _ = build_datasets(cfg)
    assert len(train) == 12

    def raw_md5(a: np.ndarray) -> str:
        header = bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
        return hashlib.md5(header + a.tobytes()).hexdigest()

    monkeypatch.setattr(idx_module, "RAW_MD5", {name: raw_md5(a) for name, a in arrays.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChecksumWarning)
        build_datasets(cfg)


def test_fashion_mnist_limits_and_resize(tmp_path):
    """data.train_limit/test_limit do not keep the *first* N examples, or data.image_size does not
    resize what the loaders serve and info.input_shape (datasets keep the native 28x28)."""
    arrays = make_fashion_mnist(tmp_path)
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path), train_limit=5, test_limit=2, image_size=16)
    train, test, info = build_datasets(cfg)
    assert (len(train), len(test)) == (5, 2)
    assert train.y.tolist() == arrays["train-labels-idx1-ubyte"][:5].tolist()
    assert info.input_shape == (1, 16, 16) and train[0][0].shape == (1, 28, 28)
    train_loader, test_loader, _ = build_loaders(dataclasses.replace(cfg, batch_size=2), seed=0)
    assert next(iter(train_loader))[0].shape == (2, 1, 16, 16)
    assert next(iter(test_loader))[0].shape == (2, 1, 16, 16)


def test_real_debian_fashion_mnist():
    """The real Fashion-MNIST (Debian package dataset-fashion-mnist) is not read completely or
    correctly, or its genuine content triggers a checksum warning."""
    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip(f"{DEBIAN_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChecksumWarning)
        train, test, info = build_datasets(DataConfig(name="fashion_mnist"))
    assert info == DatasetInfo("fashion_mnist", 10, (1, 28, 28))
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.x.dtype == torch.float32
    assert train.y.bincount().tolist() == [6000] * 10 and test.y.bincount().tolist() == [1000] * 10
    # The standard constants are the training set's own statistics.
    assert abs(train.x.mean().item()) < 1e-3 and abs(train.x.std().item() - 1) < 1e-3


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("parent", [True, False], ids=["root=parent", "root=folder"])
def test_cifar10_pickles_shapes_labels_and_normalisation(tmp_path, parent):
    """CIFAR-10 batches are not all read, in order, with R/G/B planes and per-channel
    normalisation, or data.root cannot name the folder itself as well as its parent."""
    written = make_cifar(tmp_path, "cifar10")
    root = tmp_path if parent else tmp_path / "cifar-10-batches-py"
    train, test, info = build_datasets(DataConfig(name="cifar10", root=str(root)))
    assert info == DatasetInfo("cifar10", 10, (3, 32, 32))
    assert (len(train), len(test)) == (20, 4)
    expected_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.y.tolist() == expected_labels
    raw = written["test_batch"][0][2].reshape(3, 32, 32)  # 3rd test image, planes R, G, B
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    torch.testing.assert_close(test[2][0], (torch.from_numpy(raw).float() / 255 - mean) / std)


def test_cifar100_uses_fine_labels_and_limits(tmp_path):
    """CIFAR-100 reads the coarse labels, not 100 classes, or limits are not applied."""
    written = make_cifar(tmp_path, "cifar100", per_file=6)
    train, test, info = build_datasets(DataConfig(name="cifar100", root=str(tmp_path), train_limit=4, test_limit=3))
    assert info == DatasetInfo("cifar100", 100, (3, 32, 32))
    assert train.y.tolist() == written["train"][1][:4] and test.y.tolist() == written["test"][1][:3]


def test_cifar_missing_names_paths_and_remedies(tmp_path):
    """The missing-CIFAR error lacks a path looked in, the download switch or the archive URL."""
    with pytest.raises(FileNotFoundError) as err:
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)))
    message = str(err.value)
    folder = tmp_path / "cifar-10-batches-py"
    for needle in (str(tmp_path), str(folder), "data.download=true", "cifar-10-python.tar.gz"):
        assert needle in message


def test_cifar_checksum_mismatch_only_warns(tmp_path):
    """A re-packed CIFAR batch is refused instead of loaded with a ChecksumWarning."""
    make_cifar(tmp_path, "cifar10")
    with pytest.warns(ChecksumWarning, match="data_batch_1"):
        train, _, _ = build_datasets(DataConfig(name="cifar10", root=str(tmp_path)))
    assert len(train) == 20


def test_cifar_pickle_cannot_run_code(tmp_path):
    """Loading a CIFAR pickle can execute code named in the file (the unpickler is not restricted)."""
    make_cifar(tmp_path, "cifar10")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(ValueError, match="refusing to load global"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)))
    assert not marker.exists()


# --------------------------------------------------------------------------- Tiny ImageNet


def test_tiny_imagenet_labels_follow_wnids_and_val_annotations(tmp_path):
    """Class indices do not follow wnids.txt order, val images are not labelled from
    val_annotations.txt, or images (incl. greyscale) are not served as normalised [3, 64, 64]."""
    annotations = make_tiny_imagenet(tmp_path)
    train, test, info = build_datasets(DataConfig(name="tiny_imagenet", root=str(tmp_path)))
    assert info == DatasetInfo("tiny_imagenet", 3, (3, 64, 64))
    assert (len(train), len(test)) == (9, 5)
    for i in range(len(train)):
        x, y = train[i]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        if train.samples[i][0].endswith(f"{TINY_WNIDS[2]}_0.JPEG"):  # greyscale: no hue, but 3 equal channels
            rgb = decode_colour(x)
            assert (rgb - rgb.mean()).abs().max() < 2
        else:
            assert nearest_class(x) == y
    for i, (_, wnid) in enumerate(annotations):
        x, y = test[i]
        assert y == TINY_WNIDS.index(wnid) and nearest_class(x) == y


def test_tiny_imagenet_limit_covers_every_class(tmp_path):
    """A small train_limit keeps only the first class (limits are not class-interleaved)."""
    make_tiny_imagenet(tmp_path)
    train, test, _ = build_datasets(DataConfig(name="tiny_imagenet", root=str(tmp_path), train_limit=3, test_limit=2))
    assert sorted(train[i][1] for i in range(len(train))) == [0, 1, 2]
    assert len(test) == 2


def test_tiny_imagenet_missing_says_where_to_put_it(tmp_path):
    """The missing-Tiny-ImageNet error does not name the paths looked in and where to unzip."""
    with pytest.raises(FileNotFoundError) as err:
        build_datasets(DataConfig(name="tiny_imagenet", root=str(tmp_path)))
    message = str(err.value)
    for needle in (str(tmp_path / "tiny-imagenet-200" / "wnids.txt"), "tiny-imagenet-200.zip", "data.root="):
        assert needle in message


def test_lazy_loader_is_deterministic_across_workers_and_drops_last(tmp_path):
    """The DataLoader path gives different batches with worker processes, ignores the seed, or
    keeps a partial training batch."""
    make_tiny_imagenet(tmp_path)
    cfg = DataConfig(name="tiny_imagenet", root=str(tmp_path), batch_size=4, image_size=32)
    train0, test0, info = build_loaders(cfg, seed=3)
    train2, _, _ = build_loaders(dataclasses.replace(cfg, num_workers=2), seed=3)
    assert info.input_shape == (3, 32, 32)
    assert len(train0) == 2 and len(test0) == 2
    batches0, batches2 = collect(train0), collect(train2)
    assert [x.shape for x, _ in batches0] == [(4, 3, 32, 32)] * 2
    for (x0, y0), (x2, y2) in zip(batches0, batches2, strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2) and y0.dtype == torch.int64
    assert [len(y) for _, y in test0] == [4, 1]


# --------------------------------------------------------------------------- image folder


def make_image_folder(root: Path, *, test_name: str = "val") -> None:
    for split, classes in (("train", ["b_cat", "a_dog"]), (test_name, ["b_cat"])):
        for label_name in classes:
            folder = root / split / label_name
            folder.mkdir(parents=True)
            colour = (250, 10, 10) if label_name == "b_cat" else (10, 10, 250)
            Image.new("RGB", (20, 10), colour).save(folder / "0.png")
            Image.new("RGB", (13, 17), colour).save(folder / "1.jpg")  # another size: gets resized


@pytest.mark.parametrize("test_name", ["val", "test"])
def test_image_folder_classes_from_train_and_resizing(tmp_path, test_name):
    """Image-folder classes are not taken from train/ (sorted), the val/ or test/ split does not
    reuse them, or the loaders do not resize images of different sizes to one shape."""
    make_image_folder(tmp_path, test_name=test_name)
    cfg = DataConfig(name="image_folder", root=str(tmp_path), batch_size=4)
    train, test, info = build_datasets(cfg)
    assert info == DatasetInfo("image_folder", 2, (3, 10, 20))  # the first training image's size
    assert [train[i][1] for i in range(len(train))] == [0, 0, 1, 1]  # a_dog, a_dog, b_cat, b_cat
    assert [test[i][1] for i in range(len(test))] == [1, 1]  # only b_cat, still index 1
    assert {tuple(test[i][0].shape) for i in range(len(test))} == {(3, 10, 20), (3, 17, 13)}  # as stored
    for loader in build_loaders(cfg, seed=0)[:2]:
        assert all(x.shape[1:] == (3, 10, 20) for x, _ in loader)
    _, _, info = build_datasets(dataclasses.replace(cfg, image_size=8))
    assert info.input_shape == (3, 8, 8)


def test_image_folder_errors(tmp_path):
    """A bad image-folder setup (no root, no val/, a val class unknown to train/) is not reported
    with the remedy."""
    with pytest.raises(ValueError, match="needs data.root"):
        build_datasets(DataConfig(name="image_folder"))
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "a" / "0.png")
    with pytest.raises(FileNotFoundError) as err:
        build_datasets(DataConfig(name="image_folder", root=str(tmp_path)))
    assert str(tmp_path / "val") in str(err.value) and str(tmp_path / "test") in str(err.value)
    (tmp_path / "val" / "zebra").mkdir(parents=True)
    with pytest.raises(ValueError, match="zebra"):
        build_datasets(DataConfig(name="image_folder", root=str(tmp_path)))


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_learnable():
    """Synthetic data depends on the global RNG, or is not learnable (class means do not
    separate the classes)."""
    cfg = DataConfig(name="synthetic", synthetic_size=400, synthetic_shape=(1, 8, 8), synthetic_classes=4)
    torch.manual_seed(1)
    train, test, info = build_datasets(cfg)
    torch.manual_seed(2)
    train_again, _, _ = build_datasets(cfg)
    assert torch.equal(train.x, train_again.x) and torch.equal(train.y, train_again.y)
    assert info == DatasetInfo("synthetic", 4, (1, 8, 8)) and (len(train), len(test)) == (400, 100)
    assert train.y.bincount().tolist() == [100] * 4
    means = torch.stack([train.x[train.y == k].mean(0) for k in range(4)]).flatten(1)
    predicted = torch.cdist(test.x.flatten(1), means).argmin(1)
    assert (predicted == test.y).float().mean() > 0.9


def test_synthetic_flat_shape_rejects_image_options():
    """A (D,) synthetic shape is not supported, or resize/augment on it fails obscurely."""
    cfg = DataConfig(name="synthetic", synthetic_shape=(16,), batch_size=8)
    train_loader, _, info = build_loaders(cfg, seed=0)
    assert info.input_shape == (16,) and next(iter(train_loader))[0].shape == (8, 16)
    with pytest.raises(ValueError, match="data.image_size"):
        build_datasets(DataConfig(name="synthetic", synthetic_shape=(16,), image_size=8))
    with pytest.raises(ValueError, match="data.augment=false"):
        build_loaders(DataConfig(name="synthetic", synthetic_shape=(16,), augment=True), seed=0)


# --------------------------------------------------------------------------- loaders

SMALL = DataConfig(name="synthetic", synthetic_size=70, synthetic_shape=(1, 4, 4), batch_size=16)


def test_train_loader_same_seed_same_batches_new_order_each_epoch():
    """Ranks building the loader with one seed would see different batches, epochs repeat one
    order, or the seed is ignored."""
    loader_a, _, _ = build_loaders(SMALL, seed=7)
    loader_b, _, _ = build_loaders(SMALL, seed=7)
    loader_c, _, _ = build_loaders(SMALL, seed=8)
    epochs_a = [collect(loader_a) for _ in range(2)]
    epochs_b = [collect(loader_b) for _ in range(2)]
    for batches_a, batches_b in zip(epochs_a, epochs_b, strict=True):
        for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(epochs_a[0][0][0], epochs_a[1][0][0])
    assert not torch.equal(epochs_a[0][0][0], collect(loader_c)[0][0])
    loader_a.set_epoch(0)
    assert torch.equal(collect(loader_a)[0][0], epochs_a[0][0][0])


def test_train_loader_drops_last_and_never_repeats_an_example():
    """The training loader keeps a partial batch (breaks fixed P2P shapes), misreports len(), or
    samples with replacement."""
    train_loader, _, _ = build_loaders(SMALL, seed=0)
    dataset = train_loader.dataset
    batches = collect(train_loader)
    assert len(train_loader) == len(batches) == 70 // 16
    assert all(x.shape == (16, 1, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    rows = torch.cat([x for x, _ in batches]).flatten(1)
    # Every served example is a distinct row of the dataset.
    matches = (rows[:, None, :] == dataset.x.flatten(1)[None]).all(-1)
    assert (matches.sum(1) == 1).all() and (matches.sum(0) <= 1).all()


def test_test_loader_keeps_order_and_last_batch():
    """The test loader shuffles, drops examples, or misreports len()."""
    _, test_loader, _ = build_loaders(SMALL, seed=0)
    batches = collect(test_loader)
    assert len(test_loader) == len(batches) == 2  # 17 examples in batches of 16
    assert [len(y) for _, y in batches] == [16, 1]
    assert torch.equal(torch.cat([x for x, _ in batches]), test_loader.dataset.x)


def test_loaders_leave_the_global_rng_alone(tmp_path):
    """Building or iterating a loader consumes global random numbers, which would make model
    initialisation depend on data loading."""
    make_tiny_imagenet(tmp_path)
    state = torch.get_rng_state()
    for cfg in (SMALL, DataConfig(name="tiny_imagenet", root=str(tmp_path), batch_size=4, augment=True)):
        for loader in build_loaders(cfg, seed=0)[:2]:
            collect(loader)
    assert torch.equal(state, torch.get_rng_state())


def test_augmentation_is_a_seeded_crop_and_flip_of_the_same_batch():
    """data.augment changes the order or labels, is not reproducible, or produces something other
    than a padded crop (possibly flipped) of each original image."""
    cfg = DataConfig(name="synthetic", synthetic_size=64, synthetic_shape=(2, 8, 8), batch_size=32)
    plain = collect(build_loaders(cfg, seed=5)[0])
    aug_cfg = dataclasses.replace(cfg, augment=True)
    augmented = collect(build_loaders(aug_cfg, seed=5)[0])
    again = collect(build_loaders(aug_cfg, seed=5)[0])
    num_changed = 0
    for (x, y), (xa, ya), (xr, _) in zip(plain, augmented, again, strict=True):
        assert torch.equal(y, ya) and torch.equal(xa, xr)
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1))  # 8 // 8 = 1 pixel of padding
        for b in range(len(x)):
            candidates = [padded[b, :, i : i + 8, j : j + 8] for i in range(3) for j in range(3)]
            candidates += [c.flip(-1) for c in candidates]
            assert any(torch.equal(xa[b], c) for c in candidates)
            num_changed += not torch.equal(xa[b], x[b])
    assert num_changed > 32  # most of the 64 images moved or flipped


def test_random_crop_flip_matches_a_padded_reference():
    """The fast per-example crop disagrees with padding, slicing and flipping done naively."""
    x = torch.randn(40, 3, 16, 24)
    out = random_crop_flip(x, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)  # replay the same draws
    shift_y = torch.randint(-2, 3, (40,), generator=generator)
    shift_x = torch.randint(-3, 4, (40,), generator=generator)
    flip = torch.rand(40, generator=generator) < 0.5
    padded = torch.nn.functional.pad(x, (3, 3, 2, 2))
    for b in range(40):
        ref = padded[b, :, 2 + shift_y[b] : 18 + shift_y[b], 3 + shift_x[b] : 27 + shift_x[b]]
        assert torch.equal(out[b], ref.flip(-1) if flip[b] else ref)


def test_batch_size_larger_than_train_set_is_an_error():
    """A training set smaller than one batch silently yields an empty epoch instead of an error
    that names data.batch_size."""
    with pytest.raises(ValueError, match="data.batch_size"):
        build_loaders(DataConfig(name="synthetic", synthetic_size=10, batch_size=16), seed=0)
