"""Small builders shared by the tests: a stage of the whole network and one training step."""

from __future__ import annotations

import copy

import torch

from parallel_dkp.config import ModelConfig, OptimConfig, OptimizerConfig
from parallel_dkp.models import block_output_shapes, build_blocks
from parallel_dkp.optim import Optimizers
from parallel_dkp.parallel.distributed import DistContext
from parallel_dkp.parallel.schedules import build_schedule
from parallel_dkp.parallel.stage import Stage
from parallel_dkp.parallel.transport import Transport
from parallel_dkp.rules import RULES

TINY_MLP = ModelConfig(name="mlp", widths=(7, 5), batch_norm=False)
TINY_MLP_BN = ModelConfig(name="mlp", widths=(7, 5), batch_norm=True)
TINY_CONV = ModelConfig(name="conv2", batch_norm=True)
MLP_INPUT, CONV_INPUT = (6,), (2, 6, 6)


def make_blocks(model: ModelConfig, input_shape, num_classes=3, seed=0):
    return build_blocks(model, input_shape=input_shape, num_classes=num_classes, seed=seed)


def make_stage(rule_name: str, model: ModelConfig, input_shape, num_classes=3, seed=0, blocks=None):
    blocks = blocks if blocks is not None else make_blocks(model, input_shape, num_classes, seed)
    shapes = block_output_shapes(blocks, input_shape)
    return Stage(
        list(blocks), indices=range(len(blocks)), num_blocks=len(blocks), rule=RULES[rule_name](),
        out_shapes=shapes, num_classes=num_classes, seed=seed,
    )


def one_backward(stage: Stage, x, y, *, microbatches=1, num_classes=3):
    """Accumulate one step's gradients in ``stage`` with the single-process runtime."""
    ctx, in_shape = DistContext(), tuple(x.shape[1:])
    transport = Transport(ctx, is_first=True, is_last=True, in_shape=in_shape, timeout_s=60)
    schedule = build_schedule(stage, transport, ctx, in_shape=in_shape, out_shape=(num_classes,),
                              num_classes=num_classes, microbatches=microbatches, batch_size=len(y))
    stage.zero_grad(set_to_none=True)
    return schedule, schedule.train_step(x, y)


def sgd(lr=0.1, weight_decay=0.0, momentum=0.0):
    return OptimizerConfig(name="sgd", lr=lr, momentum=momentum, nesterov=False, weight_decay=weight_decay)


def optimizers_for(stage: Stage, forward=None, feedback=None) -> Optimizers:
    cfg = OptimConfig(forward=forward or sgd(), feedback=feedback or sgd())
    return Optimizers(forward=stage.forward_parameters(), feedback=stage.feedback_parameters(), cfg=cfg)


def clone(blocks):
    return copy.deepcopy(blocks)


def batch(input_shape, n=8, num_classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *input_shape, generator=g), torch.randint(0, num_classes, (n,), generator=g)
