"""Image views (parallel_dkp/data/transforms.py) and the config keys that choose them.

torchvision's own functional transforms are the reference: the authors' AlexNet code trains with
``RandomResizedCrop(224)`` + ``RandomHorizontalFlip()`` and tests with ``Resize(256)`` +
``CenterCrop(224)``. Datasets are the tiny canonical-format files of ``test_data``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as tv
import torchvision.transforms.v2.functional as TF
from PIL import Image
from test_data import make_cifar, make_tiny_imagenet

from parallel_dkp.config import DataConfig, load_config
from parallel_dkp.data import build_datasets, build_loaders
from parallel_dkp.data import transforms as T

pytestmark = pytest.mark.filterwarnings("ignore::parallel_dkp.data.ChecksumWarning")

RRC = T.RandomResizedCropFlip
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def images(num=3, channels=3, height=32, width=32, seed=0):
    return torch.randn(num, channels, height, width, generator=torch.Generator().manual_seed(seed))


def draws(view, num, seed=0):
    return view.draw(num, torch.Generator().manual_seed(seed))


def textured_tiny_imagenet(root: Path, *, per_class: int = 4) -> None:
    """make_tiny_imagenet's tree with every image replaced by random pixels: its flat colours look
    the same under any crop, so they could not tell one crop from another."""
    make_tiny_imagenet(root, per_class=per_class)
    rng = np.random.default_rng(0)
    for path in sorted(root.rglob("*.JPEG")):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, format="JPEG", quality=95)


# --------------------------------------------------------------------------- the views against torchvision


@pytest.mark.parametrize("shape", [(32, 32), (64, 64), (20, 30)], ids=["cifar", "tiny", "non-square"])
def test_resize_center_crop_is_torchvision_resize_then_center_crop(shape):
    """The test view differs from torchvision's Resize(256) + CenterCrop(224) (short side, truncated
    long side, antialiasing, or the crop's anchor)."""
    x = images(2, 3, *shape)
    expected = TF.center_crop(TF.resize(x, [256], antialias=True), [224, 224])
    out = T.ResizeCenterCrop((224, 224), resize=256).apply_batch(x)
    assert out.shape == (2, 3, 224, 224)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_resize_center_crop_by_hand_on_a_tiny_image():
    """The test view is not "upsample, then keep the middle": a 2x2 image resized to 4x4 and
    centre-cropped to 2x2 must be the four bilinear samples at 3/8 and 5/8 of each side."""
    x = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])  # [1, 2, 2]
    out = T.ResizeCenterCrop((2, 2), resize=4).apply(x)
    # Resize 2 -> 4 (align_corners=False): output pixel i samples input coordinate (i + 0.5) / 2 - 0.5,
    # i.e. 0.25 and 0.75 for the middle pixels 1 and 2; bilinear in x (step 1) and y (step 2).
    lo, hi = 0.25, 0.75
    expected = torch.tensor([[[lo + 2 * lo, hi + 2 * lo], [lo + 2 * hi, hi + 2 * hi]]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, TF.center_crop(TF.resize(x, [4], antialias=True), [2, 2]))


def test_random_resized_crop_applies_torchvision_resized_crop_and_flip():
    """The random view does not crop the drawn box, resize it like torchvision's resized_crop, and
    flip exactly the examples whose flip was drawn."""
    view = RRC((224, 224))
    x = images(16, 3, 32, 32)
    params = draws(view, 16)
    out = view.apply_batch(x, params)
    assert out.shape == (16, 3, 224, 224)
    for b, p in enumerate(params):
        top, left, h, w = view.box(32, 32, p)
        expected = TF.resized_crop(x[b], top, left, h, w, [224, 224], antialias=True)
        torch.testing.assert_close(out[b], expected.flip(-1) if p[-1] else expected, rtol=0, atol=1e-6)
    assert 0 < sum(p[-1] for p in params) < 16


def test_random_resized_crop_box_by_hand():
    """The box is not torchvision's RandomResizedCrop formula for given random numbers: area
    fraction 0.08 + 0.92 u, log-uniform aspect, rounded sides, uniform position, and the
    central fallback when no try fits."""
    view = RRC((8, 8))
    tries = [0.5] * T.NUM_TRIES
    # u = 0.5: 54 % of 32x32 = 552.96 px at aspect 1 -> 24x24 (sqrt = 23.5), top at floor(0.25 * 9).
    assert view.box(32, 32, (tries, tries, 0.25, 0.999, False)) == (2, 8, 24, 24)
    # Aspect ratio at the top of [3/4, 4/3] on the whole area: w = 32 * sqrt(4/3) > 32 never fits;
    # a 10x40 image (aspect 4 > 4/3) then falls back to the central 10 x round(10 * 4/3) = 10x13.
    never = (([1.0 - 1e-12] * T.NUM_TRIES), [1.0 - 1e-12] * T.NUM_TRIES, 0.0, 0.0, False)
    assert view.box(10, 40, never) == (0, (40 - 13) // 2, 10, 13)
    assert view.box(32, 32, never) == (0, 0, 32, 32)  # square: the whole image


def test_random_resized_crop_boxes_have_torchvision_distribution():
    """Our boxes' area fraction, aspect ratio or position differ in distribution from torchvision's
    RandomResizedCrop (e.g. a linear instead of a log-uniform aspect ratio, or a biased position)."""
    num, size = 4000, (37, 53)
    ours = [RRC((8, 8)).box(*size, p) for p in draws(RRC((8, 8)), num)]
    reference = tv.RandomResizedCrop(8)
    with torch.random.fork_rng():  # torchvision draws from the global RNG; keep it out of other tests
        torch.manual_seed(0)
        theirs = [tuple(reference.make_params([torch.empty(3, *size)]).values()) for _ in range(num)]

    def stats(boxes):
        t = torch.tensor(boxes, dtype=torch.float64)
        top, left, h, w = t.unbind(1)
        centre_y, centre_x = (top + h / 2) / size[0], (left + w / 2) / size[1]
        return torch.stack([h * w / math.prod(size), (w / h).log(), centre_y, centre_x]).mean(1)

    # Standard errors are about 0.004 (area), 0.003 (log aspect) and 0.002 (centres).
    torch.testing.assert_close(stats(ours), stats(theirs), rtol=0, atol=0.02)


@pytest.mark.parametrize(
    "view",
    [T.Resize((20, 20)), T.ResizeCenterCrop((20, 20), resize=24), T.PadCropFlip((20, 20)), RRC((20, 20))],
    ids=["resize", "center", "pad", "random_resized"],
)
def test_batch_view_equals_per_image_view(view):
    """In-memory batches (apply_batch, main process) and lazily read images (apply, one per worker
    call) get different pixels for the same drawn numbers."""
    x = images(6, 3, 12, 16)
    params = draws(view, 6)
    batch = view.apply_batch(x, params if view.random else None)
    single = torch.stack([view.apply(x[b], params[b]) for b in range(6)])
    assert batch.shape == (6, 3, 20, 20)
    torch.testing.assert_close(batch, single, rtol=0, atol=0)


# --------------------------------------------------------------------------- the loaders

AUTHORS = dict(augment=True, augment_crop="random_resized", test_crop_fraction=0.875, image_size=224)


@pytest.fixture
def cifar_cfg(tmp_path):
    make_cifar(tmp_path, "cifar100", per_file=12)
    return DataConfig(name="cifar100", root=str(tmp_path), batch_size=4, **AUTHORS)


def test_random_resized_loader_shape_seeded_and_new_each_epoch(cifar_cfg):
    """The authors' training crop is not 224x224, changes labels or order, differs between two
    loaders (ranks) with one seed, or crops an image the same way in two epochs."""
    loader_a, _, info = build_loaders(cifar_cfg, seed=3)
    loader_b, _, _ = build_loaders(cifar_cfg, seed=3)
    plain, _, _ = build_loaders(dataclasses.replace(cifar_cfg, augment=False), seed=3)
    assert info.input_shape == (3, 224, 224)
    epochs_a = [list(loader_a) for _ in range(2)]
    epochs_b = [list(loader_b) for _ in range(2)]
    assert [x.shape for x, _ in epochs_a[0]] == [(4, 3, 224, 224)] * 3
    for batches_a, batches_b in zip(epochs_a, epochs_b, strict=True):
        for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xp, yp) in zip(epochs_a[0], plain, strict=True):
        assert torch.equal(ya, yp) and not torch.equal(xa, xp)  # same order, other pixels
    # make_cifar's 12 training labels are distinct, so a label names an image across epochs.
    crops = [{int(label): x[i] for x, y in epoch for i, label in enumerate(y)} for epoch in epochs_a]
    assert not any(torch.equal(crops[0][label], crops[1][label]) for label in crops[0])


def test_test_loader_is_resize_256_center_crop_224_of_the_stored_images(cifar_cfg):
    """The test loader augments, or its view is not torchvision's Resize(256) + CenterCrop(224)
    of the stored 32x32 images; or data.test_crop_fraction leaks into the un-augmented training view."""
    train, test, _ = build_datasets(cifar_cfg)
    _, test_loader, _ = build_loaders(cifar_cfg, seed=0)
    served = torch.cat([x for x, _ in test_loader])
    expected = TF.center_crop(TF.resize(test.x, [256], antialias=True), [224, 224])
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-6)
    assert torch.equal(torch.cat([x for x, _ in build_loaders(cifar_cfg, seed=9)[1]]), served)  # no seed effect
    plain_train, _, _ = build_loaders(dataclasses.replace(cifar_cfg, augment=False, batch_size=12), seed=0)
    x, y = next(iter(plain_train))
    index = [int((train.y == label).nonzero()[0]) for label in y]  # labels of make_cifar are distinct
    torch.testing.assert_close(x, TF.resize(train.x[index], [224, 224], antialias=True), rtol=0, atol=1e-6)


@pytest.mark.parametrize("lazy", [False, True], ids=["in-memory", "lazy"])
def test_resume_mid_epoch_gives_the_remaining_batches(tmp_path, cifar_cfg, lazy):
    """A run resumed after step 2 of epoch 1 (a fresh loader, set_epoch and islice, as train.py does)
    sees other crops than the uninterrupted run would have."""
    cfg = cifar_cfg
    if lazy:
        textured_tiny_imagenet(tmp_path / "tiny")
        cfg = DataConfig(name="tiny_imagenet", root=str(tmp_path / "tiny"), batch_size=2, **AUTHORS)
    uninterrupted, _, _ = build_loaders(cfg, seed=1)
    list(uninterrupted)
    epoch1 = [(x, y) for x, y in uninterrupted]
    resumed, _, _ = build_loaders(cfg, seed=1)
    resumed.set_epoch(1)
    tail = list(itertools.islice(iter(resumed), 2, len(resumed)))
    assert len(tail) == len(epoch1) - 2 >= 1
    for (x, y), (xr, yr) in zip(epoch1[2:], tail, strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_lazy_views_do_not_depend_on_workers_or_touch_the_global_rng(tmp_path):
    """Tiny ImageNet crops (drawn in the main process, applied in workers) differ with worker
    processes, repeat from epoch to epoch, are not of the native 64x64 image, or loading consumes
    global random numbers."""
    textured_tiny_imagenet(tmp_path)
    cfg = DataConfig(name="tiny_imagenet", root=str(tmp_path), batch_size=4, **AUTHORS)
    state = torch.get_rng_state()
    served = {}
    for workers in (0, 2):
        train, test, _ = build_loaders(dataclasses.replace(cfg, num_workers=workers), seed=4)
        served[workers] = [[x for x, _ in loader] for loader in (train, train, test)]  # epochs 0, 1; test
    assert torch.equal(state, torch.get_rng_state())
    for batches0, batches2 in zip(served[0], served[2], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(batches0, batches2, strict=True))
    assert served[0][0][0].shape == (4, 3, 224, 224) and served[0][2][0].shape == (4, 3, 224, 224)
    # Each epoch crops anew: the sorted per-image means (order-free fingerprints) of two epochs differ.
    fingerprints = [sorted(float(x[i].mean()) for x in epoch for i in range(4)) for epoch in served[0][:2]]
    assert fingerprints[0] != fingerprints[1]
    # The train loader's crops are the view of the stored 64x64 images with the drawn numbers.
    train_ds, test_ds, _ = build_datasets(cfg)
    loader, _, _ = build_loaders(cfg, seed=4)
    view = loader.view
    keys = next(iter(loader._dataloader.batch_sampler))
    expected = torch.stack([view.apply(train_ds[i][0], p) for i, p in keys])
    assert train_ds[0][0].shape == (3, 64, 64)
    assert torch.equal(served[0][0][0], expected)


def test_augmentation_leaves_the_global_rng_alone_in_memory(cifar_cfg):
    """Random resized crops of in-memory images consume global random numbers, which would make
    model initialisation depend on data loading."""
    state = torch.get_rng_state()
    for loader in build_loaders(cifar_cfg, seed=0)[:2]:
        list(loader)
    assert torch.equal(state, torch.get_rng_state())


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (["data.augment_crop=random_resize"], ["data.augment_crop = 'random_resize'", "random_resized"]),
        (["data.augment_crop=3"], ["data.augment_crop = '3'", "pad, random_resized"]),
        (["data.test_crop_fraction=0"], ["data.test_crop_fraction = 0.0", "(0, 1]", "data.test_crop_fraction=0.875"]),
        (["data.test_crop_fraction=1.2"], ["data.test_crop_fraction = 1.2", "(0, 1]"]),
        (["data.test_crop_fraction=nan"], ["data.test_crop_fraction = nan", "(0, 1]"]),
        (["data.name=synthetic", "model.name=mlp", "data.synthetic_shape=[64]", "data.test_crop_fraction=0.5"],
         ["data.test_crop_fraction", "[64]", "data.test_crop_fraction=1"]),
        (["data.name=synthetic", "model.name=mlp", "data.synthetic_shape=[64]", "data.augment=true",
          "data.augment_crop=random_resized"], ["data.augment", "[64]"]),
    ],
    ids=["crop-typo", "crop-not-a-name", "fraction=0", "fraction>1", "fraction=nan", "fraction-vector",
         "random_resized-vector"],
)
def test_bad_transform_config_names_key_and_fix(overrides, needles):
    """A bad data.augment_crop / data.test_crop_fraction passes load_config (to fail later, or
    silently do nothing), or the message does not name the key, the value and what to set."""
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_loader_level_errors_for_transforms(cifar_cfg, tmp_path):
    """Views built without load_config (DataConfig in code) accept a centre crop of vectors or of
    non-square images, or an unknown crop, or say so without the fix."""
    with pytest.raises(ValueError, match="data.test_crop_fraction=1"):
        build_loaders(DataConfig(name="synthetic", synthetic_shape=(16,), batch_size=8, test_crop_fraction=0.5), seed=0)
    with pytest.raises(ValueError, match="set data.image_size, or data.test_crop_fraction=1"):
        build_loaders(DataConfig(name="synthetic", synthetic_shape=(1, 8, 12), batch_size=8, test_crop_fraction=0.5),
                      seed=0)
    with pytest.raises(ValueError, match="data.augment_crop=pad"):
        build_loaders(dataclasses.replace(cifar_cfg, augment_crop="random"), seed=0)


def test_crop_fraction_sizes_at_224_and_at_native_32(cifar_cfg):
    """data.test_crop_fraction = 0.875 is not Resize(256) + CenterCrop(224) at 224, or not
    Resize(36) + CenterCrop(32) on CIFAR at its native size (image_size = 0)."""
    from parallel_dkp.data.transforms import build_views

    assert build_views(cifar_cfg, (224, 224))[1] == T.ResizeCenterCrop((224, 224), resize=256)
    native = dataclasses.replace(cifar_cfg, image_size=0)
    _, test_loader, info = build_loaders(native, seed=0)
    assert info.input_shape == (3, 32, 32) and test_loader.view == T.ResizeCenterCrop((32, 32), resize=36)
    served = torch.cat([x for x, _ in test_loader])
    expected = TF.center_crop(TF.resize(test_loader.dataset.x, [36], antialias=True), [32, 32])
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-6)


def test_alexnet_configs_use_the_authors_transforms():
    """The Table 2 AlexNet configs drift from the authors' RandomResizedCrop(224)+flip / Resize(256)+
    CenterCrop(224), or the defaults stop meaning "as before" (pad crop, straight test resize)."""
    for name in ("cifar100_alexnet", "tiny_imagenet_alexnet", "alexnet_small_cifar100"):
        data = load_config(CONFIGS / f"{name}.toml").data
        assert (data.augment, data.augment_crop, data.test_crop_fraction) == (True, "random_resized", 0.875), name
    assert (DataConfig().augment, DataConfig().augment_crop, DataConfig().test_crop_fraction) == (False, "pad", 1.0)
