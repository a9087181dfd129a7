"""The learning-rule protocol shared by the single-process trainer and the layer-parallel runtime.

A rule never sees ranks. It is told, per block, what to do:

* ``prepare`` adapts a stage's blocks in place (e.g. swaps in layers whose backward uses a
  feedback matrix) and creates the direct feedback matrices ``B_j`` of its hidden blocks;
* serial rules (``signal == "chain"``) are then trained by an ordinary backward through the
  chain of blocks, followed by ``after_backward`` (KP copies the weight gradient to ``B``);
* direct rules cut every block's input from the graph and, for each hidden block, call
  ``hidden_backward(output, signal, B_j)`` with the output error ``e`` (``signal ==
  "error"``) or the scaled one-hot targets (``signal == "targets"``).
"""

from __future__ import annotations

from typing import ClassVar, Iterator, Literal, Sequence

import torch
from torch import nn

from parallel_dkp.models import seed_for

Signal = Literal["chain", "error", "targets"]


class LearningRule:
    """Base class: plain backpropagation semantics, no feedback matrices."""

    name: ClassVar[str]
    signal: ClassVar[Signal] = "chain"
    learns_feedback: ClassVar[bool] = False

    def __init__(self, *, feedback_init: str = "kaiming_uniform") -> None:
        self.feedback_init = feedback_init

    @property
    def backward_unlocked(self) -> bool:
        """True when hidden blocks learn from a direct signal, each block on its own."""
        return self.signal != "chain"

    def prepare(
        self,
        blocks: nn.ModuleList,
        *,
        indices: Sequence[int],
        num_blocks: int,
        out_shapes: Sequence[tuple[int, ...]],
        num_classes: int,
        seed: int,
    ) -> nn.ParameterDict:
        """Adapt ``blocks`` (global indices ``indices``) in place; return direct feedback matrices.

        ``out_shapes[i]`` is the per-example output shape of global block ``i``. The returned
        dict maps ``str(global index)`` to ``B_j`` of shape ``[K, prod(out_shapes[j])]``.
        """
        return nn.ParameterDict()

    def trainable(self, module: nn.Module) -> bool:
        """Whether the forward parameters directly owned by ``module`` are trained."""
        return True

    def after_backward(self, blocks: nn.ModuleList) -> None:
        """Called once per step after all gradients are accumulated, before the optimizer."""

    def hidden_backward(self, output: torch.Tensor, signal_BK: torch.Tensor, feedback_KD: torch.Tensor) -> None:
        """Local update of one hidden block of a direct rule (see ``DirectRule``)."""
        raise TypeError(f"rule {self.name!r} trains by backpropagating through the chain of blocks")


def init_feedback_(tensor: torch.Tensor, *, method: str, seed: int) -> torch.Tensor:
    """Kaiming-initialise a feedback matrix in place from its own seed (paper §3.1).

    The matrix is treated like an ``nn.Linear`` weight ``[out, in]`` (fan-in = ``in``).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            if method == "kaiming_uniform":
                nn.init.kaiming_uniform_(tensor, nonlinearity="relu")
            elif method == "kaiming_normal":
                nn.init.kaiming_normal_(tensor, nonlinearity="relu")
            else:
                raise ValueError(f"rule.feedback_init = {method!r} is not kaiming_uniform or kaiming_normal")
    return tensor


def feedback_seed(seed: int, index: int) -> int:
    return seed_for(seed, index, salt=1)


def named_trainable(rule: LearningRule, blocks: nn.Module) -> Iterator[nn.Parameter]:
    """Forward parameters the rule trains (feedback matrices excluded)."""
    for module in blocks.modules():
        if not rule.trainable(module):
            continue
        for name, param in module.named_parameters(recurse=False):
            if name != "feedback":
                yield param
