"""The learning-rule protocol, and the one way feedback matrices are stored.

A rule never sees ranks. It is one object that owns three things:

* **its feedback**: ``prepare`` adapts a stage's blocks in place and creates every feedback
  matrix as a :class:`Feedback` module *inside the block or layer it feeds* (FA/KP: in each
  layer's feedback twin; DFA/DKP/DRTP: in a :class:`DirectBlock` around each hidden block).
  Feedback is found by type (``isinstance(m, Feedback)``), never by attribute name;
* **its signal**: ``signal`` says what hidden blocks learn from - ``"chain"`` (an ordinary
  backward through all later blocks), ``"error"`` (the output error ``e``, broadcast from the
  last stage) or ``"targets"`` (the one-hot labels, known before the forward pass). The
  schedules (``parallel/schedules.py``) pick the step strategy from it;
* **its local update**: ``after_backward`` for chained rules (KP copies ``∇W`` to ``B``);
  ``forward`` / ``local_update`` for direct rules (``DirectRule``).

Adding a rule means one new class in one file of this package, registered in ``RULES``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, Sequence

import torch
from torch import nn

from parallel_dkp.models import seed_for

Signal = Literal["chain", "error", "targets"]
FeedbackInit = Literal["kaiming_uniform", "kaiming_normal", "like_weight"]


class Feedback(nn.Module):
    """One feedback matrix ``B`` (``weight``), stored next to what it feeds.

    Fixed feedback (FA, DFA, DRTP) does not require grad; learned feedback (KP, DKP) does, and
    is trained by the feedback optimizer. ``B`` is initialised on the CPU from its own seed and
    then moved to ``device``, so a GPU run starts from exactly the CPU run's feedback.
    """

    def __init__(
        self, shape: Sequence[int], *, learned: bool, init: FeedbackInit, seed: int, device: torch.device
    ) -> None:
        super().__init__()
        matrix = init_feedback_(torch.empty(*shape), method=init, seed=seed)
        self.weight = nn.Parameter(matrix.to(device), requires_grad=learned)

    @property
    def learned(self) -> bool:
        return self.weight.requires_grad

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, learned={self.learned}"


class DirectBlock(nn.Module):
    """A block trained on its own: its input is cut from the graph (so no input gradient is ever
    computed), and a hidden block carries its direct feedback ``B_j`` (``[K, D_j]``, ``D_j`` the
    size of the block's output). The output block has ``feedback = None``."""

    def __init__(self, block: nn.Module, feedback: Feedback | None) -> None:
        super().__init__()
        self.block = block
        self.feedback = feedback

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.detach())


class LearningRule:
    """Base class: plain backpropagation semantics, no feedback matrices."""

    name: ClassVar[str]
    signal: ClassVar[Signal] = "chain"
    learns_feedback: ClassVar[bool] = False

    def __init__(self, *, feedback_init: FeedbackInit = "kaiming_uniform") -> None:
        self.feedback_init = feedback_init

    @property
    def backward_unlocked(self) -> bool:
        """True when hidden blocks learn from a direct signal, each block on its own."""
        return self.signal != "chain"

    def prepare(
        self,
        blocks: list[nn.Module],
        *,
        indices: Sequence[int],
        num_blocks: int,
        out_shapes: Sequence[tuple[int, ...]],
        num_classes: int,
        seed: int,
    ) -> list[nn.Module]:
        """Adapt ``blocks`` (global indices ``indices`` of ``num_blocks``) for this rule.

        Returns the blocks the stage holds (the same objects, or wrappers around them).
        ``out_shapes[i]`` is the per-example output shape of global block ``i``. Feedback is
        created on the device of the module it feeds.
        """
        return blocks

    def after_backward(self, blocks: nn.Module) -> None:
        """Chained rules: called once per step after all gradients are accumulated."""


def init_feedback_(tensor: torch.Tensor, *, method: str, seed: int) -> torch.Tensor:
    """Initialise a feedback matrix in place from its own seed.

    The matrix is treated like an ``nn.Linear``/``nn.Conv2d`` weight ``[out, in, ...]`` (fan-in =
    ``in × kernel``). ``kaiming_uniform``/``kaiming_normal`` (the paper, §3.1, and the authors'
    code: gain √2, so B's spread is about 2.45× that of the weight it stands in for) or
    ``like_weight``: torch's default for the forward layer (``kaiming_uniform_(a=√5)``, i.e.
    U(±1/√fan_in)), so that FA/KP's chained error keeps BP's scale instead of growing ~2.45× per
    layer.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            if method == "kaiming_uniform":
                nn.init.kaiming_uniform_(tensor, nonlinearity="relu")
            elif method == "kaiming_normal":
                nn.init.kaiming_normal_(tensor, nonlinearity="relu")
            elif method == "like_weight":
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
            else:
                raise ValueError(
                    f"rule.feedback_init = {method!r} is not kaiming_uniform, kaiming_normal or like_weight"
                )
    return tensor


def feedback_seed(seed: int, index: int) -> int:
    return seed_for(seed, index, salt=1)


def forward_parameters(blocks: nn.Module) -> list[nn.Parameter]:
    """Forward parameters that are trained: every parameter that requires grad outside a
    :class:`Feedback` (a rule freezes a layer by turning its ``requires_grad`` off)."""
    in_feedback = {id(p) for m in blocks.modules() if isinstance(m, Feedback) for p in m.parameters()}
    return [p for p in blocks.parameters() if p.requires_grad and id(p) not in in_feedback]


def feedback_parameters(blocks: nn.Module) -> list[nn.Parameter]:
    """Learned feedback matrices (KP's per-layer ``B``, DKP's ``B_j``), found by type."""
    return [m.weight for m in blocks.modules() if isinstance(m, Feedback) and m.learned]
