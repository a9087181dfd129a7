"""Block lists for the paper's networks: ``mlp``, ``conv2`` (Table 3) and AlexNet with BN; and two
networks of equal blocks, so that layer-parallel stages can cost the same: ``vit`` and ``convdeep``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
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
    builders = {"mlp": _mlp, "conv2": _conv2, "alexnet": _alexnet, "alexnet_small": _alexnet_small,
                "vit": _vit, "convdeep": _convdeep}
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


# --------------------------------------------------------------------------- balanced networks
#
# Layer parallelism pays only when every stage costs the same (DESIGN.md §2, "Balance"). These two
# networks are an input block (patch embedding or stem convolution), ``model.depth`` identical
# blocks and a small head: ``depth + 2`` blocks, so that the equal blocks split evenly over a rank
# count dividing ``depth`` and the cheaper end blocks join the first and last stages.
# Why the input layer is a block of its own: in the earlier design block 0 held it *and* the first
# equal block, and under the direct rules (each block trained on its own, its input cut) that first
# block had to compute an input gradient for the input layer's weights; block 0's local update then
# cost ~2x the others' on convdeep and ~1.2x on vit, its forward ~1.3x, which unbalanced every
# partition. Now no block computes an input gradient under a direct rule (the input block's input
# is the image). Rough numbers (a busy 2-core CPU, one thread, batch 32, 28x28, default sizes, dkp,
# ``parallel_dkp.parallel.costs.measure_block_phases``; ms of forward / local update per block):
# earlier design, convdeep block 0 20 / 43 vs 12-13 / 16-18 for the others, vit 2.2 / 5.7 vs
# 1.3-1.6 / 3.1-4.0; now the stem 3.8 / 7.9 vs 11-12 / 14-16, the patch embedding 0.5 / 0.7 vs
# 1.7-1.8 / 4-7, the head below 1 ms. A stem with BN and ReLU still cost about half an equal block's
# update (its output, BN and ReLU are as large as a block's), so convdeep's stem is linear, like
# vit's patch embedding (and ConvNeXt's or ResNet-D's stems before their first normalised block):
# the next block's BN normalises what it makes. ``balanced_partition`` on measured costs, not a
# split by counts, is still what evens the stages.


class _SelfAttention(nn.Module):
    """Multi-head self-attention from plain ``nn.Linear`` layers (one for q, k, v, one for the output).

    Not ``nn.MultiheadAttention``: its input projection is a bare parameter, not an ``nn.Linear``,
    so FA/KP could not give it a feedback twin. ``[B, T, D] -> [B, T, D]``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        b, t, d = x_BTD.shape
        qkv = self.qkv(x_BTD).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out_BHTd = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out_BHTd.transpose(1, 2).reshape(b, t, d))


class _TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (MLP ratio 4, GELU),
    and with ``out_norm`` a LayerNorm of the block's output. ``[B, T, D] -> [B, T, D]``.

    Why ``out_norm`` (``model.batch_norm``, on by default): under a direct rule the block's input
    is cut and its signal ``s·B_j`` does not shrink as its output grows (the head normalises the
    tokens, so the error does not see their scale); the products inside the branches (the MLP's
    two layers, values and output projection) then grow exponentially. Measured on Fashion-MNIST
    (dim 64, depth 4, dkp, SGD lr 1e-2): without it the block outputs (and ∇B_j with them) grew
    ~2x every 5 steps and the loss went non-finite at step 48 of the first epoch; at lr 3e-3 they
    still grew ~9x in 15 steps, the loss stuck at 2.0. With it, the loss fell to 1.6 in 78 steps.
    Normalising the output bounds it, as BN does for the conv blocks.
    """

    def __init__(self, dim: int, heads: int, *, out_norm: bool, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.norm_out = nn.LayerNorm(dim) if out_norm else nn.Identity()

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD))
        return self.norm_out(x_BTD + self.mlp(self.norm2(x_BTD)))


class _PatchEmbedding(nn.Module):
    """Non-overlapping patches to tokens: ``Conv2d(C, D, patch, stride=patch)``, flattened, plus a
    learned position embedding (no class token; the head averages the tokens).
    ``[B, C, H, W] -> [B, (H/patch)·(W/patch), D]``."""

    def __init__(self, channels: int, dim: int, patch: int, num_tokens: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, num_tokens, dim), std=0.02))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        # contiguous: the transposed layout would otherwise carry on through every residual sum, and
        # torch.distributed.pipelining rejects a stage input whose strides differ from a fresh tensor's
        return self.proj(x_BCHW).flatten(2).transpose(1, 2).contiguous() + self.pos


class _MeanTokens(nn.Module):
    """``[B, T, D] -> [B, D]``: the average over tokens."""

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return x_BTD.mean(dim=1)


def _vit(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> list[BlockSpec]:
    """A small Vision Transformer of ``model.depth`` identical pre-norm blocks (width ``model.dim``,
    ``model.heads`` heads) on ``model.patch``-sided patches: ``depth + 2`` blocks.

    Block 0 (``embed``) is the patch embedding alone, blocks 1..depth (``attn1``..``attn{depth}``)
    one transformer block each, the output block LayerNorm, mean over tokens and ``Linear(dim, K)``.
    With ``model.batch_norm`` (the default) every transformer block also ends with a LayerNorm of
    its output, without which DFA/DKP diverge (see ``_TransformerBlock``).
    Every hidden block's output (the embedding's too) is ``[tokens, dim]``, so a direct rule's
    ``B_j`` is ``K × tokens·dim``. The only convolution is the patch embedding, so ``bp_fc_only``
    freezes just block 0 (and trains every transformer block). The image sides must be divisible
    by ``model.patch``; that is checked when block 0 is built, not here, so that the block count
    can be taken from any dummy input (``num_blocks``).
    """
    c, h, w = _image_shape(input_shape, "vit")
    if cfg.dim % cfg.heads:
        raise ValueError(
            f"vit: model.dim = {cfg.dim} is not divisible by model.heads = {cfg.heads}; set e.g. "
            f"model.heads={math.gcd(cfg.dim, cfg.heads)} or model.dim={cfg.heads * max(1, cfg.dim // cfg.heads)}"
        )

    def embedding() -> _PatchEmbedding:
        if h % cfg.patch or w % cfg.patch:
            fits = [p for p in range(2, min(h, w) // 2 + 1) if h % p == 0 and w % p == 0] or [1]
            raise ValueError(
                f"vit cuts {h}x{w} images into patches of side model.patch = {cfg.patch}, which does not divide "
                f"both sides; set model.patch to one of {fits}, or data.image_size to a multiple of it"
            )
        num_tokens = (h // cfg.patch) * (w // cfg.patch)
        return _PatchEmbedding(c, cfg.dim, cfg.patch, num_tokens)

    def transformer() -> _TransformerBlock:
        return _TransformerBlock(cfg.dim, cfg.heads, out_norm=cfg.batch_norm)

    return [
        BlockSpec("embed", embedding),
        *(BlockSpec(f"attn{i}", transformer) for i in range(1, cfg.depth + 1)),
        BlockSpec("out", lambda: nn.Sequential(nn.LayerNorm(cfg.dim), _MeanTokens(), nn.Linear(cfg.dim, num_classes))),
    ]


def _convdeep(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> list[BlockSpec]:
    """``model.depth`` equal conv blocks at the input's resolution: ``depth + 2`` blocks.

    Block 0 (``stem``) is a linear 3x3 conv C→width (padding 1) alone; blocks 1..depth
    (``conv1``..``conv{depth}``) are 3x3 conv width→width (padding 1), BN, ReLU each; the output
    block global average pooling and ``Linear(width, K)`` (the only pooling). Every hidden block's
    output (the stem's too) is ``[width, H, W]``, so a direct rule's ``B_j`` is ``K × width·H·W``.
    ``bp_fc_only`` freezes every convolution and BN here: only the output layer learns.
    """
    c, _, _ = _image_shape(input_shape, "convdeep")
    width, bn = cfg.width, cfg.batch_norm
    return [
        BlockSpec("stem", lambda: nn.Sequential(nn.Conv2d(c, width, 3, padding=1))),
        *(BlockSpec(f"conv{i}", lambda: _conv_block(width, width, kernel=3, padding=1, bn=bn))
          for i in range(1, cfg.depth + 1)),
        BlockSpec("out", lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))),
    ]


def _image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{model} needs image inputs (C, H, W), got shape {input_shape}; use model.name=mlp")
    return input_shape  # type: ignore[return-value]


def num_blocks(cfg: ModelConfig) -> int:
    """Number of blocks of model ``cfg``, hence the largest world size it can run on.

    The count does not depend on the data: the specs are built for a dummy input that every
    model accepts (224x224 RGB for ``alexnet``, 32x32 RGB otherwise) and never called, so no
    dataset is read and no parameter is allocated. (``vit`` checks that the image sides are
    divisible by ``model.patch`` only when its patch embedding is built, so the default patch 7
    counts its blocks on the 32x32 dummy too.) Raises ValueError for a model the config cannot
    build (e.g. ``mlp`` with no ``widths``, ``vit`` with ``model.dim`` not divisible by ``model.heads``).
    """
    dummy = (3, 224, 224) if cfg.name == "alexnet" else (3, 32, 32)
    return len(block_specs(cfg, input_shape=dummy, num_classes=10))
