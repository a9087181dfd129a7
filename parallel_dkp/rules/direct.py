"""Direct rules: DFA (Nøkland 2016), DKP (the paper) and DRTP (Frenkel et al. 2019).

Every hidden block ``j`` is wrapped in a :class:`DirectBlock` that cuts its input from the
graph and holds a dense feedback matrix ``B_j`` of shape ``[K, D_j]`` (``D_j`` = number of
elements of the block's output ``a_j``, after pooling). Its learning signal is ``g_j = s · B_j``
reshaped like ``a_j``, where ``s`` is the output error ``e = (softmax(h) - onehot(y)) / N``
(DFA, DKP) or the targets ``onehot(y) / N`` (DRTP). The DRTP authors' code divides neither
signal (its DFA's ``(y - labels)·B`` and DRTP's ``labels·B`` are both batch sums); ours divides
both, keeping their ratio and putting every rule on the scale of the mean loss that the shared
forward learning rate is set for. (Without the 1/N, one epoch of conv2 on 15 000 Fashion-MNIST
images ended at test loss 167.5 and 75.7 %, against 0.47 and 84.5 % with it.) The block then
backpropagates ``g_j`` inside itself only.

DKP also learns ``B_j``: ``∇B_j = e^T · a_j`` (paper eq. 7-8, weight decay from the feedback
optimizer), i.e. ``B_j^T`` is trained as a linear readout from ``a_j`` to the logits. For the
last hidden block this is exactly the gradient of the output layer's weight, so ``B_{L-1}``
follows ``W_L`` as in Kolen-Pollack learning (§2.4-2.5).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from parallel_dkp.models import module_device
from parallel_dkp.rules.base import DirectBlock, Feedback, LearningRule, feedback_seed

Hidden = list[tuple[DirectBlock, torch.Tensor]]
"""``(block, a_j)`` for each hidden block of a stage: the output still holds the block's graph."""


class DirectRule(LearningRule):
    """Common machinery of DFA, DKP and DRTP."""

    signal = "error"

    def prepare(self, blocks, *, indices: Sequence[int], num_blocks, out_shapes, num_classes, seed):
        wrapped = []
        for index, block in zip(indices, blocks):
            feedback = None
            if index < num_blocks - 1:  # the output block always receives the true error
                feedback = Feedback(
                    (num_classes, math.prod(out_shapes[index])), learned=self.learns_feedback,
                    init=self.feedback_init, seed=feedback_seed(seed, index), device=module_device(block),
                )
            wrapped.append(DirectBlock(block, feedback))
        return wrapped

    @staticmethod
    def forward(blocks: nn.ModuleList, x: torch.Tensor) -> tuple[torch.Tensor, Hidden]:
        """Chain with cut inputs; returns the stage output and the hidden blocks' outputs."""
        hidden: Hidden = []
        for block in blocks:
            x = block(x)
            if block.feedback is not None:
                hidden.append((block, x))
        return x, hidden

    def hidden_signal(self, *, error_BK: torch.Tensor | None, targets_BK: torch.Tensor) -> torch.Tensor:
        """What hidden blocks learn from: the output error ``e`` (DFA, DKP)."""
        assert error_BK is not None
        return error_BK

    def local_update(self, hidden: Hidden, signal_BK: torch.Tensor) -> None:
        """Each hidden block backpropagates ``signal_BK · B_j`` inside itself; DKP also
        accumulates ``∇B_j = signal^T a_j``."""
        for block, output in hidden:
            feedback_KD = block.feedback.weight
            with torch.no_grad():
                grad = (signal_BK @ feedback_KD).view_as(output)
            output.backward(grad)
            if self.learns_feedback:
                with torch.no_grad():
                    outputs_BD = output.detach().flatten(1)
                    if feedback_KD.grad is None:
                        feedback_KD.grad = signal_BK.T @ outputs_BD
                    else:  # accumulate in place: no K x D temporary per micro-batch
                        feedback_KD.grad.addmm_(signal_BK.T, outputs_BD)


class DFA(DirectRule):
    """Fixed random ``B_j``, output error projected to every hidden block."""

    name = "dfa"


class DKP(DirectRule):
    """DFA with ``B_j`` learned Kolen-Pollack style: ``∇B_j = e^T a_j`` plus weight decay."""

    name = "dkp"
    learns_feedback = True


class DRTP(DirectRule):
    """Targets instead of errors: hidden blocks can update right after their own forward."""

    name = "drtp"
    signal = "targets"

    def hidden_signal(self, *, error_BK: torch.Tensor | None, targets_BK: torch.Tensor) -> torch.Tensor:
        return targets_BK
