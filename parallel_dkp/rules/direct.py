"""Direct rules: DFA (Nøkland 2016), DKP (the paper) and DRTP (Frenkel et al. 2019).

Every hidden block ``j`` has a dense feedback matrix ``B_j`` of shape ``[K, D_j]``
(``D_j`` = number of elements of the block's output ``a_j``, after pooling). Its learning
signal is ``g_j = s · B_j`` reshaped like ``a_j``, where ``s`` is the output error
``e = (softmax(h) - onehot(y)) / N`` (DFA, DKP) or the targets ``onehot(y) / N`` (DRTP; the
same ``1/N`` as ``e`` so that learning rates are comparable). The block then backpropagates
``g_j`` inside itself only: its input was cut from the graph, so no input gradient exists.

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

from parallel_dkp.rules.base import LearningRule, feedback_seed, init_feedback_


class DirectRule(LearningRule):
    """Common machinery of DFA, DKP and DRTP."""

    signal = "error"

    def prepare(self, blocks, *, indices: Sequence[int], num_blocks, out_shapes, num_classes, seed):
        feedback = nn.ParameterDict()
        for index, block in zip(indices, blocks):
            if index == num_blocks - 1:
                continue  # the output block always receives the true error
            device = next(block.parameters()).device
            matrix = torch.empty(num_classes, math.prod(out_shapes[index]), device=device)
            init_feedback_(matrix, method=self.feedback_init, seed=feedback_seed(seed, index))
            feedback[str(index)] = nn.Parameter(matrix, requires_grad=self.learns_feedback)
        return feedback

    def hidden_backward(self, output: torch.Tensor, signal_BK: torch.Tensor, feedback_KD: torch.Tensor) -> None:
        """Backpropagate ``signal_BK · B_j`` through one block; accumulate ``∇B_j`` if learned.

        ``output`` is the block's output ``a_j`` (``[N, *shape]``, still attached to the
        block's own graph); ``signal_BK`` is ``[N, K]``; ``feedback_KD`` is ``B_j``.
        """
        with torch.no_grad():
            grad = (signal_BK @ feedback_KD).view_as(output)
        output.backward(grad)
        if self.learns_feedback:
            with torch.no_grad():
                grad_B = signal_BK.T @ output.detach().flatten(1)
                if feedback_KD.grad is None:
                    feedback_KD.grad = grad_B
                else:
                    feedback_KD.grad += grad_B


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
