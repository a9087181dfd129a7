"""Feedback alignment (Lillicrap et al. 2016) and Kolen-Pollack learning (Akrout et al. 2019)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from parallel_dkp.rules.base import LearningRule, feedback_seed, init_feedback_
from parallel_dkp.rules.feedback_layers import FeedbackConv2d, FeedbackLinear, with_feedback


class FA(LearningRule):
    """Chain as in BP, but every layer's input gradient uses a fixed random ``B_j`` (shape of ``W_j``)."""

    name = "fa"

    def prepare(self, blocks, *, indices: Sequence[int], num_blocks, out_shapes, num_classes, seed):
        for index, block in zip(indices, blocks):
            for layer_number, (parent, child_name, child) in enumerate(_layers(block)):
                twin = with_feedback(child)
                init_feedback_(twin.feedback, method=self.feedback_init,
                               seed=feedback_seed(seed, index) + layer_number)
                twin.feedback.requires_grad_(self.learns_feedback)
                setattr(parent, child_name, twin)
        return nn.ParameterDict()


class KP(FA):
    """FA whose ``B_j`` receives the same update as ``W_j`` (paper eq. 6).

    With weight decay on both and the same optimizer settings, ``W_j - B_j`` shrinks by the
    factor ``(1 - lr·λ)`` every step (paper eq. 9-11), so ``B_j → W_j``.
    """

    name = "kp"
    learns_feedback = True

    def after_backward(self, blocks: nn.ModuleList) -> None:
        for module in blocks.modules():
            if isinstance(module, (FeedbackLinear, FeedbackConv2d)) and module.weight.grad is not None:
                module.feedback.grad = module.weight.grad.detach().clone()


def _layers(block: nn.Module):
    """(parent, attribute name, layer) for every Linear/Conv2d inside ``block``, in order."""
    found = []
    for parent in block.modules():
        for child_name, child in parent.named_children():
            if type(child) in (nn.Linear, nn.Conv2d):
                found.append((parent, child_name, child))
    return found
