"""Feedback alignment (Lillicrap et al. 2016) and Kolen-Pollack learning (Akrout et al. 2019)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from parallel_dkp.rules.base import Feedback, LearningRule, feedback_seed
from parallel_dkp.rules.feedback_layers import FeedbackConv2d, FeedbackLinear, with_feedback


class FA(LearningRule):
    """Chain as in BP, but every layer's input gradient uses a fixed random ``B`` (shape of ``W``)."""

    name = "fa"

    def prepare(self, blocks, *, indices: Sequence[int], num_blocks, out_shapes, num_classes, seed):
        for index, block in zip(indices, blocks):
            for layer_number, (parent, child_name, child) in enumerate(_layers(block)):
                feedback = Feedback(
                    child.weight.shape, learned=self.learns_feedback, init=self.feedback_init,
                    seed=feedback_seed(seed, index) + layer_number, device=child.weight.device,
                )
                setattr(parent, child_name, with_feedback(child, feedback))
        return blocks


class KP(FA):
    """FA whose ``B`` receives the same update as ``W`` (paper eq. 6).

    With weight decay on both and the same optimizer settings, ``W - B`` shrinks by the
    factor ``(1 - lr·λ)`` every step (paper eq. 9-11), so ``B → W``.
    """

    name = "kp"
    learns_feedback = True

    def after_backward(self, blocks: nn.Module) -> None:
        for module in blocks.modules():
            if isinstance(module, (FeedbackLinear, FeedbackConv2d)) and module.weight.grad is not None:
                module.feedback.weight.grad = module.weight.grad.detach().clone()


def _layers(block: nn.Module):
    """(parent, attribute name, layer) for every Linear/Conv2d inside ``block``, in order."""
    found = []
    for parent in block.modules():
        for child_name, child in parent.named_children():
            if type(child) in (nn.Linear, nn.Conv2d):
                found.append((parent, child_name, child))
    return found
