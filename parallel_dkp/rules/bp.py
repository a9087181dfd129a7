"""Backpropagation, and the paper's "BP (FC only)" baseline with frozen convolutions."""

from __future__ import annotations

from torch import nn

from parallel_dkp.rules.base import LearningRule


class BP(LearningRule):
    """True gradients chained through every block."""

    name = "bp"


class BPFCOnly(BP):
    """BP with every convolution (and its BatchNorm) frozen: only FC layers learn.

    Frozen parameters stop requiring grad, so autograd never computes their gradients nor any
    input gradient below the first trained layer: a step costs the forward pass plus the FC
    layers' backward. Frozen BatchNorm layers keep their affine parameters but still normalise
    with batch statistics in training and update their running statistics, like every other
    rule's BN (the paper is silent; this way the FC layers see features normalised exactly as
    in the other rules, so the baseline differs from them only in what is trained).
    """

    name = "bp_fc_only"

    def prepare(self, blocks, *, indices, num_blocks, out_shapes, num_classes, seed):
        for block in blocks:
            for module in block.modules():
                if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                    module.requires_grad_(False)
        return blocks
