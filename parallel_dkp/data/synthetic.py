"""Deterministic, learnable random data for tests and smoke runs.

Each class has a fixed random mean ("prototype"); an example is its class's prototype plus
unit Gaussian noise, so a classifier can learn it quickly and a smoke test can see the loss
fall. Everything comes from a private generator with a fixed seed: the same config gives
the same data in every process, whatever the global RNG state.
"""

from __future__ import annotations

import torch

from parallel_dkp.config import DataConfig
from parallel_dkp.data.common import DatasetInfo, TensorImageDataset, check_limit, served_shape, target_size

SEED = 20240229
NOISE_STD = 1.0


def make_synthetic(
    *, num_train: int, num_test: int, shape: tuple[int, ...], num_classes: int, seed: int = SEED
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((x_train [N, *shape], y_train [N]), (x_test [M, *shape], y_test [M]))``, float32 / int64.

    Labels are balanced (each class within one example of ``N / num_classes``) and shuffled.
    """
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, *shape, generator=generator)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randperm(n, generator=generator) % num_classes
        x = prototypes[y] + NOISE_STD * torch.randn(n, *shape, generator=generator)
        return x, y

    return draw(num_train), draw(num_test)


def load_synthetic(cfg: DataConfig) -> tuple[TensorImageDataset, TensorImageDataset, DatasetInfo]:
    """``cfg.synthetic_size`` training and a quarter as many test examples of ``cfg.synthetic_shape``."""
    shape = tuple(cfg.synthetic_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"data.synthetic_shape must be positive sizes like [1, 28, 28] or [64], got {list(shape)}")
    if cfg.synthetic_classes < 2:
        raise ValueError(f"data.synthetic_classes must be >= 2, got {cfg.synthetic_classes}")
    if cfg.synthetic_size < 1:
        raise ValueError(f"data.synthetic_size must be >= 1, got {cfg.synthetic_size}")
    size = target_size(cfg.image_size)
    if size is not None and len(shape) != 3:
        raise ValueError(
            f"data.image_size = {cfg.image_size} resizes images, but data.synthetic_shape "
            f"{list(shape)} is not (C, H, W); set data.image_size=0"
        )
    (x_train, y_train), (x_test, y_test) = make_synthetic(
        num_train=cfg.synthetic_size,
        num_test=max(1, cfg.synthetic_size // 4),
        shape=shape,
        num_classes=cfg.synthetic_classes,
    )
    train = TensorImageDataset(x_train, y_train).head(check_limit("train_limit", cfg.train_limit))
    test = TensorImageDataset(x_test, y_test).head(check_limit("test_limit", cfg.test_limit))
    return train, test, DatasetInfo("synthetic", cfg.synthetic_classes, served_shape(shape, size))
