"""Layers whose backward sends the error through a feedback matrix instead of the weights.

Used by FA and KP. The forward is the ordinary ``linear``/``conv2d``; the backward computes
the input gradient with ``B`` (same shape as ``W``) in place of ``W``, and the weight and bias
gradients exactly as backpropagation does. Each gradient is computed only when autograd asks
for it (``ctx.needs_input_grad``), so a block whose input is cut computes no input gradient.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

from parallel_dkp.rules.base import Feedback

_mode = threading.local()


@contextlib.contextmanager
def true_gradients():
    """Inside this block, feedback layers backpropagate with their own weight (plain BP), e.g. for
    a shadow backprop pass that measures how far the rule's updates are from the true gradient."""
    previous = getattr(_mode, "true", False)
    _mode.true = True
    try:
        yield
    finally:
        _mode.true = previous


def _backward_matrix(layer: nn.Module) -> torch.Tensor:
    return layer.weight if getattr(_mode, "true", False) else layer.feedback.weight


class FeedbackLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with ``dL/dx = dL/dy · B`` (B: ``[out, in]``, the shape of W)."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback):
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, feedback = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ feedback
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None


class FeedbackConv2dFunction(torch.autograd.Function):
    """``conv2d`` whose input gradient is the transposed convolution with ``B`` instead of ``W``."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, stride, padding, dilation, groups):
        ctx.save_for_backward(x, feedback)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, feedback = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        # The weight gradient does not depend on the weight, so a single call with B in the
        # weight slot gives the FA input gradient and the true weight/bias gradients.
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, feedback, [feedback.shape[0]] if ctx.has_bias else None,
            list(stride), list(padding), list(dilation), False, [0, 0], groups, mask,
        )
        return grad_x, grad_w, grad_b, None, None, None, None, None


class FeedbackLinear(nn.Linear):
    """``nn.Linear`` whose backward uses ``feedback.weight`` (shape of ``weight``) as ``B``."""

    feedback: Feedback

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FeedbackLinearFunction.apply(x, self.weight, self.bias, _backward_matrix(self))


class FeedbackConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose input gradient uses the kernel ``feedback.weight`` as ``B``."""

    feedback: Feedback

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FeedbackConv2dFunction.apply(
            x, self.weight, self.bias, _backward_matrix(self), self.stride, self.padding, self.dilation, self.groups
        )


def with_feedback(layer: nn.Module, feedback: Feedback) -> nn.Module:
    """A feedback twin of an ``nn.Linear``/``nn.Conv2d``: the same weight and bias, and ``feedback``
    (which must have the weight's shape) for the backward. No new tensor is allocated."""
    if tuple(feedback.weight.shape) != tuple(layer.weight.shape):
        raise ValueError(
            f"feedback of shape {tuple(feedback.weight.shape)} for a weight of shape {tuple(layer.weight.shape)}"
        )
    # The twin is built on the meta device (nothing allocated), then takes the layer's tensors.
    if isinstance(layer, nn.Linear):
        twin = FeedbackLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    elif isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError("FA/KP support convolutions with numeric zero padding only")
        twin = FeedbackConv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None, device="meta",
        )
    else:
        raise TypeError(f"no feedback version of {type(layer).__name__}")
    twin.weight = layer.weight
    twin.bias = layer.bias
    twin.feedback = feedback
    return twin
