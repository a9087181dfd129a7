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
        """Each hidden block backpropagates ``signal_BK · B_j`` inside itself (the stage's blocks
        in one call of the autograd engine: their inputs are cut, so their graphs are apart);
        DKP also accumulates ``∇B_j = signal^T a_j``."""
        if not hidden:
            return
        orders = [_storage_order(output) for _, output in hidden]
        with torch.no_grad():
            # B's columns follow the logical (C, H, W) order of a_j; with channels-last
            # activations both products run in storage order, so that neither the B x D
            # signal nor a_j is copied into another layout (only B, K x D, is permuted, and
            # that copy is kept until B changes: once a step for DKP, once a run for DFA).
            grads = [order.unflatten(signal_BK @ order.columns(block.feedback))
                     for (block, _), order in zip(hidden, orders)]
        torch.autograd.backward([output for _, output in hidden], grads)
        if not self.learns_feedback:
            return
        for (block, output), order in zip(hidden, orders):
            feedback_KD = block.feedback.weight
            with torch.no_grad():
                outputs_BS = order.flatten(output.detach())
                if feedback_KD.grad is None:
                    feedback_KD.grad = order.to_logical(signal_BK.T @ outputs_BS).contiguous()
                elif order.logical:
                    feedback_KD.grad.addmm_(signal_BK.T, outputs_BS)  # in place, no K x D temporary
                else:  # added through a permuted view: no K x D copy into the logical order
                    order.add_logical_(feedback_KD.grad, signal_BK.T @ outputs_BS)


class _Logical:
    """A tensor stored in its logical order: flattening is a view."""

    logical = True

    def __init__(self, output: torch.Tensor) -> None:
        self.shape = output.shape

    def columns(self, feedback: Feedback) -> torch.Tensor:
        """``B`` with its columns in the storage order of ``a_j``."""
        return feedback.weight

    def flatten(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.flatten(1)

    def unflatten(self, flat_BD: torch.Tensor) -> torch.Tensor:
        return flat_BD.view(self.shape)

    def to_logical(self, matrix_KD: torch.Tensor) -> torch.Tensor:
        return matrix_KD


class _ChannelsLast(_Logical):
    """A ``[B, C, H, W]`` tensor stored as ``[B, H, W, C]``: columns are taken in (H, W, C) order."""

    logical = False

    def columns(self, feedback: Feedback) -> torch.Tensor:
        """A copy of ``B`` in (H, W, C) column order, made again only when ``B`` has changed
        (an optimizer step or a load bumps its version; a move gives it new storage)."""
        weight = feedback.weight
        key = (weight._version, weight.data_ptr(), self.shape[1:])
        cached = getattr(feedback, "_storage_columns", None)
        if cached is None or cached[0] != key:
            _, c, h, w = self.shape
            cached = (key, weight.detach().view(-1, c, h, w).permute(0, 2, 3, 1).reshape(len(weight), -1))
            feedback._storage_columns = cached  # a plain attribute: not state, not moved with the module
        return cached[1]

    def flatten(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.permute(0, 2, 3, 1).reshape(len(tensor), -1)  # a view: the storage order

    def unflatten(self, flat_BS: torch.Tensor) -> torch.Tensor:
        b, c, h, w = self.shape
        return flat_BS.view(b, h, w, c).permute(0, 3, 1, 2)  # channels-last, no copy

    def to_logical(self, matrix_KS: torch.Tensor) -> torch.Tensor:
        _, c, h, w = self.shape
        return matrix_KS.view(-1, h, w, c).permute(0, 3, 1, 2).reshape(len(matrix_KS), -1)

    def add_logical_(self, logical_KD: torch.Tensor, matrix_KS: torch.Tensor) -> None:
        """``logical_KD += matrix_KS`` taken back into the logical order, without a copy."""
        _, c, h, w = self.shape
        logical_KD.view(-1, c, h, w).add_(matrix_KS.view(-1, h, w, c).permute(0, 3, 1, 2))


def _storage_order(output: torch.Tensor) -> _Logical:
    if output.dim() == 4 and not output.is_contiguous() and output.is_contiguous(memory_format=torch.channels_last):
        return _ChannelsLast(output)
    return _Logical(output)


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
