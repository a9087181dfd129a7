"""Measured per-block cost, and the partition the run uses (explicit or balanced)."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import nn

from parallel_dkp.models import module_device
from parallel_dkp.parallel.distributed import DistContext
from parallel_dkp.parallel.partition import balanced_partition, check_world_size, explicit_partition


def measure_block_costs(
    blocks: nn.ModuleList, *, input_shape: tuple[int, ...], batch: int, repeats: int = 3
) -> list[float]:
    """Median seconds of forward + backward of each block on its own, on a random batch.

    Each block runs on the device it is on (its inputs follow it there). Block parameters are
    left untouched (gradients are cleared afterwards; BN running statistics are restored).
    """
    costs = []
    x = torch.randn(batch, *input_shape)
    for block in blocks:
        device = module_device(block)
        x = x.to(device)
        state = {k: v.clone() for k, v in block.state_dict().items()}
        samples = []
        for _ in range(repeats + 1):
            inp = x.detach().requires_grad_(True)
            _synchronize(device)
            start = time.perf_counter()
            out = block(inp)
            out.backward(torch.ones_like(out))
            _synchronize(device)
            samples.append(time.perf_counter() - start)
        block.zero_grad(set_to_none=True)
        block.load_state_dict(state)
        costs.append(statistics.median(samples[1:]))
        x = out.detach()
    return costs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # set-up, not a training step: waiting here is what timing needs
        torch.cuda.synchronize(device)


def choose_partition(
    counts: Sequence[int],
    ctx: DistContext,
    *,
    blocks: nn.ModuleList,
    input_shape: tuple[int, ...],
    microbatch: int,
) -> list[range]:
    """Explicit block counts per rank, or a balance of measured costs agreed on by all ranks."""
    num_blocks = len(blocks)
    if counts:
        return explicit_partition(counts, num_blocks=num_blocks, world_size=ctx.world_size)
    check_world_size(num_blocks=num_blocks, world_size=ctx.world_size)
    if not ctx.distributed:
        return [range(num_blocks)]
    costs = measure_block_costs(blocks, input_shape=input_shape, batch=microbatch)
    # Timings differ between ranks; every rank must cut at the same places, so rank 0 decides.
    return balanced_partition(ctx.broadcast_object(costs, src=0), world_size=ctx.world_size)
