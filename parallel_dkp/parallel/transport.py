"""Rank-to-rank transport of the layer-parallel pipeline: the only place that moves tensors.

A stage talks to its two neighbours in its pipeline (activations forward, P2P) and, for the
direct rules, to the whole pipeline at once (the output error, from the last stage to every
earlier one, by a broadcast or by sends, on a process group of its own, so that it never
interleaves with the activations' traffic). With
several replicas each pipeline is a column of the stages × replicas grid and talks only
within itself. On a single process, or a single stage, every stage is both first and last:
nothing is sent and ``broadcast_error`` returns no handle.

Shapes are fixed per stage: training micro-batches all have the same size, and evaluation
batches take their size from the batch every rank reads from its own test loader (so no size
header, and no host read, is needed).
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
import torch.distributed as dist

from parallel_dkp.parallel.distributed import DistContext


class Handle(Protocol):
    def wait(self) -> object: ...


class Transport:
    """Neighbours, receive buffers and the error group of one stage."""

    def __init__(
        self, ctx: DistContext, *, is_first: bool, is_last: bool, in_shape: tuple[int, ...], timeout_s: float,
        channels_last: bool = False, error_messages: str = "auto",
    ) -> None:
        self.ctx = ctx
        self.device = ctx.device
        self.in_shape = in_shape
        # With run.channels_last every 4-D activation crosses in NHWC storage order (every rank
        # agrees, they share the config): nothing is re-laid out on either side of a boundary.
        self.channels_last = channels_last
        self.prev_rank = None if is_first else ctx.pipeline_rank(ctx.stage - 1)
        self.next_rank = None if is_last else ctx.pipeline_rank(ctx.stage + 1)
        self.error_group = None
        if ctx.pipelined:
            # Collective: every rank builds its transport at the same point of its program. One
            # group per replica's pipeline, apart from the P2P traffic.
            self.error_group = ctx.group_of(ctx.layout.pipelines(), timeout_s)
        # The output error (``parallel.error_messages``): one broadcast collective, or a send from
        # the last stage to each earlier one; auto: sends on gloo, whose collectives each go
        # through a worker thread of the process group (a wake-up and a hand-off per call, on the
        # cores the ranks compute on) while a send or receive is posted by the caller itself.
        self.error_p2p = error_messages == "sends" or (error_messages == "auto" and ctx.backend == "gloo")
        self._buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (wire, as used)
        self._sends: list[Handle] = []
        self._posted: dict[tuple[int, int], Handle] = {}  # receives posted ahead (post_next)

    # ---------------------------------------------------------------- activations

    def recv_activation(self, batch: int, slot: int = 0, *, post_next: bool = False) -> torch.Tensor:
        """Receive ``[batch, *in_shape]`` from the previous stage into buffer ``slot``; with
        ``post_next``, then post the receive of slot ``slot + 1`` (same size) at once.

        A slot is reused by the next step only: micro-batch ``m`` of a step uses slot ``m``,
        whose previous contents (saved for a backward) were released at the last step's end.
        A receive posted before its send lets the transfer run while this stage computes: the
        sender's send finds it waiting and moves the data at once (gloo's rendezvous otherwise
        waits for the sender's helper thread to answer the receiver; NCCL starts the copy only
        once both are posted), so the next ``recv_activation`` finds the data there.
        """
        handle = self._posted.pop((batch, slot), None)
        (handle if handle is not None else self._post(batch, slot)).wait()
        if post_next:
            self._posted[(batch, slot + 1)] = self._post(batch, slot + 1)
        return self._buffers[(batch, slot)][1]

    def _post(self, batch: int, slot: int) -> Handle:
        return dist.irecv(self._buffer(batch, slot)[0], self.prev_rank)

    def _buffer(self, batch: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Receive buffer ``slot`` for ``batch`` examples: (what the wire fills, what the blocks use)."""
        key = (batch, slot)
        if key not in self._buffers:
            if self._nhwc(len(self.in_shape) + 1):
                c, h, w = self.in_shape
                wire = torch.empty(batch, h, w, c, device=self.device)
                self._buffers[key] = (wire, wire.permute(0, 3, 1, 2))  # [B, C, H, W], channels-last
            else:
                wire = torch.empty(batch, *self.in_shape, device=self.device)
                self._buffers[key] = (wire, wire)
        return self._buffers[key]

    def send_activation(self, tensor: torch.Tensor) -> None:
        """Start sending ``tensor`` to the next stage; ``wait_sends`` completes it."""
        self._sends.append(dist.isend(self._wire(tensor.detach()), self.next_rank))

    def wait_sends(self) -> None:
        for work in self._sends:
            work.wait()
        self._sends.clear()

    def send_blocking(self, tensor: torch.Tensor) -> None:
        dist.send(self._wire(tensor), self.next_rank)

    def _nhwc(self, dim: int) -> bool:
        return self.channels_last and dim == 4

    def _wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """The contiguous tensor that goes on the wire: NHWC storage for 4-D channels-last runs
        (a view, no copy, when ``tensor`` is channels-last already)."""
        if self._nhwc(tensor.dim()):
            return tensor.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return tensor.contiguous()

    # ---------------------------------------------------------------- backwards (analysis only)

    def send_backward(self, tensor: torch.Tensor) -> None:
        """Send a gradient (or any tensor) to the previous stage, blocking."""
        dist.send(tensor.contiguous(), self.prev_rank)

    def recv_backward(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Receive a fresh ``shape`` tensor from the next stage, blocking."""
        tensor = torch.empty(shape, device=self.device)
        dist.recv(tensor, self.next_rank)
        return tensor

    # ---------------------------------------------------------------- the output error

    def broadcast_error(self, error_BK: torch.Tensor) -> Handle | None:
        """Start moving ``e`` from the last stage into ``error_BK`` on every rank of this
        pipeline (one broadcast, or the last stage's sends and the others' receives); the handle's
        ``wait`` completes this rank's part."""
        if not self.ctx.pipelined:
            return None
        if not self.error_p2p:
            return dist.broadcast(error_BK, src=self.ctx.last_rank, group=self.error_group, async_op=True)
        if self.next_rank is None:  # the last stage: a send to every earlier stage
            return _AllOf([dist.isend(error_BK, self.ctx.pipeline_rank(s), group=self.error_group)
                           for s in range(self.ctx.stages - 1)])
        return dist.irecv(error_BK, self.ctx.last_rank, group=self.error_group)


class _AllOf:
    """One handle for several: waits for each."""

    def __init__(self, works: list[Handle]) -> None:
        self.works = works

    def wait(self) -> None:
        for work in self.works:
            work.wait()


class LocalTransport(Transport):
    """A transport that moves nothing, for measuring what the compute alone allows
    (``parallel.messages = false``; benchmarks, never training). A stage receives fixed tensors of
    the right shapes (drawn once, finite) and sends nothing; a stage before the last takes a
    fixed output error. Every rank computes its own stage as if every message had arrived the
    moment it was asked for, so each step's time is the stage's work at the machine's level with
    the other ranks busy, free of the messages' host costs and of waiting for other stages."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._errors: dict[torch.Size, torch.Tensor] = {}

    def recv_activation(self, batch: int, slot: int = 0, *, post_next: bool = False) -> torch.Tensor:
        fresh = (batch, slot) not in self._buffers
        wire, used = self._buffer(batch, slot)
        if fresh:
            wire.normal_()
        return used

    def send_activation(self, tensor: torch.Tensor) -> None:
        pass

    def send_blocking(self, tensor: torch.Tensor) -> None:
        pass

    def broadcast_error(self, error_BK: torch.Tensor) -> Handle | None:
        if self.next_rank is not None:  # not the last stage: a fixed error of e's size
            if error_BK.shape not in self._errors:
                self._errors[error_BK.shape] = torch.randn(error_BK.shape, device=self.device) / len(error_BK)
            error_BK.copy_(self._errors[error_BK.shape])
        return None


def ping_pong(ctx: DistContext, num_bytes: int, *, repeats: int) -> list[float]:
    """One-way seconds of ``num_bytes`` between ranks 0 and 1 (half of each round trip), measured
    on rank 0 after one untimed round; the other ranks only take part in the closing barrier."""
    tensor = torch.zeros(max(1, num_bytes // 4), dtype=torch.float32, device=ctx.device)
    times = []
    for i in range(repeats + 1):
        if ctx.rank == 0:
            _synchronize(ctx.device)
            start = time.perf_counter()
            dist.send(tensor, 1)
            dist.recv(tensor, 1)
            _synchronize(ctx.device)
            if i:
                times.append((time.perf_counter() - start) / 2)
        elif ctx.rank == 1:
            dist.recv(tensor, 0)
            dist.send(tensor, 0)
    ctx.barrier()
    return times


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # measuring, not training: waiting here is what timing needs
        torch.cuda.synchronize(device)
