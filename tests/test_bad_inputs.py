"""Bad input gets a clear error that says what to do, and loses nothing.

Bad config values fail in ``load_config``: before any process group, dataset or network exists,
on every rank, once, with a message that names the key, the bad value and what to set instead.
Broken dataset files fail in their reader, naming the file and the fix; file-system errors on a
path the user chose (``run.out_dir``, ``--out``, ``data.root``) and running out of memory are
reported by the CLI in one line, while errors no user can fix keep their traceback.

Each case below was once a hole: a value torch accepted and trained nothing with, crashed on
after a whole epoch, or rejected with its own text (no key named, or a C++ stack dump).
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import os
import pickle
import re
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from multirank import free_port
from PIL import Image

from parallel_dkp.config import DataConfig, load_config
from parallel_dkp.data import build_loaders

SYNTH = "data.name=synthetic"
MLP = "model.name=mlp"

# (overrides, the key the message must name, the bad value as the message shows it)
CASES = {
    # optimizers: torch's own errors name no key, StepLR(step_size=0) fails only after an epoch
    "step_size=0": (["optim.feedback.step_size=0"], "optim.feedback.step_size", "0"),
    "step_size<0": (["optim.forward.step_size=-2"], "optim.forward.step_size", "-2"),
    "gamma<0": (["optim.feedback.gamma=-0.5"], "optim.feedback.gamma", "-0.5"),
    "gamma=0": (["optim.feedback.gamma=0"], "optim.feedback.gamma", "0.0"),
    "betas-short": (["optim.feedback.betas=[0.9]"], "optim.feedback.betas", "[0.9]"),
    "betas-long": (["optim.forward.betas=[0.9, 0.99, 0.999]"], "optim.forward.betas", "[0.9, 0.99, 0.999]"),
    "betas=1": (["optim.feedback.betas=[0.9, 1.0]"], "optim.feedback.betas", "[0.9, 1.0]"),
    "betas<0": (["optim.feedback.betas=[-0.1, 0.999]"], "optim.feedback.betas", "[-0.1, 0.999]"),
    "momentum<0": (["optim.forward.momentum=-0.1"], "optim.forward.momentum", "-0.1"),
    "momentum>=1": (["optim.forward.momentum=1"], "optim.forward.momentum", "1.0"),
    "weight_decay<0": (["optim.forward.weight_decay=-1e-4"], "optim.forward.weight_decay", "-0.0001"),
    "feedback-weight_decay<0": (["optim.feedback.weight_decay=-1"], "optim.feedback.weight_decay", "-1.0"),
    "lr=0": (["optim.forward.lr=0"], "optim.forward.lr", "0.0"),
    "lr<0": (["optim.forward.lr=-0.1"], "optim.forward.lr", "-0.1"),
    "feedback-lr=0": (["optim.feedback.lr=0"], "optim.feedback.lr", "0.0"),
    "lr=nan": (["optim.forward.lr=nan"], "optim.forward.lr", "nan"),
    "lr=inf": (["optim.feedback.lr=inf"], "optim.feedback.lr", "inf"),
    # run: max_steps < 0 trained nothing and exited 0
    "max_steps<0": (["run.max_steps=-1"], "run.max_steps", "-1"),
    "seed<0": (["run.seed=-1"], "run.seed", "-1"),
    "epochs=0": (["run.epochs=0"], "run.epochs", "0"),
    "log_every=0": (["run.log_every=0"], "run.log_every", "0"),
    # data
    "train_limit<0": (["data.train_limit=-1"], "data.train_limit", "-1"),
    "test_limit<0": (["data.test_limit=-5"], "data.test_limit", "-5"),
    "num_workers<0": (["data.num_workers=-1"], "data.num_workers", "-1"),
    "image_size<0": (["data.image_size=-8"], "data.image_size", "-8"),
    "synthetic_size=0": ([SYNTH, "data.synthetic_size=0"], "data.synthetic_size", "0"),
    "synthetic_classes=1": ([SYNTH, "data.synthetic_classes=1"], "data.synthetic_classes", "1"),
    "synthetic_shape-zero": ([SYNTH, "data.synthetic_shape=[1, 0, 28]"], "data.synthetic_shape", "[1, 0, 28]"),
    "synthetic_shape-empty": ([SYNTH, "data.synthetic_shape=[]"], "data.synthetic_shape", "[]"),
    "train_limit<batch": (["data.train_limit=10", "data.batch_size=16"], "data.train_limit", "10"),
    "synthetic_size<batch": ([SYNTH, "data.synthetic_size=8", "data.batch_size=16"], "data.synthetic_size", "8"),
    "batch_size=0": (["data.batch_size=0"], "data.batch_size", "0"),
    # parallel
    "microbatches=0": (["parallel.microbatches=0"], "parallel.microbatches", "0"),
    "microbatches-not-dividing": (["data.batch_size=10", "parallel.microbatches=3"], "parallel.microbatches", "3"),
    "partition-empty-rank": (["parallel.partition=[2, 0]"], "parallel.partition", "[2, 0]"),
    # timeout_s <= 0 gave a C++ stack dump at the first collective
    "timeout_s=0": (["parallel.timeout_s=0"], "parallel.timeout_s", "0.0"),
    "timeout_s<0": (["parallel.timeout_s=-5"], "parallel.timeout_s", "-5.0"),
    "timeout_s=inf": (["parallel.timeout_s=inf"], "parallel.timeout_s", "inf"),
    "timeout_s=huge": (["parallel.timeout_s=1e16"], "parallel.timeout_s", "1e+16"),
    # model
    "widths-zero": ([MLP, "model.widths=[256, 0]"], "model.widths", "[256, 0]"),
    "widths-negative": (["model.widths=[-4]"], "model.widths", "[-4]"),
    "widths-empty-mlp": ([MLP, "model.widths=[]"], "model.widths", "[]"),
    "bp_fc_only-on-mlp": ([MLP, "rule.name=bp_fc_only"], "rule.name", "bp_fc_only"),
    # an input the model cannot take, where the config alone fixes the input's shape
    "conv2-on-vector": ([SYNTH, "data.synthetic_shape=[64]"], "data.synthetic_shape", "[64]"),
    "conv2-1-pixel-high": ([SYNTH, "data.synthetic_shape=[1, 1, 28]"], "data.synthetic_shape", "1x28"),
    "conv2-image_size=1": (["data.image_size=1"], "data.image_size", "1x1"),
    "alexnet_small-not-8": ([SYNTH, "model.name=alexnet_small", "data.synthetic_shape=[3, 20, 20]"],
                            "data.synthetic_shape", "20x20"),
    "alexnet_small-image_size": (["data.name=cifar10", "model.name=alexnet_small", "data.image_size=36"],
                                 "data.image_size", "36x36"),
    "alexnet-native-cifar": (["data.name=cifar10", "model.name=alexnet"], "data.image_size=224", "32x32"),
    "augment-vector": ([SYNTH, MLP, "data.synthetic_shape=[64]", "data.augment=true"], "data.augment", "[64]"),
    "resize-vector": ([SYNTH, MLP, "data.synthetic_shape=[64]", "data.image_size=8"], "data.image_size", "[64]"),
    "crop-typo": (["data.augment=true", "data.augment_crop=random_resize"], "data.augment_crop", "random_resize"),
    "crop-not-a-name": (["data.augment_crop=3"], "data.augment_crop", "3"),
    "test-crop>1": (["data.test_crop_fraction=1.5"], "data.test_crop_fraction", "1.5"),
    "test-crop=0": (["data.test_crop_fraction=0"], "data.test_crop_fraction", "0"),
    "test-crop-nan": (["data.test_crop_fraction=nan"], "data.test_crop_fraction", "nan"),
    "test-crop-vector": ([SYNTH, MLP, "data.synthetic_shape=[64]", "data.test_crop_fraction=0.875"],
                         "data.test_crop_fraction", "[64]"),
    # run.out_dir = "" wrote config.toml, metrics and checkpoints into the working directory
    "out_dir-empty": (["run.out_dir="], "run.out_dir", "''"),
    "out_dir-blank": (["run.out_dir='  '"], "run.out_dir", "'  '"),
}


@pytest.mark.parametrize("overrides,key,shown", CASES.values(), ids=CASES.keys())
def test_bad_value_is_a_value_error_naming_key_value_and_fix(overrides, key, shown):
    """Pinpoints a config value that passes ``load_config`` (so it fails late, mid-run or never),
    or whose message does not name the key, show the bad value or say what to set."""
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert key in message, message
    assert shown in message, message
    assert re.search(r"\b(set|use|raise|lower|change|remove)\b", message), f"no remedy in: {message}"


# A suggestion such as "set e.g. optim.feedback.step_size=1": a dotted key, "=", a value or a [list].
_SUGGESTION = re.compile(r"\b([a-z_]+\.[a-z_.]+)=(\[[^\]]*\]|[^\s,;)]+)")


def _suggestion(overrides) -> tuple[str, str] | None:
    """The first "key=value" a case's error message suggests, if it suggests a value."""
    try:
        load_config(None, overrides)
    except ValueError as err:
        found = _SUGGESTION.findall(str(err))
        return found[0] if found else None
    return None


# Only the cases whose message suggests a value (the others name what to change instead).
SUGGESTING = {name: (case[0], _suggestion(case[0])) for name, case in CASES.items() if _suggestion(case[0])}


def test_most_messages_suggest_a_value():
    """Pinpoints messages losing their concrete "set key=value" remedies (or this file's regex
    no longer finding them), which would quietly empty the test below."""
    assert len(SUGGESTING) >= len(CASES) - 8, sorted(set(CASES) - set(SUGGESTING))


@pytest.mark.parametrize("overrides,suggestion", SUGGESTING.values(), ids=SUGGESTING.keys())
def test_the_suggested_value_is_accepted(overrides, suggestion):
    """Pinpoints an error message whose own "set e.g. key=value" suggestion would be rejected too."""
    fixed_key, value = suggestion
    rest = [o for o in overrides if o.split("=", 1)[0] != fixed_key]
    load_config(None, [*rest, f"{fixed_key}={value}"])


def test_config_that_is_a_directory_says_so(tmp_path):
    """Pinpoints ``--config some/dir`` being reported as a missing file (it exists, it is a directory)."""
    (tmp_path / "a.toml").write_text("")
    with pytest.raises(ValueError) as err:
        load_config(tmp_path)
    message = str(err.value)
    assert "is a directory" in message and "configs/default.toml" in message and "a.toml" in message
    assert "does not exist" not in message


# --------------------------------------------------------------------------- the command line


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _cli(*args: str, timeout: float = 60, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "parallel_dkp", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(**env))
    return proc, time.perf_counter() - start


@pytest.mark.parametrize(
    "args,key",
    [
        (["--set", "optim.feedback.step_size=0"], "optim.feedback.step_size"),
        (["--set", "run.max_steps=-1"], "run.max_steps"),
        (["--set", "parallel.timeout_s=0"], "parallel.timeout_s"),
        (["--set", "optim.forward.betas=[0.9]"], "optim.forward.betas"),
        (["--config", "configs"], "is a directory"),
    ],
    ids=["step_size", "max_steps", "timeout_s", "betas", "config-dir"],
)
def test_cli_rejects_bad_config_fast_before_any_data(tmp_path, args, key):
    """Pinpoints a bad config that the CLI reports late (after data loading: the dataset below does not
    exist, so reaching it would print its path), slowly, with a traceback, or with another exit code."""
    nowhere = tmp_path / "nowhere"
    proc, seconds = _cli("train", *args, "--set", "data.name=cifar10", "--set", f"data.root={nowhere}",
                         "--set", f"run.out_dir={tmp_path / 'out'}")
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert text.startswith("config error:"), text
    assert key in text and "Traceback" not in text
    assert "nowhere" not in text, "the dataset was looked for before the config was checked"
    assert not (tmp_path / "out").exists()
    assert seconds < 20, f"took {seconds:.1f} s to reject a config value"


def test_every_rank_fails_once_on_its_own_without_waiting_for_peers(tmp_path):
    """Pinpoints a bad config that is checked only on some ranks, reported more than once per rank,
    or checked after the process group forms (each rank would then wait for its peer, which is never
    started here, until parallel.timeout_s). The two ranks are started as torchrun would start them."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "parallel_dkp", "train", "--set", "optim.feedback.step_size=0",
             "--set", f"run.out_dir={tmp_path / 'out'}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port, TORCHELASTIC_RUN_ID="bad-config-test"),
        )
        for rank in (0, 1)
    ]
    start = time.perf_counter()
    try:
        results = [(p.communicate(timeout=60), p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for (_, stderr), code in results:
        text = " ".join(stderr.split())
        assert code == 2, stderr[-2000:]
        assert text.count("config error:") == 1 and "optim.feedback.step_size = 0" in text
        assert "Traceback" not in text
    assert time.perf_counter() - start < 20
    assert not (tmp_path / "out").exists()


def test_stale_world_size_without_torchrun_names_the_variable(tmp_path):
    """Pinpoints a WORLD_SIZE left in the environment (no torchrun: no MASTER_ADDR/MASTER_PORT) that
    fails with torch's rendezvous text (or hangs) instead of naming WORLD_SIZE and the fix."""
    proc, seconds = _cli("train", "--set", "data.name=synthetic", "--set", "data.synthetic_shape=[1, 8, 8]",
                         "--set", "data.synthetic_size=64", "--set", "data.batch_size=16",
                         "--set", "run.max_steps=1", "--set", "run.progress=false",
                         "--set", f"run.out_dir={tmp_path / 'out'}", WORLD_SIZE="2", RANK="0")
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "WORLD_SIZE" in text and "torchrun" in text and "Traceback" not in text
    assert seconds < 20


# --------------------------------------------------------------------------- data files
#
# Each case writes a small dataset with one defect into tmp_path. The reader must fail at once (not
# mid-epoch, not by training on it), with the error type the CLI reports cleanly, naming the file or
# key and what to do. Each was once a hole: a traceback, a message naming no file, or a run that
# trained on broken data and exited 0.

FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _write_idx(path: Path, array: np.ndarray) -> None:
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data))


def _fashion_mnist(root: Path, **replace: np.ndarray) -> DataConfig:
    """The four .gz files, 16 training and 8 test images; ``replace`` swaps one file's array."""
    rng = np.random.default_rng(0)
    arrays = dict(zip(FMNIST_FILES, (rng.integers(0, 256, (16, 28, 28), dtype=np.uint8),
                                     rng.integers(0, 10, 16, dtype=np.uint8),
                                     rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
                                     rng.integers(0, 10, 8, dtype=np.uint8))))
    root.mkdir(parents=True, exist_ok=True)
    for name, array in {**arrays, **{k.replace("_", "-"): v for k, v in replace.items()}}.items():
        _write_idx(root / f"{name}.gz", array)
    return DataConfig(name="fashion_mnist", root=str(root), batch_size=4)


def _cifar10(root: Path, **replace: dict | bytes) -> DataConfig:
    """``cifar-10-batches-py`` with 4 images per file; ``replace`` swaps one file's dict (or bytes)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = replace.get(name, {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]})
        (folder / name).write_bytes(batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=2))
    return DataConfig(name="cifar10", root=str(root), batch_size=4)


def _tiny_imagenet(root: Path, wnids=("n01", "n02")) -> DataConfig:
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in dict.fromkeys(wnids):
        (folder / "train" / wnid / "images").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8)).save(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    for i in range(2):
        Image.new("RGB", (8, 8)).save(folder / "val" / "images" / f"val_{i}.JPEG")
    lines = [f"val_{i}.JPEG\t{wnids[i % len(wnids)]}\t0\t0\t7\t7" for i in range(2)]
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return DataConfig(name="tiny_imagenet", root=str(root), batch_size=4)


def _image_folder(root: Path, classes=("a", "b"), val=True) -> DataConfig:
    for split in ("train", "val") if val else ("train",):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / name / f"{i}.png")
    return DataConfig(name="image_folder", root=str(root), batch_size=4)


def _labels(values) -> dict:
    return {b"data": np.zeros((len(values), 3072), np.uint8), b"labels": values}


def _edit(cfg: DataConfig, relative: str, edit) -> DataConfig:
    edit(Path(cfg.root) / relative)
    return cfg


def _fails_to_download(module: str, name: str):
    """A torchvision dataset class whose download fails as it does offline."""
    def setup(tmp_path, monkeypatch):
        import torchvision.datasets

        def offline(*args, **kwargs):
            raise OSError("<urlopen error [Errno -2] Name or service not known>")

        monkeypatch.setattr(torchvision.datasets, name, offline)
        return DataConfig(name=module, root=str(tmp_path / "download_here"), download=True, batch_size=4)
    return setup


JPEG_HEAD = b"\xff\xd8\xff\xe0"  # a JPEG that ends after its first marker
T, FM = "tiny-imagenet-200", "fashion_mnist"

# name: (setup(tmp_path, monkeypatch) -> DataConfig, error type, what the message must contain; "{root}" is tmp_path)
DATA_CASES = {
    "fmnist-labels-out-of-range": (
        lambda t, m: _fashion_mnist(t, train_labels_idx1_ubyte=np.full(16, 12, np.uint8)),
        ValueError, ["{root}/train-labels-idx1-ubyte.gz", "0..9", "e.g. 12", "get it again"]),
    "fmnist-images-not-28x28": (
        lambda t, m: _fashion_mnist(t, t10k_images_idx3_ubyte=np.zeros((8, 20, 20), np.uint8)),
        ValueError, ["{root}/t10k-images-idx3-ubyte.gz", "(8, 20, 20)", "get it again"]),
    "fmnist-images-zero-wide": (
        lambda t, m: _fashion_mnist(t, train_images_idx3_ubyte=np.zeros((16, 28, 0), np.uint8)),
        ValueError, ["{root}/train-images-idx3-ubyte.gz", "(16, 28, 0)", "get it again"]),
    "fmnist-fewer-labels-than-images": (
        lambda t, m: _fashion_mnist(t, train_labels_idx1_ubyte=np.zeros(10, np.uint8)),
        ValueError, ["{root}/train-labels-idx1-ubyte.gz", "expected 16 labels", "get both again"]),
    "fmnist-header-overflows": (
        lambda t, m: _edit(_fashion_mnist(t), "t10k-images-idx3-ubyte.gz", lambda p: p.write_bytes(
            gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 4_000_000_000, 4_000_000_000, 4_000_000_000)))),
        ValueError, ["{root}/t10k-images-idx3-ubyte.gz", "64000000000000000000000000016 bytes", "get it again"]),
    "fmnist-no-test-images": (
        lambda t, m: _fashion_mnist(t, t10k_images_idx3_ubyte=np.zeros((0, 28, 28), np.uint8),
                                    t10k_labels_idx1_ubyte=np.zeros(0, np.uint8)),
        ValueError, ["{root}/t10k-images-idx3-ubyte.gz", "holds no images", "get it again"]),
    "fmnist-root-is-a-file": (
        lambda t, m: _edit(DataConfig(name=FM, root=str(t / "fm.tar.gz")), "", lambda p: p.write_bytes(b"x")),
        ValueError, ["data.root = '{root}/fm.tar.gz' is a file", "set data.root"]),
    "fmnist-download-fails-offline": (
        _fails_to_download(FM, "FashionMNIST"),
        FileNotFoundError, ["{root}/download_here", "downloading it failed", "Name or service not known",
                            "apt-get install dataset-fashion-mnist", "data.root="]),
    "cifar-labels-not-integers": (
        lambda t, m: _cifar10(t, data_batch_2=_labels(["cat"] * 4)),
        ValueError, ["{root}/cifar-10-batches-py/data_batch_2", "b'labels'", "get it again"]),
    "cifar-labels-out-of-range": (
        lambda t, m: _cifar10(t, test_batch=_labels([0, 10, 1, 2])),
        ValueError, ["{root}/cifar-10-batches-py/test_batch", "0..9", "e.g. 10", "get it again"]),
    "cifar-negative-labels": (
        lambda t, m: _cifar10(t, data_batch_1=_labels([0, -1, 1, 2])),
        ValueError, ["{root}/cifar-10-batches-py/data_batch_1", "e.g. -1", "get it again"]),
    "cifar-no-labels": (
        lambda t, m: _cifar10(t, data_batch_1={b"data": np.zeros((4, 3072), np.uint8)}),
        ValueError, ["{root}/cifar-10-batches-py/data_batch_1", "no b'labels' entry", "get it again"]),
    "cifar-not-a-dict": (
        lambda t, m: _cifar10(t, data_batch_3=pickle.dumps([1, 2, 3])),
        ValueError, ["{root}/cifar-10-batches-py/data_batch_3", "got list", "get it again"]),
    # an empty array pickled by Python 3 names builtins.bytes, which the safe unpickler refused
    "cifar-empty-test-batch": (
        lambda t, m: _cifar10(t, test_batch=_labels([])),
        ValueError, ["cifar10 test set", "{root}", "no examples", "get the dataset again"]),
    "cifar-download-fails-offline": (
        _fails_to_download("cifar10", "CIFAR10"),
        FileNotFoundError, ["{root}/download_here", "downloading it failed", "cifar-10-python.tar.gz", "data.root="]),
    "tiny-empty-wnids": (
        lambda t, m: _edit(_tiny_imagenet(t), f"{T}/wnids.txt", lambda p: p.write_text("\n")),
        ValueError, ["{root}/tiny-imagenet-200/wnids.txt", "is empty", "unzip"]),
    "tiny-repeated-wnid": (
        lambda t, m: _tiny_imagenet(t, wnids=("n01", "n02", "n01")),
        ValueError, ["{root}/tiny-imagenet-200/wnids.txt", "n01 more than once", "unzip"]),
    "tiny-one-class": (
        lambda t, m: _tiny_imagenet(t, wnids=("n01",)),
        ValueError, ["{root}/tiny-imagenet-200/wnids.txt", "two or more", "unzip"]),
    "tiny-bad-annotation": (
        lambda t, m: _edit(_tiny_imagenet(t), f"{T}/val/val_annotations.txt", lambda p: p.write_text("val_0 n99\n")),
        ValueError, ["{root}/tiny-imagenet-200/val/val_annotations.txt:1", "'val_0 n99'", "unzip"]),
    # was found only when evaluation reached it, after a whole epoch of training
    "tiny-annotated-image-missing": (
        lambda t, m: _edit(_tiny_imagenet(t), f"{T}/val/images/val_1.JPEG", Path.unlink),
        FileNotFoundError, ["{root}/tiny-imagenet-200/val/val_annotations.txt", "val/images/val_1.JPEG", "unzip"]),
    "tiny-no-val-annotations": (
        lambda t, m: _edit(_tiny_imagenet(t), f"{T}/val/val_annotations.txt", Path.unlink),
        FileNotFoundError, ["{root}/tiny-imagenet-200/val/val_annotations.txt is missing", "unzip"]),
    "tiny-no-training-images": (
        lambda t, m: _edit(_tiny_imagenet(t), f"{T}/train", lambda p: [f.unlink() for f in p.rglob("*.JPEG")]),
        FileNotFoundError, ["{root}/tiny-imagenet-200/train", "no training images", "unzip"]),
    # trained a one-class "classifier" (loss 0 from the first step) and exited 0
    "folder-one-class": (
        lambda t, m: _image_folder(t, classes=("cats",)),
        ValueError, ["{root}/train has one class folder (cats)", "two or more", "add a folder"]),
    "folder-val-empty": (
        lambda t, m: _edit(_image_folder(t), "val", lambda p: [f.unlink() for f in p.rglob("*.png")]),
        FileNotFoundError, ["{root}/val holds no images", "put test images"]),
    "folder-no-val": (
        lambda t, m: _image_folder(t, val=False),
        FileNotFoundError, ["{root}/val", "{root}/test", "data.root="]),
    "folder-first-image-corrupt": (
        lambda t, m: _edit(_image_folder(t), "train/a/0.png", lambda p: p.write_bytes(b"not a png")),
        ValueError, ["{root}/train/a/0.png", "cannot read this image", "replace the file"]),
    "folder-no-root": (
        lambda t, m: DataConfig(name="image_folder"),
        ValueError, ["needs data.root", "set data.root"]),
    "folder-root-is-a-file": (
        lambda t, m: _edit(DataConfig(name="image_folder", root=str(t / "x.zip")), "", lambda p: p.write_bytes(b"x")),
        ValueError, ["data.root = '{root}/x.zip' is a file"]),
}


@pytest.mark.parametrize("setup,error,needles", DATA_CASES.values(), ids=DATA_CASES.keys())
def test_bad_dataset_file_is_a_clear_error_naming_file_and_fix(tmp_path, monkeypatch, setup, error, needles):
    """Pinpoints a broken dataset that is read without complaint (trained on), or rejected with an
    exception the CLI does not report cleanly, or with a message naming no file or no fix."""
    cfg = setup(tmp_path, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # checksums of the tiny files differ from the real ones
        with pytest.raises(error) as err:
            build_loaders(cfg, seed=0)
    assert type(err.value) in (ValueError, FileNotFoundError)  # the two the CLI reports without a traceback
    message = str(err.value)
    for needle in needles:
        assert needle.format(root=tmp_path) in message, message
    assert "Traceback" not in message


@pytest.mark.parametrize("num_workers", [0, 1], ids=["in-process", "worker-process"])
@pytest.mark.parametrize("defect", ["garbage", "truncated-jpeg"])
def test_corrupt_image_met_mid_epoch_names_the_file(tmp_path, num_workers, defect):
    """Pinpoints a corrupt image deep in a lazily read dataset that fails with PIL's bare error (a
    traceback in the CLI) or, from a DataLoader worker, with the worker's whole traceback as message."""
    cfg = _tiny_imagenet(tmp_path)
    bad = tmp_path / T / "train" / "n02" / "images" / "n02_3.JPEG"
    bad.write_bytes(b"no image here" if defect == "garbage" else JPEG_HEAD)
    train, _, _ = build_loaders(dataclasses.replace(cfg, num_workers=num_workers), seed=0)
    with pytest.raises(ValueError) as err:
        for _ in train:
            pass
    message = str(err.value)
    assert str(bad) in message and "replace the file" in message, message
    assert "Traceback" not in message and "DataLoader worker" not in message


# --------------------------------------------------------------------------- errors the CLI reports


def _main(capsys, *args: str) -> tuple[int, str]:
    from parallel_dkp.cli import main

    code = main(list(args))
    return code, " ".join(capsys.readouterr().err.split())


def _train_raises(monkeypatch, error: BaseException) -> None:
    """``parallel_dkp.train.train`` raising ``error`` at once, as a real run would at that point."""
    import parallel_dkp.train

    def fail(cfg, **kwargs):
        raise error

    monkeypatch.setattr(parallel_dkp.train, "train", fail)


def test_config_that_is_not_utf8_names_the_file(tmp_path, capsys):
    """Pinpoints a binary --config (a dataset file, an archive) reported as a bare codec error."""
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00" * 64))
    code, text = _main(capsys, "plan", "--config", str(bad))
    assert code == 2 and text.startswith("config error:")
    assert str(bad) in text and "not UTF-8" in text and "configs/default.toml" in text


def test_unreadable_config_names_the_file(tmp_path, capsys, monkeypatch):
    """Pinpoints a --config without read permission ending in a PermissionError traceback. (Simulated:
    the tests may run as root, whom chmod does not stop.)"""
    config = tmp_path / "run.toml"
    config.write_text("[run]\nepochs = 1\n")
    real_open = Path.open

    def guarded(self, *args, **kwargs):
        if self == config:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", guarded)
    code, text = _main(capsys, "plan", "--config", str(config))
    assert code == 2 and text.startswith("config error:")
    assert str(config) in text and "Permission denied" in text and "another --config" in text


OUT = "/data/runs/r1"
# error raised by a run on a path -> what the message must name (the path, the key it came from, the fix)
OS_ERRORS = {
    "out_dir-not-writable": (PermissionError(errno.EACCES, "Permission denied", f"{OUT}/config.toml"),
                             [f"{OUT}/config.toml", f"run.out_dir = '{OUT}'", "fix its permissions"]),
    "out_dir-is-a-file": (FileExistsError(errno.EEXIST, "File exists", OUT),
                          [OUT, "run.out_dir", "a file is in the way"]),
    "out_dir-under-a-file": (NotADirectoryError(errno.ENOTDIR, "Not a directory", f"{OUT}/checkpoints"),
                             [f"{OUT}/checkpoints", "run.out_dir", "is a file, not a folder"]),
    "out_dir-disk-full": (OSError(errno.ENOSPC, "No space left on device", f"{OUT}/checkpoints/step-1/shard-00.pt"),
                          ["shard-00.pt", "run.out_dir", "the disk is full"]),
    "out_dir-read-only": (OSError(errno.EROFS, "Read-only file system", OUT), [OUT, "read-only", "writable path"]),
    "data-file-unreadable": (PermissionError(errno.EACCES, "Permission denied", "/data/fm/train-images-idx3-ubyte.gz"),
                             ["/data/fm/train-images-idx3-ubyte.gz", "data.root = '/data/fm'", "fix its permissions"]),
}


@pytest.mark.parametrize("error,needles", OS_ERRORS.values(), ids=OS_ERRORS.keys())
def test_os_error_on_a_user_path_names_path_key_and_fix(capsys, monkeypatch, error, needles):
    """Pinpoints a file-system error on run.out_dir or data.root that ends in a traceback, or whose
    message does not say which path, which setting it came from and what to do."""
    _train_raises(monkeypatch, error)
    code, text = _main(capsys, "train", "--set", f"run.out_dir={OUT}", "--set", "data.root=/data/fm")
    assert code == 2 and text.startswith("error:"), text
    for needle in needles:
        assert needle in text, text


def test_missing_file_in_an_existing_folder_is_not_blamed_on_the_folder(tmp_path, capsys, monkeypatch):
    """Pinpoints a file deleted under a run (a checkpoint shard) reported as "its folder does not exist"."""
    shard = tmp_path / "checkpoints" / "step-00000001" / "shard-00.pt"
    shard.parent.mkdir(parents=True)
    _train_raises(monkeypatch, FileNotFoundError(errno.ENOENT, "No such file or directory", str(shard)))
    code, text = _main(capsys, "train", "--set", f"run.out_dir={tmp_path}")
    assert code == 2 and f"{shard} (from run.out_dir = '{tmp_path}')" in text, text
    assert "it does not exist" in text and "folder does not exist" not in text


def test_eval_out_that_is_a_folder_names_the_option(tmp_path, capsys, monkeypatch):
    """Pinpoints ``eval --out <a folder>`` ending in an IsADirectoryError traceback after the evaluation."""
    import parallel_dkp.train

    monkeypatch.setattr(parallel_dkp.train, "evaluate_checkpoint", lambda cfg, **kwargs: {"test_acc": 0.5})
    code, text = _main(capsys, "eval", "--out", str(tmp_path))
    assert code == 2 and f"{tmp_path} (from --out {tmp_path}): Is a directory" in text, text
    assert "give a file path" in text


def test_out_of_memory_names_the_sizes_to_lower(capsys, monkeypatch):
    """Pinpoints an allocation failure (a huge data.image_size or batch) ending in torch's C++ text
    and a traceback instead of naming the settings that size the allocation."""
    _train_raises(monkeypatch, RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 409600000000 bytes. Error code 12 (Cannot allocate memory)"))
    code, text = _main(capsys, "train", "--set", "data.image_size=10000")
    assert code == 2 and text.startswith("out of memory"), text
    assert "381.5 GiB" in text and "data.batch_size (now 128)" in text and "data.image_size (now 10000)" in text


@pytest.mark.parametrize("error", [RuntimeError("a bug: shapes (2, 3) and (4, 5)"), ConnectionResetError(104, "reset")],
                         ids=["runtime-error", "os-error-without-path"])
def test_errors_no_user_can_fix_keep_their_traceback(capsys, monkeypatch, error):
    """Pinpoints the CLI swallowing a real bug (any RuntimeError, an OSError that names no path) into a
    tidy one-line message that hides where it happened."""
    _train_raises(monkeypatch, error)
    with pytest.raises(type(error)):
        _main(capsys, "train")


def test_cli_out_dir_that_is_a_file_loses_nothing(tmp_path):
    """Pinpoints run.out_dir naming an existing file: a FileExistsError traceback, or the file replaced."""
    blocker = tmp_path / "results"
    blocker.write_text("keep me")
    proc, _ = _cli("train", "--set", "data.name=synthetic", "--set", "data.synthetic_shape=[1, 8, 8]",
                   "--set", "data.synthetic_size=32", "--set", "data.batch_size=16", "--set", "run.max_steps=1",
                   "--set", "run.progress=false", "--set", f"run.out_dir={blocker}")
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{blocker} (from run.out_dir = '{blocker}')" in text and "Traceback" not in text
    assert blocker.read_text() == "keep me"


def test_cli_corrupt_dataset_file_is_one_line_naming_it(tmp_path):
    """Pinpoints a corrupt dataset file reaching the user as a traceback (here: labels out of range)."""
    _fashion_mnist(tmp_path / "fm", train_labels_idx1_ubyte=np.full(16, 10, np.uint8))
    proc, _ = _cli("train", "--set", f"data.root={tmp_path / 'fm'}", "--set", "data.batch_size=4",
                   "--set", "run.max_steps=1", "--set", "run.progress=false", "--set", f"run.out_dir={tmp_path / 'o'}")
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {tmp_path / 'fm' / 'train-labels-idx1-ubyte.gz'}: labels must lie in 0..9" in text, text
    assert "get it again" in text and "Traceback" not in text
