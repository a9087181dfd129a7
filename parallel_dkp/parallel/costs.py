"""Measured per-block cost, the partition the run uses (explicit or balanced), and the per-block
phases the cost model (``costmodel.py``) predicts step times from."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from parallel_dkp.config import Config
from parallel_dkp.models import module_device
from parallel_dkp.parallel.costmodel import BlockCosts
from parallel_dkp.parallel.distributed import DistContext
from parallel_dkp.parallel.partition import balanced_partition, check_world_size, explicit_partition
from parallel_dkp.rules.base import feedback_parameters, forward_parameters


def measure_block_costs(
    blocks: nn.ModuleList, *, input_shape: tuple[int, ...], batch: int, repeats: int = 3, input_grads: bool = True,
) -> list[float]:
    """Median seconds of forward + backward of each block on its own, on a random batch.

    ``input_grads``: whether the backward computes the gradient of the block's input, as backprop
    does for every block but the first; the direct rules train every block on a cut input, so
    their blocks never do. Each block runs on the device it is on (its inputs follow it there).
    Block parameters are left untouched (gradients are cleared afterwards; BN running statistics
    are restored).
    """
    costs = []
    x = torch.randn(batch, *input_shape)
    for index, block in enumerate(blocks):
        device = module_device(block)
        x = x.to(device)
        state = {k: v.clone() for k, v in block.state_dict().items()}
        samples = []
        for _ in range(repeats + 1):
            inp = x.detach().requires_grad_(input_grads and index > 0)
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
    input_grads: bool = True,
) -> list[range]:
    """Explicit block counts per stage (``ctx.stages`` of them), or a balance of measured costs agreed on by all ranks
    (``input_grads``: see :func:`measure_block_costs`)."""
    num_blocks = len(blocks)
    if counts:
        return explicit_partition(counts, num_blocks=num_blocks, world_size=ctx.stages)
    check_world_size(num_blocks=num_blocks, world_size=ctx.stages)
    if not ctx.pipelined:
        return [range(num_blocks)]
    costs = measure_block_costs(blocks, input_shape=input_shape, batch=microbatch, input_grads=input_grads)
    # Timings differ between ranks; every rank must cut at the same places, so rank 0 decides.
    return balanced_partition(ctx.broadcast_object(costs, src=0), world_size=ctx.stages)


def measure_block_phases(
    cfg: Config, x: torch.Tensor, y: torch.Tensor, *, num_classes: int, total: int, device: torch.device,
    repeats: int = 5,
) -> BlockCosts:
    """Seconds per micro-batch ``x`` of each block's phases, as the schedules run them: the
    forward pass, the backprop backward (input gradient included after block 0), the direct
    rule's local update (``cfg.rule.name`` if it is direct, else dkp), one optimizer step, and
    the copy of a channels-last output into the default layout (0 in the default layout).
    Fresh copies of the network are built for this; the run's own blocks are not touched.
    ``total`` is the examples of a whole step (the loss and the error are divided by it)."""
    from parallel_dkp.models import block_output_shapes, build_blocks
    from parallel_dkp.optim import Optimizers
    from parallel_dkp.parallel.stage import Stage
    from parallel_dkp.rules import RULES, build_rule, output_error

    input_shape = tuple(x.shape[1:])
    direct = cfg.rule.name if RULES[cfg.rule.name].signal != "chain" else "dkp"

    shapes = block_output_shapes(
        build_blocks(cfg.model, input_shape=input_shape, num_classes=num_classes, seed=cfg.run.seed), input_shape)

    def stage(rule_name: str) -> Stage:
        blocks = build_blocks(cfg.model, input_shape=input_shape, num_classes=num_classes, seed=cfg.run.seed)
        layout = torch.channels_last if cfg.run.channels_last else torch.preserve_format
        return Stage(list(blocks.to(device, memory_format=layout)), indices=range(len(blocks)), num_blocks=len(blocks),
                     rule=build_rule(replace(cfg.rule, name=rule_name)), out_shapes=shapes,
                     num_classes=num_classes, seed=cfg.run.seed).train()

    bp, dk = stage("bp"), stage(direct)
    num = len(bp.blocks)
    optims = {name: [Optimizers(forward=forward_parameters(b), feedback=feedback_parameters(b), cfg=cfg.optim)
                     for b in s.blocks] for name, s in (("bp", bp), ("direct", dk))}
    x, y = x.to(device), y.to(device)
    if cfg.run.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    samples: dict[str, list[list[float]]] = {k: [[] for _ in range(num)] for k in
                                             ("forward", "backward", "update", "optim_bp", "optim_direct",
                                              "relayout")}

    def timed(key: str, i: int, fn):
        _synchronize(device)
        start = time.perf_counter()
        out = fn()
        _synchronize(device)
        samples[key][i].append(time.perf_counter() - start)
        return out

    for _ in range(repeats + 1):  # the first round warms up and is dropped
        bp.zero_grad(set_to_none=True)
        dk.zero_grad(set_to_none=True)
        # backprop: each block on a cut input, so its backward can be timed on its own
        links, inp = [], x
        for i, block in enumerate(bp.blocks):
            cut = inp.detach().requires_grad_(i > 0)
            inp = timed("forward", i, lambda: block(cut))  # noqa: B023 - called at once
            links.append((cut, inp))
            if _relaid(inp):  # what torch's pipelining does to a channels-last output it sends
                timed("relayout", i, lambda: inp.contiguous())  # noqa: B023
            else:
                samples["relayout"][i].append(0.0)
        grad = None
        for i in reversed(range(num)):
            cut, out = links[i]
            if i == num - 1:
                timed("backward", i, lambda: (F.cross_entropy(out, y, reduction="sum") / total).backward())  # noqa: B023
            else:
                timed("backward", i, lambda: out.backward(grad))  # noqa: B023
            grad = cut.grad
        for i, opt in enumerate(optims["bp"]):
            timed("optim_bp", i, opt.step)
        # the direct rule: forward (kept for the drain), the output update, then each hidden block's
        hidden, inp = [], x
        for block in dk.blocks:
            inp = block(inp)
            hidden.append((block, inp))
        def output_update(logits=inp):  # what the last stage does: the error, then its backward
            error = output_error(logits, y, total)
            logits.backward(error)
            return error

        error = timed("update", num - 1, output_update)
        for i, (block, out) in enumerate(hidden[:-1]):
            timed("update", i, lambda: dk.rule.local_update([(block, out)], error))  # noqa: B023
        for i, opt in enumerate(optims["direct"]):
            timed("optim_direct", i, opt.step)
    median = {k: [statistics.median(s[1:]) for s in v] for k, v in samples.items()}
    item = x.element_size()

    weight_bytes, feedback_bytes = averaged_bytes(dk)
    return BlockCosts(**median, out_bytes=[len(x) * math.prod(s) * item for s in shapes],
                      error_bytes=len(x) * num_classes * item, weight_bytes=weight_bytes,
                      feedback_bytes=feedback_bytes)


def _relaid(output: torch.Tensor) -> bool:
    """Whether a block's output is stored channels-last (and would be copied into the default layout)."""
    return output.dim() == 4 and not output.is_contiguous()


def averaged_bytes(stage) -> tuple[list[float], list[float]]:
    """Per block of ``stage``, the bytes its replicas average after every step
    (:class:`~parallel_dkp.parallel.mesh.ReplicaAverager`): the trained weights' gradients with the
    BN statistics, and the learned feedback's gradient (0 where the rule learns none)."""
    def nbytes(tensors) -> float:
        return float(sum(t.numel() * t.element_size() for t in tensors))

    weights = [nbytes(forward_parameters(b)) + nbytes(t for t in b.buffers() if t.is_floating_point())
               for b in stage.blocks]
    return weights, [nbytes(feedback_parameters(b)) for b in stage.blocks]
