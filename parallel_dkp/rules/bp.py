"""Backpropagation, and the paper's "BP (FC only)" baseline with frozen convolutions."""

from __future__ import annotations

from torch import nn

from parallel_dkp.rules.base import LearningRule


class BP(LearningRule):
    """True gradients chained through every block."""

    name = "bp"


class BPFCOnly(BP):
    """BP with every convolution (and its BatchNorm) frozen: only FC layers learn.

    Frozen parameters are simply left out of the optimizer; anything that trains no better
    than this baseline is not training its convolutions (paper §3.2).
    """

    name = "bp_fc_only"

    def trainable(self, module: nn.Module) -> bool:
        return not isinstance(module, (nn.Conv2d, nn.BatchNorm2d))
