"""A stage: the contiguous blocks one rank owns, adapted for the learning rule."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from parallel_dkp.rules import LearningRule
from parallel_dkp.rules.base import feedback_parameters, forward_parameters


class Stage(nn.Module):
    """Blocks ``indices`` (global, contiguous) of an ``num_blocks``-block network.

    The rule adapts the blocks when the stage is built (feedback twins, direct-feedback
    wrappers, frozen layers); ``forward`` is the plain chain through them.
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
        self.indices = indices
        self.num_blocks = num_blocks
        self.rule = rule
        self.blocks = nn.ModuleList(rule.prepare(
            list(blocks), indices=indices, num_blocks=num_blocks,
            out_shapes=out_shapes, num_classes=num_classes, seed=seed,
        ))

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

    def global_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters, buffers and feedback keyed by *global* block index (``blocks.{j}.…``):
        the same keys whatever the partition, so stages can be compared, merged and
        checkpointed independently."""
        state = {}
        for index, block in zip(self.indices, self.blocks):
            for key, value in block.state_dict().items():
                state[f"blocks.{index}.{key}"] = value
        return state

    def load_global_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load this stage's blocks from globally keyed ``state`` (it may hold other blocks too).

        Raises ``ValueError`` naming the keys this stage needs but ``state`` lacks.
        """
        for index, block in zip(self.indices, self.blocks):
            prefix = f"blocks.{index}."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            missing = sorted(set(block.state_dict()) - set(own))
            if missing:
                raise ValueError(
                    f"the checkpoint has no {prefix}{missing[0]} (and {len(missing) - 1} more keys of block "
                    f"{index}); it was written for another model or rule"
                )
            block.load_state_dict(own)

    def global_parameter_names(self) -> dict[int, str]:
        """``id(parameter) → "blocks.{global index}.…"`` for every parameter of the stage."""
        names = {}
        for index, block in zip(self.indices, self.blocks):
            for name, param in block.named_parameters():
                names[id(param)] = f"blocks.{index}.{name}"
        return names

    def forward_parameters(self) -> list[nn.Parameter]:
        """Forward parameters this rule trains (frozen layers of bp_fc_only excluded)."""
        return forward_parameters(self.blocks)

    def feedback_parameters(self) -> list[nn.Parameter]:
        """Learned feedback matrices: DKP's ``B_j`` and KP's per-layer ``B``."""
        return feedback_parameters(self.blocks)
