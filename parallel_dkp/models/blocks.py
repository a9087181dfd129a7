"""Block lists for the paper's networks: ``mlp``, ``conv2`` (Table 3) and AlexNet with BN."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from parallel_dkp.config import ModelConfig

BlockFactory = Callable[[], nn.Module]


@dataclass(frozen=True)
class BlockSpec:
    """How to build one block; ``factory`` is called under the block's own seed."""

    name: str
    factory: BlockFactory


def seed_for(seed: int, index: int, salt: int = 0) -> int:
    """Seed of block ``index`` (salt 0: parameters, 1: feedback). Independent of any rank."""
    return (seed * 1_000_003 + index * 7_919 + salt * 104_729) % (2**62)


def build_blocks(
    cfg: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int, seed: int
) -> nn.ModuleList:
    """Build the whole network; block ``i`` is initialised from ``seed_for(seed, i)``.

    Any partition of the list across ranks therefore starts from the same network.
    """
    specs = block_specs(cfg, input_shape=input_shape, num_classes=num_classes)
    blocks = []
    for index, spec in enumerate(specs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for(seed, index))
            blocks.append(spec.factory())
    return nn.ModuleList(blocks)


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (CPU for a module with neither)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def block_output_shapes(blocks: nn.ModuleList, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-example output shape of every block (one dummy example, eval mode, no state change).

    Runs where the blocks are (a ``meta`` network gives its shapes without computing anything).
    """
    was_training = [b.training for b in blocks]
    shapes = []
    x = torch.zeros(2, *input_shape)
    try:
        for block in blocks:
            block.eval()
            x = block(x.to(module_device(block)))
            shapes.append(tuple(x.shape[1:]))
    finally:
        for block, mode in zip(blocks, was_training):
            block.train(mode)
    return shapes


def block_specs(cfg: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int) -> list[BlockSpec]:
    builders = {"mlp": _mlp, "conv2": _conv2, "alexnet": _alexnet, "alexnet_small": _alexnet_small}
    if cfg.name not in builders:
        raise ValueError(f"model.name = {cfg.name!r} is not one of {', '.join(builders)}")
    return builders[cfg.name](cfg, input_shape, num_classes)


# --------------------------------------------------------------------------- helpers


def _norm(kind: str, channels: int, enabled: bool) -> nn.Module:
    if not enabled:
        return nn.Identity()
    return nn.BatchNorm2d(channels) if kind == "conv" else nn.BatchNorm1d(channels)


def _conv_block(c_in: int, c_out: int, *, kernel: int, stride: int = 1, padding: int = 0,
                pool: int = 0, pool_stride: int = 0, bn: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding),
        _norm("conv", c_out, bn),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(pool, stride=pool_stride or pool))
    return nn.Sequential(*layers)


def _fc_block(d_in: int, d_out: int, *, bn: bool, pre: tuple[nn.Module, ...] = ()) -> nn.Sequential:
    return nn.Sequential(*pre, nn.Linear(d_in, d_out), _norm("fc", d_out, bn), nn.ReLU())


def _dropout(cfg: ModelConfig) -> tuple[nn.Module, ...]:
    """AlexNet's dropout before each hidden FC layer, as torchvision's and the authors' code have it."""
    return (nn.Dropout(cfg.dropout),) if cfg.dropout > 0 else ()


def _output_block(d_in: int, num_classes: int, *, flatten: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    return nn.Sequential(*layers, nn.Linear(d_in, num_classes))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------- networks


def _mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> list[BlockSpec]:
    """Fully connected: Linear, BN, ReLU per hidden layer (the paper's Fig. 2 network)."""
    if not cfg.widths:
        raise ValueError("model.widths must list at least one hidden width for mlp, e.g. [256, 256]")
    dims = [_numel(input_shape), *cfg.widths]
    specs = [
        BlockSpec(f"fc{i}", lambda d_in=d_in, d_out=d_out, first=i == 0: _fc_block(
            d_in, d_out, bn=cfg.batch_norm, pre=(nn.Flatten(),) if first else ()))
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:]))
    ]
    specs.append(BlockSpec("out", lambda: _output_block(dims[-1], num_classes, flatten=len(dims) == 1)))
    return specs


def _conv2(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> list[BlockSpec]:
    """The paper's Table 3: two 3x3 convs (32 channels), max-pool, Linear(., 128), Linear(128, K).

    The first linear layer is sized from the input and ``model.conv_padding``: 32·14·14 = 6272
    (Table 3) for 28x28 images with padding 1 and for 32x32 images with padding 0.
    """
    c, h, w = _image_shape(input_shape, "conv2")
    pad = cfg.conv_padding
    side_h, side_w = h + 2 * (2 * pad - 2), w + 2 * (2 * pad - 2)  # after two 3x3 convolutions
    if min(side_h, side_w) < 2:
        raise ValueError(
            f"conv2 with model.conv_padding={pad} shrinks {h}x{w} inputs to {side_h}x{side_w}, too small to "
            "pool; use larger images or model.conv_padding=1"
        )
    flat = 32 * (side_h // 2) * (side_w // 2)
    bn = cfg.batch_norm
    return [
        BlockSpec("conv0", lambda: _conv_block(c, 32, kernel=3, padding=pad, bn=bn)),
        BlockSpec("conv1", lambda: _conv_block(32, 32, kernel=3, padding=pad, bn=bn)),
        BlockSpec("fc2", lambda: _fc_block(flat, 128, bn=bn, pre=(nn.MaxPool2d(2), nn.Flatten()))),
        BlockSpec("out", lambda: _output_block(128, num_classes)),
    ]


def _alexnet(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> list[BlockSpec]:
    """AlexNet (torchvision's channel widths) with BN before every hidden ReLU, 224x224 inputs.

    Five conv blocks and two 4096-wide FC blocks, with ``model.dropout`` before each of the two
    (the authors' code: 0.5; the paper mentions only BN).
    """
    c, h, w = _image_shape(input_shape, "alexnet")
    if (h, w) != (224, 224):
        raise ValueError(
            f"alexnet expects 224x224 inputs, got {h}x{w}; set data.image_size=224 "
            "or use model.name=alexnet_small for 32x32/64x64 images"
        )
    bn = cfg.batch_norm
    return [
        BlockSpec("conv0", lambda: _conv_block(c, 64, kernel=11, stride=4, padding=2, pool=3, pool_stride=2, bn=bn)),
        BlockSpec("conv1", lambda: _conv_block(64, 192, kernel=5, padding=2, pool=3, pool_stride=2, bn=bn)),
        BlockSpec("conv2", lambda: _conv_block(192, 384, kernel=3, padding=1, bn=bn)),
        BlockSpec("conv3", lambda: _conv_block(384, 256, kernel=3, padding=1, bn=bn)),
        BlockSpec("conv4", lambda: _conv_block(256, 256, kernel=3, padding=1, pool=3, pool_stride=2, bn=bn)),
        BlockSpec("fc5", lambda: _fc_block(256 * 6 * 6, 4096, bn=bn, pre=(nn.Flatten(), *_dropout(cfg)))),
        BlockSpec("fc6", lambda: _fc_block(4096, 4096, bn=bn, pre=_dropout(cfg))),
        BlockSpec("out", lambda: _output_block(4096, num_classes)),
    ]


def _alexnet_small(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> list[BlockSpec]:
    """AlexNet layout for small images (32x32 CIFAR, 64x64 Tiny ImageNet): 3x3 convs, three
    2x2 max-pools, FC widths 1024. Not the paper's network; a cheaper stand-in of the same shape."""
    c, h, w = _image_shape(input_shape, "alexnet_small")
    if h % 8 or w % 8:
        raise ValueError(f"alexnet_small needs image sides divisible by 8, got {h}x{w}")
    flat = 256 * (h // 8) * (w // 8)
    bn = cfg.batch_norm
    return [
        BlockSpec("conv0", lambda: _conv_block(c, 64, kernel=3, padding=1, pool=2, bn=bn)),
        BlockSpec("conv1", lambda: _conv_block(64, 192, kernel=3, padding=1, pool=2, bn=bn)),
        BlockSpec("conv2", lambda: _conv_block(192, 384, kernel=3, padding=1, bn=bn)),
        BlockSpec("conv3", lambda: _conv_block(384, 256, kernel=3, padding=1, bn=bn)),
        BlockSpec("conv4", lambda: _conv_block(256, 256, kernel=3, padding=1, pool=2, bn=bn)),
        BlockSpec("fc5", lambda: _fc_block(flat, 1024, bn=bn, pre=(nn.Flatten(), *_dropout(cfg)))),
        BlockSpec("fc6", lambda: _fc_block(1024, 1024, bn=bn, pre=_dropout(cfg))),
        BlockSpec("out", lambda: _output_block(1024, num_classes)),
    ]


def _image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{model} needs image inputs (C, H, W), got shape {input_shape}; use model.name=mlp")
    return input_shape  # type: ignore[return-value]


def num_blocks(cfg: ModelConfig) -> int:
    """Number of blocks of model ``cfg``, hence the largest world size it can run on.

    The count does not depend on the data: the specs are built for a dummy input that every
    model accepts (224x224 RGB for ``alexnet``, 32x32 RGB otherwise) and never called, so no
    dataset is read and no parameter is allocated. Raises ValueError for a model the config
    cannot build (e.g. ``mlp`` with no ``widths``).
    """
    dummy = (3, 224, 224) if cfg.name == "alexnet" else (3, 32, 32)
    return len(block_specs(cfg, input_shape=dummy, num_classes=10))
