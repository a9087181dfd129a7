"""One training or evaluation step of a stage, on one process or pipelined across ranks.

Direct rules (dfa, dkp, drtp) — backward unlocking::

    for each micro-batch m:  receive a[m] → forward own blocks (inputs cut) → send onward
        last rank:           e[m] = (softmax(h) - onehot(y)) / N; output block backward
        all ranks:           async broadcast of e[m] on the error group
                             local update of micro-batch m-1 while m is still flowing
    drain the last update; every rank steps its own optimizers

DRTP needs no error: each rank updates right after its own forward of a micro-batch.

Serial rules (bp, bp_fc_only, fa, kp) use ``torch.distributed.pipelining`` (GPipe or 1F1B)
across ranks; on one process they run the same micro-batches through one chained backward.
World size 1 runs the very same code with the transport left out, so a multi-rank run
reproduces the single-process run.
"""

from __future__ import annotations

import inspect
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel_dkp.parallel.distributed import DistContext
from parallel_dkp.parallel.stage import Stage
from parallel_dkp.parallel.timing import PhaseTimer
from parallel_dkp.rules import output_error, target_signal


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


@dataclass
class StepResult:
    """Sums over the examples of one step (meaningful on the last rank only)."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        with torch.no_grad():
            self.loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            self.correct += (logits.argmax(1) == targets).sum().item()
            self.count += len(targets)

    def __iadd__(self, other: "StepResult") -> "StepResult":
        self.loss_sum += other.loss_sum
        self.correct += other.correct
        self.count += other.count
        return self


class Runtime:
    """Runs steps for one ``Stage`` given the per-example shapes it receives and sends."""

    def __init__(
        self,
        stage: Stage,
        ctx: DistContext,
        *,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        num_classes: int,
        microbatches: int,
        batch_size: int,
        schedule: str = "gpipe",
        timer: PhaseTimer | None = None,
    ) -> None:
        self.stage, self.ctx, self.rule = stage, ctx, stage.rule
        self.in_shape = in_shape
        self.out_shape = out_shape
        self.num_classes = num_classes
        self.microbatches = microbatches
        self.batch_size = batch_size
        self.timer = timer or PhaseTimer(ctx.device)
        self._schedule_name = schedule
        serial_on_gloo = ctx.backend == "gloo" and not self.rule.backward_unlocked
        if schedule == "1f1b" and serial_on_gloo and _torch_version() < (2, 5):
            # Its 1F1B fuses sends with receives in one batch; on gloo that deadlocks (seen with 2.4.1).
            raise ValueError(
                f"parallel.schedule = '1f1b' deadlocks on gloo with torch {torch.__version__}; "
                "use parallel.schedule=gpipe, or torch >= 2.5 (1F1B on gloo verified with torch 2.14)"
            )
        self._pipeline = None  # built on the first serial multi-rank step

    # ------------------------------------------------------------------ training

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """Accumulate this step's gradients (the caller zeroes and steps the optimizers)."""
        if len(y) != self.batch_size:
            raise ValueError(f"training batches must hold exactly {self.batch_size} examples, got {len(y)}")
        self.stage.train()
        if self.stage.is_first:  # only the first stage reads the inputs
            x = x.to(self.ctx.device, non_blocking=True)
        y = y.to(self.ctx.device, non_blocking=True)
        if self.rule.backward_unlocked:
            result = self._direct_step(x, y)
        elif self.ctx.distributed:
            result = self._pipelined_serial_step(x, y)
        else:
            result = self._serial_step(x, y)
        self.rule.after_backward(self.stage.blocks)
        return result

    def _direct_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        result, total = StepResult(), len(y)
        pending: deque = deque()  # (hidden outputs, signal, broadcast handle) per micro-batch
        sends = []
        for x_m, y_m in zip(x.chunk(self.microbatches), y.chunk(self.microbatches)):
            inputs = x_m if self.stage.is_first else self._recv(len(y_m))
            with self.timer.phase("forward"):
                out, hidden = self.stage.forward_unlocked(inputs)
            if not self.stage.is_last:
                with self.timer.phase("send"):
                    sends.append(dist.isend(out.detach().contiguous(), self.ctx.rank + 1))

            if self.rule.signal == "targets":  # DRTP: no need to wait for anybody
                with self.timer.phase("update"):
                    if self.stage.is_last:
                        self._output_backward(out, y_m, total, result)
                    self.stage.local_update(hidden, target_signal(y_m, self.num_classes, total, out.dtype))
                continue

            if self.stage.is_last:
                with self.timer.phase("update"):
                    error = self._output_backward(out, y_m, total, result)
            else:
                error = torch.empty(len(y_m), self.num_classes, device=self.ctx.device)
            handle = None
            if self.ctx.distributed:
                handle = dist.broadcast(error, src=self.ctx.last_rank, group=self.ctx.error_group, async_op=True)
            pending.append((hidden, error, handle))
            if len(pending) > 1:  # update m-1 while micro-batch m flows down the pipeline
                self._drain(pending)
        while pending:
            self._drain(pending)
        with self.timer.phase("send"):
            for work in sends:
                work.wait()
        return result

    def _drain(self, pending: deque) -> None:
        hidden, error, handle = pending.popleft()
        if handle is not None:
            with self.timer.phase("wait"):
                handle.wait()
        with self.timer.phase("update"):
            self.stage.local_update(hidden, error)

    def _output_backward(self, logits, y_m, total, result: StepResult) -> torch.Tensor:
        """The output block always learns from the true error ``e``; returns ``e``."""
        result.add(logits, y_m)
        error = output_error(logits, y_m, total)
        logits.backward(error)
        return error

    def _serial_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        result, total = StepResult(), len(y)
        for x_m, y_m in zip(x.chunk(self.microbatches), y.chunk(self.microbatches)):
            with self.timer.phase("forward"):
                logits = self.stage(x_m)
            result.add(logits, y_m)
            with self.timer.phase("update"):
                (F.cross_entropy(logits, y_m, reduction="sum") / total).backward()
        return result

    def _pipelined_serial_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        schedule = self._pipeline or self._build_pipeline()
        result = StepResult()
        with self.timer.phase("pipeline"):
            if self.stage.is_first:
                schedule.step(x)
            elif self.stage.is_last:
                logits = schedule.step(target=y)
                result.add(logits, y)
            else:
                schedule.step()
        return result

    def _build_pipeline(self):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        total = self.batch_size
        microbatch = total // self.microbatches

        def loss_fn(logits, targets):  # the sum over all N examples, divided by N once
            return F.cross_entropy(logits, targets, reduction="sum") / total

        example_in = torch.zeros(microbatch, *self.in_shape, device=self.ctx.device)
        shapes = {"input_args": (example_in,)}
        if _torch_version() < (2, 5):
            # torch 2.4 infers the output shape by running a forward on the example, which would
            # move the BN running statistics; newer versions infer it from the first micro-batch
            # (and treat a given output_args as a fully static stage, which breaks the loss stage).
            shapes["output_args"] = (torch.zeros(microbatch, *self.out_shape, device=self.ctx.device),)
        pipe_stage = PipelineStage(self.stage, self.ctx.rank, self.ctx.world_size, self.ctx.device, **shapes)
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[self._schedule_name]
        kwargs = {"scale_grads": False} if "scale_grads" in inspect.signature(cls.__init__).parameters else {}
        self._pipeline = cls(pipe_stage, self.microbatches, loss_fn=loss_fn, **kwargs)
        return self._pipeline

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """Forward only through the pipeline; batches may have any size (a header carries it)."""
        self.stage.eval()
        result = StepResult()
        if self.stage.is_first:
            inputs = x.to(self.ctx.device, non_blocking=True)
        else:
            inputs = self._recv(int(self._recv_header()))
        out = self.stage(inputs)
        if not self.stage.is_last:
            dist.send(torch.tensor([len(out)], device=self.ctx.device), self.ctx.rank + 1)
            dist.send(out.contiguous(), self.ctx.rank + 1)
        else:
            result.add(out, y.to(self.ctx.device))
        return result

    # ------------------------------------------------------------------ transport

    def _recv(self, batch: int) -> torch.Tensor:
        buffer = torch.empty(batch, *self.in_shape, device=self.ctx.device)
        with self.timer.phase("wait"):
            dist.recv(buffer, self.ctx.rank - 1)
        return buffer

    def _recv_header(self) -> int:
        header = torch.empty(1, dtype=torch.long, device=self.ctx.device)
        with self.timer.phase("wait"):
            dist.recv(header, self.ctx.rank - 1)
        return int(header.item())
