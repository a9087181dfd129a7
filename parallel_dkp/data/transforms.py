"""Image views: how a loader turns stored images into model inputs of ``data.image_size``.

Datasets serve images as stored (CIFAR 32x32, Tiny ImageNet 64x64, a folder's images at their
own sizes); every resize, crop and flip is one of the views below, chosen by ``data.augment``,
``data.augment_crop`` and ``data.test_crop_fraction`` (:func:`build_views`):

* :class:`Resize` - straight to ``size`` (no augmentation, and the default test view);
* :class:`ResizeCenterCrop` - short side to ``resize``, then the centre ``size`` (torchvision's
  ``Resize(256)`` + ``CenterCrop(224)``, the authors' AlexNet test transform);
* :class:`PadCropFlip` - resize, then a crop of the image zero-padded by 1/8 of each side, and a
  horizontal flip with p = 1/2 (the usual small-image augmentation);
* :class:`RandomResizedCropFlip` - torchvision's ``RandomResizedCrop(size)`` of the stored image,
  then the flip (the authors' AlexNet training transform).

A random view is split in two so that every rank, and any number of DataLoader workers, produce
the same batches: :meth:`View.draw` takes each example's random numbers from the loader's
generator (seeded by ``(seed, epoch)``), in the main process and in batch order; :meth:`View.apply`
uses them, on whole batches for in-memory datasets or image by image in a worker for lazily read
ones. Nothing here touches the global RNG.

All resizing is bilinear, antialiased when shrinking, on normalised float tensors: exactly what
``torchvision.transforms.v2.functional`` does to float tensors (tests compare the two), but
without importing torchvision, which costs every rank seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, get_args

import torch

from parallel_dkp.config import AugmentCrop, DataConfig
from parallel_dkp.data.common import resize_images

Params = Any
"""One example's random numbers, as drawn by :meth:`View.draw` (plain Python values, so they
travel cheaply to DataLoader workers); ``None`` for deterministic views."""


@dataclass(frozen=True)
class View:
    """Turns one stored image ``[C, H, W]`` (any ``H, W``) into ``[C, *size]``.

    Attributes:
        size: ``(H, W)`` of the output, or ``None`` to leave examples (e.g. vectors) as they are.
    """

    size: tuple[int, int] | None
    random: ClassVar[bool] = False
    """Whether :meth:`draw` consumes random numbers (the loader then makes a generator)."""

    def draw(self, num: int, generator: torch.Generator | None) -> list[Params]:
        """The random numbers of ``num`` examples, one entry each."""
        return [None] * num

    def apply(self, x_CHW: torch.Tensor, params: Params) -> torch.Tensor:
        """The view of one image with its drawn ``params``."""
        raise NotImplementedError

    def apply_batch(self, x_BCHW: torch.Tensor, params: list[Params] | None) -> torch.Tensor:
        """The view of a batch of equally sized images; equals stacking :meth:`apply`."""
        params = params if params is not None else [None] * len(x_BCHW)
        return torch.stack([self.apply(x, p) for x, p in zip(x_BCHW, params, strict=True)])


def _resize(x_BCHW: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    if size is None or tuple(x_BCHW.shape[-2:]) == tuple(size):
        return x_BCHW
    return resize_images(x_BCHW, size)


@dataclass(frozen=True)
class Resize(View):
    """Bilinear resize to ``size`` (aspect ratio not kept); the identity when already that size."""

    def apply(self, x_CHW: torch.Tensor, params: Params = None) -> torch.Tensor:
        return _resize(x_CHW[None], self.size)[0] if x_CHW.dim() == 3 else x_CHW

    def apply_batch(self, x_BCHW: torch.Tensor, params: list[Params] | None = None) -> torch.Tensor:
        return _resize(x_BCHW, self.size) if x_BCHW.dim() == 4 else x_BCHW


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """``(H, W)`` after resizing the short side to ``short``, keeping the aspect ratio (torchvision's
    ``Resize(short)``: the long side is truncated, not rounded)."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def center_crop(x_CHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The centre ``size`` of ``[..., H, W]`` (torchvision's anchor: offsets rounded half to even)."""
    height, width = x_CHW.shape[-2:]
    assert size[0] <= height and size[1] <= width, f"cannot center-crop {size} from a {height}x{width} image"
    top, left = int(round((height - size[0]) / 2.0)), int(round((width - size[1]) / 2.0))
    return x_CHW[..., top : top + size[0], left : left + size[1]]


@dataclass(frozen=True)
class ResizeCenterCrop(View):
    """Resize the short side to ``resize`` (aspect kept), then crop the centre ``size``.

    ``resize=256, size=(224, 224)`` is torchvision's ``Resize(256)`` + ``CenterCrop(224)``: the
    test image shows the central 87.5 % of the picture, at the scale of the training crops.
    """

    resize: int = 0

    def __post_init__(self):
        assert self.size is not None and self.resize >= max(self.size), f"cannot crop {self.size} from {self.resize}"

    def apply(self, x_CHW: torch.Tensor, params: Params = None) -> torch.Tensor:
        return self.apply_batch(x_CHW[None])[0]

    def apply_batch(self, x_BCHW: torch.Tensor, params: list[Params] | None = None) -> torch.Tensor:
        resized = _resize(x_BCHW, short_side_size(*x_BCHW.shape[-2:], self.resize))
        return center_crop(resized, self.size).contiguous()


def _shift_flip(x_CHW: torch.Tensor, dy: int, dx: int, flip: bool, out_CHW: torch.Tensor) -> None:
    """Write into the zeroed ``out_CHW`` the image moved by ``(dy, dx)``, then mirrored if ``flip``."""
    _, height, width = x_CHW.shape
    # One slice copy, without materialising a padded image.
    src_r0, src_r1 = max(0, dy), min(height, height + dy)
    src_c0, src_c1 = max(0, dx), min(width, width + dx)
    dst_c0, dst_c1 = src_c0 - dx, src_c1 - dx
    window = x_CHW[:, src_r0:src_r1, src_c0:src_c1]
    if flip:
        window, dst_c0, dst_c1 = window.flip(-1), width - dst_c1, width - dst_c0
    out_CHW[:, src_r0 - dy : src_r1 - dy, dst_c0:dst_c1] = window


@dataclass(frozen=True)
class PadCropFlip(View):
    """Resize to ``size``, then a random ``size`` crop after zero-padding 1/8 of each side, then a
    horizontal flip with p = 1/2.

    Zero is the mean colour of normalised images, so the padding adds no artificial dark border.
    Params: ``(dy, dx, flip)``, the crop's offset from the unpadded image, in ``[-pad, pad]``.
    """

    random: ClassVar[bool] = True

    def draw(self, num: int, generator: torch.Generator | None) -> list[Params]:
        pad_h, pad_w = self.size[0] // 8, self.size[1] // 8
        shift_y = torch.randint(-pad_h, pad_h + 1, (num,), generator=generator).tolist()
        shift_x = torch.randint(-pad_w, pad_w + 1, (num,), generator=generator).tolist()
        flip = (torch.rand(num, generator=generator) < 0.5).tolist()
        return list(zip(shift_y, shift_x, flip))

    def apply(self, x_CHW: torch.Tensor, params: Params) -> torch.Tensor:
        return self.apply_batch(x_CHW[None], [params])[0]

    def apply_batch(self, x_BCHW: torch.Tensor, params: list[Params] | None) -> torch.Tensor:
        x_BCHW = _resize(x_BCHW, self.size)
        out = torch.zeros_like(x_BCHW)
        # Per-example slice copies: at 224x224 several times faster than one gather over the batch.
        for b, (dy, dx, flip) in enumerate(params):
            _shift_flip(x_BCHW[b], dy, dx, flip, out[b])
        return out


def random_crop_flip(x_BCHW: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """:class:`PadCropFlip` of a batch at its own size, drawing from ``generator``; returns a new tensor."""
    view = PadCropFlip(size=tuple(x_BCHW.shape[-2:]))
    return view.apply_batch(x_BCHW, view.draw(len(x_BCHW), generator))


NUM_TRIES = 10
"""Boxes torchvision's RandomResizedCrop tries before falling back to a centre crop."""


def random_resized_crop_box(
    height: int, width: int, params: Params, *, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of the crop: torchvision's ``RandomResizedCrop.make_params``, with the
    random numbers taken from ``params`` (uniforms in [0, 1), drawn before the image size is known)."""
    area_u, ratio_u, top_u, left_u, _ = params
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for a, r in zip(area_u, ratio_u, strict=True):
        target_area = height * width * (scale[0] + a * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + r * (log_hi - log_lo))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            # torch.randint(0, n) as a uniform in [0, 1): the same distribution.
            top = min(int(top_u * (height - h + 1)), height - h)
            left = min(int(left_u * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height  # no try fitted: the central crop of the closest allowed aspect
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class RandomResizedCropFlip(View):
    """torchvision's ``RandomResizedCrop(size)`` + ``RandomHorizontalFlip()`` of the stored image.

    A box of ``scale`` (8-100 %) of the image's area with an aspect ratio in ``ratio`` (3/4-4/3,
    log-uniform) at a uniform position, resized (bilinear, antialiased) to ``size``, then mirrored
    with p = 1/2. Params: 10 area and 10 aspect uniforms, 2 position uniforms and the flip.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    random: ClassVar[bool] = True

    def draw(self, num: int, generator: torch.Generator | None) -> list[Params]:
        area_u = torch.rand(num, NUM_TRIES, generator=generator, dtype=torch.float64).tolist()
        ratio_u = torch.rand(num, NUM_TRIES, generator=generator, dtype=torch.float64).tolist()
        where_u = torch.rand(num, 2, generator=generator, dtype=torch.float64).tolist()
        flip = (torch.rand(num, generator=generator) < 0.5).tolist()
        return [(a, r, w[0], w[1], f) for a, r, w, f in zip(area_u, ratio_u, where_u, flip)]

    def box(self, height: int, width: int, params: Params) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the crop of an ``height x width`` image."""
        return random_resized_crop_box(height, width, params, scale=self.scale, ratio=self.ratio)

    def apply(self, x_CHW: torch.Tensor, params: Params) -> torch.Tensor:
        out = torch.empty(x_CHW.shape[0], *self.size, dtype=x_CHW.dtype)
        self._into(x_CHW, params, out)
        return out

    def apply_batch(self, x_BCHW: torch.Tensor, params: list[Params] | None) -> torch.Tensor:
        out = torch.empty(len(x_BCHW), x_BCHW.shape[1], *self.size, dtype=x_BCHW.dtype)
        # One interpolation per example: each box has its own size. As fast per image as the
        # straight resize of a whole batch (docs/experiments.md has the timings).
        for b, p in enumerate(params):
            self._into(x_BCHW[b], p, out[b])
        return out

    def _into(self, x_CHW: torch.Tensor, params: Params, out_CHW: torch.Tensor) -> None:
        top, left, h, w = self.box(x_CHW.shape[-2], x_CHW.shape[-1], params)
        crop = _resize(x_CHW[None, :, top : top + h, left : left + w], self.size)[0]
        out_CHW.copy_(crop.flip(-1) if params[-1] else crop)


AUGMENT_CROPS = {"pad": PadCropFlip, "random_resized": RandomResizedCropFlip}
"""``data.augment_crop`` -> its view."""
assert set(AUGMENT_CROPS) == set(get_args(AugmentCrop)), "config.AugmentCrop and AUGMENT_CROPS must name the same crops"


def build_views(cfg: DataConfig, size: tuple[int, int] | None) -> tuple[View, View]:
    """The training and test loaders' views of images brought to ``size`` (``None``: not images).

    Training: ``data.augment_crop`` + flip with ``data.augment``, else a resize. Test (never
    random): resize + centre crop with ``data.test_crop_fraction`` < 1, else a resize.
    """
    if not cfg.augment:
        train = Resize(size)
    elif cfg.augment_crop in AUGMENT_CROPS:
        train = AUGMENT_CROPS[cfg.augment_crop](size)
    else:
        raise ValueError(
            f"data.augment_crop = {cfg.augment_crop!r} is not one of {', '.join(AUGMENT_CROPS)}; set e.g. "
            "data.augment_crop=pad"
        )
    return train, _test_view(cfg.test_crop_fraction, size)


def _test_view(fraction: float, size: tuple[int, int] | None) -> View:
    if fraction == 1:
        return Resize(size)
    if not 0 < fraction < 1:  # NaN included
        raise ValueError(
            f"data.test_crop_fraction = {fraction} must be in (0, 1]; set e.g. data.test_crop_fraction=0.875"
        )
    if size is None:
        raise ValueError(
            "data.test_crop_fraction crops images, but the examples are not images; set data.test_crop_fraction=1"
        )
    if size[0] != size[1]:
        # The short side's resize keeps each image's aspect, so a non-square crop may not fit.
        raise ValueError(
            f"data.test_crop_fraction = {fraction} needs square images, but they are resized to {size[0]}x{size[1]} "
            "(an image folder's first image); set data.image_size, or data.test_crop_fraction=1"
        )
    # floor(224 / 0.875) = 256; the small epsilon keeps exact quotients from rounding down by one.
    return ResizeCenterCrop(size, resize=math.floor(size[0] / fraction + 1e-6))
