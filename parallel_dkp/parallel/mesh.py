"""Stages × replicas: the 2-D layout of the ranks, and the averaging of gradients over replicas.

The world is a grid of ``stages`` × ``replicas`` ranks, pipeline stages outermost (as in
torchtitan's ``("pp", "dp")`` mesh)::

    rank = stage * replicas + replica

so the replicas of one stage are neighbouring ranks (one node, where the gradient all-reduce
is cheap) and a pipeline crosses nodes only between stages. Each replica is a whole pipeline
on its own shard of every global batch; the output error is broadcast inside the pipeline;
after a step each stage averages the gradients of its forward weights and its learned
feedback (and its BatchNorm running statistics) over its replicas (:class:`ReplicaAverager`).
With ``replicas = 1`` this is the plain layer-parallel runtime, rank = stage.

The process groups are built with ``torch.distributed.new_group`` (one per pipeline and one
per stage, in the same order on every rank), the way Megatron builds its parallel groups,
rather than taken from ``init_device_mesh``: that takes no timeout (pytorch/pytorch#119613),
so its sub-groups wait torch's 30-minute default (per-dimension options, ``backend_override``,
exist only in torch releases from late 2025; we support 2.4 on), and a dead replica must stop
every rank within ``parallel.timeout_s``. ``DistContext.device_mesh()`` gives the layout as a
``DeviceMesh`` (dimensions ``pp`` and ``dp``) built on these groups, for DTensor-based tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """``stages`` × ``replicas`` ranks; rank ``stage * replicas + replica``."""

    stages: int = 1
    replicas: int = 1

    @property
    def world_size(self) -> int:
        return self.stages * self.replicas

    def rank(self, stage: int, replica: int) -> int:
        return stage * self.replicas + replica

    def coords(self, rank: int) -> tuple[int, int]:
        """``(stage, replica)`` of ``rank``."""
        return divmod(rank, self.replicas)

    def pipeline(self, replica: int) -> list[int]:
        """The ranks of one replica's pipeline, first stage first."""
        return [self.rank(stage, replica) for stage in range(self.stages)]

    def replica_ranks(self, stage: int) -> list[int]:
        """The ranks that hold copies of one stage, replica 0 first."""
        return [self.rank(stage, replica) for replica in range(self.replicas)]

    def pipelines(self) -> list[list[int]]:
        return [self.pipeline(r) for r in range(self.replicas)]

    def stage_groups(self) -> list[list[int]]:
        return [self.replica_ranks(s) for s in range(self.stages)]

    def __str__(self) -> str:
        return f"{self.stages} stage(s) x {self.replicas} replica(s)"


def resolve_layout(
    *, world_size: int, num_blocks: int, stages: int = 0, replicas: int = 0, partition: Sequence[int] = (),
    batch_size: int, microbatches: int,
) -> Layout:
    """The layout of ``world_size`` ranks for a ``num_blocks``-block network.

    ``stages`` / ``replicas`` of 0 are chosen: an explicit ``partition`` fixes the stages; else a
    given count fixes the other; else as many stages as the blocks allow (the largest divisor of
    the world size that is at most ``num_blocks``) and the rest replicas. Raises ``ValueError``
    saying what to change when the numbers cannot fit, before anything is trained.
    """
    if stages < 0 or replicas < 0:
        raise ValueError(f"parallel.stages ({stages}) and parallel.replicas ({replicas}) must be >= 0 (0 = chosen)")
    if partition:
        if stages and stages != len(partition):
            raise ValueError(
                f"parallel.partition {list(partition)} has {len(partition)} stages but parallel.stages = {stages}; "
                "give one block count per stage, or leave parallel.stages = 0"
            )
        stages = len(partition)
    if stages and replicas:
        if stages * replicas != world_size:
            raise ValueError(
                f"parallel.stages ({stages}) x parallel.replicas ({replicas}) = {stages * replicas} ranks, but the "
                f"world size is {world_size}; {_launch(stages * replicas)}, or set one of them to 0 "
                "(chosen to fit)"
            )
    elif stages or replicas:
        given, name, other = (stages, "parallel.stages", "replicas") if stages else (replicas, "parallel.replicas",
                                                                                     "stages")
        if world_size % given:
            raise ValueError(
                f"{name} = {given} does not divide the world size ({world_size}), so the {other} cannot be chosen; "
                f"launch a multiple of {given} ranks, or set {name} to a divisor of {world_size}"
            )
        stages, replicas = (stages, world_size // stages) if stages else (world_size // replicas, replicas)
    else:
        stages = max(d for d in range(1, min(world_size, num_blocks) + 1) if world_size % d == 0)
        replicas = world_size // stages
    if stages > num_blocks:
        raise ValueError(
            f"{stages} pipeline stages but the model has only {num_blocks} blocks (a stage holds at least one); "
            f"set parallel.stages <= {num_blocks} and put the other ranks into parallel.replicas, "
            f"or pick a deeper model"
        )
    per_replica = replicas * microbatches
    if batch_size % per_replica:
        raise ValueError(
            f"data.batch_size ({batch_size}) must be divisible by parallel.replicas ({replicas}) x "
            f"parallel.microbatches ({microbatches}) = {per_replica}: each replica trains on an equal shard of "
            f"every batch, split into equal micro-batches; set data.batch_size to a multiple of {per_replica}"
        )
    return Layout(stages, replicas)


def _launch(ranks: int) -> str:
    return f"launch {ranks} ranks (torchrun --nproc-per-node {ranks} ...)"


class ReplicaAverager:
    """Averages the gradients of one stage over its replicas, as DDP does, but driven by the
    schedule instead of autograd hooks (the direct rules write some gradients outside autograd),
    and its floating-point buffers (BatchNorm running statistics) with them.

    :meth:`start` launches asynchronous all-reduces in buckets of about ``bucket_mb`` MiB as
    soon as the stage's last local update is done, so the reduction of one stage overlaps with
    the work still running on the others; :meth:`wait` completes them just before the optimizer
    step. Parameters without a gradient this step (the same ones on every replica: they run the
    same code) are left out and keep ``None``.

    BatchNorm: training normalises with each micro-batch's own statistics, local to its replica
    (as DDP does without SyncBatchNorm). That needs no communication inside a step and equals the
    one-process run whose micro-batches are the replicas' micro-batches. The running statistics
    (used at test time) are averaged after every step, a few hundred floats per BN layer, so the
    replicas of a stage hold identical state at all times: any of them can evaluate or save it,
    and resuming does not depend on when checkpoints were taken.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], buffers: Sequence[torch.Tensor] = (), *, group,
                 replicas: int, bucket_mb: float = 25.0):
        self.params = list(params)
        self.buffers = [b for b in buffers if b.is_floating_point()]
        self.group = group
        self.replicas = replicas
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._pending: list[tuple[list[torch.Tensor], torch.Tensor, object]] = []

    def start(self) -> None:
        if self._pending:
            raise RuntimeError("ReplicaAverager.start called twice without wait")
        tensors = [p.grad for p in self.params if p.grad is not None] + self.buffers
        for bucket in _buckets(tensors, self.bucket_bytes):
            flat = torch.cat([g.reshape(-1) for g in bucket])  # logical order, whatever the layout
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            self._pending.append((bucket, flat, work))

    def wait(self) -> None:
        for bucket, flat, work in self._pending:
            work.wait()
            flat.div_(self.replicas)  # gloo has no ReduceOp.AVG: sum, then divide
            offset = 0
            for tensor in bucket:
                tensor.copy_(flat[offset:offset + tensor.numel()].view(tensor.shape))
                offset += tensor.numel()
        self._pending.clear()


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of tensors of one dtype and device, each about ``limit`` bytes at most
    (a larger tensor gets a bucket of its own)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        current = buckets[-1] if buckets else None
        if (current is None or size + nbytes > limit or current[0].dtype != t.dtype
                or current[0].device != t.device):
            buckets.append([t])
            size = nbytes
        else:
            current.append(t)
            size += nbytes
    return buckets


def replica_seed(seed: int, replica: int) -> int:
    """The seed of replica ``replica``'s global RNG (dropout): ``seed`` itself for replica 0, so a
    single replica draws what a single process draws; well-mixed, distinct values for the others."""
    if replica == 0:
        return seed
    return int(np.random.SeedSequence([seed, replica]).generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)
