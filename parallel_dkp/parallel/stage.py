"""A stage: the contiguous blocks one rank owns, adapted for the learning rule."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from parallel_dkp.rules import LearningRule
from parallel_dkp.rules.base import named_trainable


class Stage(nn.Module):
    """Blocks ``indices`` (global, contiguous) of an ``num_blocks``-block network.

    ``forward`` is the plain chain (evaluation, and the serial rules' backward pipeline).
    ``forward_unlocked`` is the direct rules' forward: every block's input is cut from the
    graph, and the outputs of hidden blocks are returned for their local updates.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        *,
        indices: range,
        num_blocks: int,
        rule: LearningRule,
        out_shapes: Sequence[tuple[int, ...]],
        num_classes: int,
        seed: int,
    ) -> None:
        super().__init__()
        if len(blocks) != len(indices):
            raise ValueError(f"{len(blocks)} blocks for indices {indices}")
        self.blocks = nn.ModuleList(blocks)
        self.indices = indices
        self.num_blocks = num_blocks
        self.rule = rule
        self.feedback = rule.prepare(
            self.blocks, indices=indices, num_blocks=num_blocks,
            out_shapes=out_shapes, num_classes=num_classes, seed=seed,
        )

    @property
    def is_first(self) -> bool:
        return self.indices.start == 0

    @property
    def is_last(self) -> bool:
        return self.indices.stop == self.num_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def forward_unlocked(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """Chain with cut inputs. Returns the stage output and ``(global index, a_j)`` of hidden blocks."""
        hidden = []
        for index, block in zip(self.indices, self.blocks):
            x = block(x.detach())
            if index < self.num_blocks - 1:
                hidden.append((index, x))
        return x, hidden

    def local_update(self, hidden: list[tuple[int, torch.Tensor]], signal_BK: torch.Tensor) -> None:
        """Each hidden block of a direct rule learns from ``signal_BK · B_j``, on its own."""
        for index, output in hidden:
            self.rule.hidden_backward(output, signal_BK, self.feedback[str(index)])

    def global_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters, buffers and feedback keyed by *global* block index (``blocks.{j}.…``,
        ``feedback.{j}``): the same keys whatever the partition, so stages can be compared,
        merged and checkpointed independently."""
        state = {}
        for index, block in zip(self.indices, self.blocks):
            for key, value in block.state_dict().items():
                state[f"blocks.{index}.{key}"] = value
        for key, value in self.feedback.items():
            state[f"feedback.{key}"] = value.detach()
        return state

    def forward_parameters(self) -> list[nn.Parameter]:
        """Forward parameters this rule trains (frozen convs of bp_fc_only excluded)."""
        return list(named_trainable(self.rule, self.blocks))

    def feedback_parameters(self) -> list[nn.Parameter]:
        """Learned feedback matrices: DKP's ``B_j`` and KP's per-layer ``B``."""
        direct = list(self.feedback.values())
        layered = [m.feedback for m in self.blocks.modules() if isinstance(getattr(m, "feedback", None), nn.Parameter)]
        return [p for p in direct + layered if p.requires_grad]
