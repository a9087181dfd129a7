"""Step strategies: how one training step of a stage is ordered, on one process or many.

Every schedule has the same small interface (``train_step``, ``eval_step``) and is chosen by
``build_schedule`` from what the rule's hidden blocks learn from (``rule.signal``):

``"error"`` → :class:`DirectSchedule` (DFA, DKP) — backward unlocking::

    for each micro-batch m:  receive a[m] → forward own blocks (inputs cut) → send onward
        last stage:          e[m] = (softmax(h) - onehot(y)) / N
        all stages:          async broadcast of e[m] (the last stage then runs its output backward)
                             local update of micro-batch m-lag while the later ones still flow,
                             lag = max(1, stages after this one): e[m] exists only once m has
                             crossed them, so waiting for it sooner would stall the pipeline
                             (the last stage forwards m+1 before updating m: see update_lag)
    drain the last updates

``"targets"`` → :class:`TargetsSchedule` (DRTP): each stage updates right after its own forward.

``"chain"`` → :class:`SerialSchedule` on one process (the micro-batches through one chained
backward), :class:`PipelinedSerialSchedule` across ranks (``torch.distributed.pipelining``,
GPipe or 1F1B; on one process too with ``parallel.engine_on_one_stage``, which ``bench`` uses to
measure what the engine itself costs). World size 1 runs the very same code with nothing to
send, so a multi-rank run reproduces the single-process run. With several replicas each runs
these schedules on its own shard of the batch, inside its own pipeline; averaging the gradients
over replicas is the caller's (``train.train_step``,
:class:`~parallel_dkp.parallel.mesh.ReplicaAverager`).

The caller zeroes the gradients before a step and steps the optimizers after it. No schedule
reads a value back to the host: the returned :class:`StepMetrics` stay on the device.
"""

from __future__ import annotations

import inspect
from collections import deque

import torch
import torch.nn.functional as F

from parallel_dkp.models import module_device
from parallel_dkp.parallel.costmodel import update_lag
from parallel_dkp.parallel.distributed import DistContext
from parallel_dkp.parallel.metrics import StepMetrics
from parallel_dkp.parallel.stage import Stage
from parallel_dkp.parallel.timing import NoTimer
from parallel_dkp.parallel.transport import Handle, Transport
from parallel_dkp.rules import output_error, target_signal


class Schedule:
    """One stage's training and evaluation steps. Subclasses implement ``train_step``."""

    def __init__(
        self, stage: Stage, transport: Transport, *, num_classes: int, microbatches: int, batch_size: int,
        timer: NoTimer | None = None, channels_last: bool = False,
    ) -> None:
        self.stage, self.rule, self.transport = stage, stage.rule, transport
        self.channels_last = channels_last
        self.num_classes = num_classes
        self.microbatches = microbatches
        self.batch_size = batch_size
        self.timer = timer or NoTimer()
        self.device = module_device(stage)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepMetrics:
        """Accumulate one step's gradients; return the loss sums (on the last stage)."""
        raise NotImplementedError

    def _start(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(y) != self.batch_size:
            raise ValueError(f"training batches must hold exactly {self.batch_size} examples, got {len(y)}")
        self.stage.train()
        if self.stage.is_first:  # only the first stage reads the inputs
            x = self._to_device(x)
        return x, self._to_device(y)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy a host batch to the stage's device without making the host wait: a copy from
        pageable memory synchronises with the stream, one from pinned memory does not."""
        if self.device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        tensor = tensor.to(self.device, non_blocking=True)
        if self.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> StepMetrics:
        """Forward only, through the pipeline; batches may have any size (every rank reads the
        same test batch, so each knows the size of what it will receive)."""
        self.stage.eval()
        metrics = StepMetrics()
        if self.stage.is_first:
            inputs = self._to_device(x)
        else:
            inputs = self.transport.recv_activation(len(y))
        out = self.stage(inputs)
        if self.stage.is_last:
            metrics.add(out, self._to_device(y))
        else:
            self.transport.send_blocking(out)
        return metrics


# --------------------------------------------------------------------------- serial rules


class SerialSchedule(Schedule):
    """Chained backward on one process: bp, bp_fc_only, fa, kp with world size 1."""

    def train_step(self, x, y):
        x, y = self._start(x, y)
        metrics, total = StepMetrics(), len(y)
        for x_m, y_m in zip(x.chunk(self.microbatches), y.chunk(self.microbatches)):
            with self.timer.phase("forward"):
                logits = self.stage(x_m)
            metrics.add(logits, y_m)
            with self.timer.phase("update"):
                (F.cross_entropy(logits, y_m, reduction="sum") / total).backward()
        self.rule.after_backward(self.stage.blocks)
        return metrics


class PipelinedSerialSchedule(Schedule):
    """Chained backward across ranks through ``torch.distributed.pipelining`` (GPipe or 1F1B)."""

    def __init__(self, stage, transport, *, ctx: DistContext, in_shape, out_shape, schedule: str, **kwargs):
        super().__init__(stage, transport, **kwargs)
        if schedule == "1f1b" and ctx.backend == "gloo" and torch.__version__ < (2, 5):
            # Its 1F1B fuses sends with receives in one batch; on gloo that deadlocks (seen with 2.4.1).
            raise ValueError(
                f"parallel.schedule = '1f1b' deadlocks on gloo with torch {torch.__version__}; "
                "use parallel.schedule=gpipe, or torch >= 2.5 (1F1B on gloo verified with torch 2.14)"
            )
        self._ctx, self._in_shape, self._out_shape, self._name = ctx, in_shape, out_shape, schedule
        self._pipeline = None  # built on the first step

    def train_step(self, x, y):
        x, y = self._start(x, y)
        pipeline = self._pipeline or self._build()
        metrics = StepMetrics()
        with self.timer.phase("pipeline"):
            inputs = (x,) if self.stage.is_first else ()  # a one-stage pipeline is first and last
            if self.stage.is_last:
                metrics.add(pipeline.step(*inputs, target=y), y)
            else:
                pipeline.step(*inputs)
        self.rule.after_backward(self.stage.blocks)
        return metrics

    def _build(self):
        from torch.distributed.pipelining import PipelineStage

        total = self.batch_size
        microbatch = total // self.microbatches

        def loss_fn(logits, targets):  # the sum over all N examples, divided by N once
            return F.cross_entropy(logits, targets, reduction="sum") / total

        shapes = {"input_args": (torch.zeros(microbatch, *self._in_shape, device=self.device),)}
        if torch.__version__ < (2, 5):
            # torch 2.4 infers the output shape by running a forward on the example, which would
            # move the BN running statistics; newer versions infer it from the first micro-batch
            # (and treat a given output_args as a fully static stage, which breaks the loss stage).
            shapes["output_args"] = (torch.zeros(microbatch, *self._out_shape, device=self.device),)
        # One pipeline per replica: its P2P runs on that replica's group (the world with one
        # replica); a one-stage pipeline (``parallel.engine_on_one_stage``) on a group of its own.
        group = self._ctx.pipeline_group if self._ctx.pipelined else self._ctx.group_of_one()
        stage = PipelineStage(_DefaultLayout(self.stage, self.channels_last), self._ctx.stage, self._ctx.stages,
                              self.device, group=group, **shapes)
        cls = _pipelining_schedule_class(self._name)
        kwargs = {"scale_grads": False} if "scale_grads" in inspect.signature(cls.__init__).parameters else {}
        self._pipeline = cls(stage, self.microbatches, loss_fn=loss_fn, **kwargs)
        return self._pipeline


class _DefaultLayout(torch.nn.Module):
    """The stage, with what crosses ranks in the default (contiguous) layout: its output, and the
    gradient of its input. gloo and NCCL send contiguous tensors only, and
    torch.distributed.pipelining sizes its receive buffers from the strides of what it inferred,
    so channels-last tensors (``run.channels_last``) cross in the default layout. What arrives
    (the input, the output's gradient) is laid out channels-last again before the stage's blocks
    see it: a channels-last conv fed a default-layout tensor runs slower kernels on the CPU
    (2 ranks, convdeep: torch's 1F1B 4-6 % slower than the same engine in the default layout)."""

    def __init__(self, stage: Stage, channels_last: bool = False) -> None:
        super().__init__()
        self.stage = stage
        self.layout = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _Relayout.apply(x, self.layout, torch.contiguous_format)  # in: ours; its gradient: the wire's
        return _Relayout.apply(self.stage(x), torch.contiguous_format, self.layout)  # and the other way


class _Relayout(torch.autograd.Function):
    """``x`` in ``forward_format``, its gradient in ``backward_format`` (4-D tensors; others as
    they are, contiguous)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_format, backward_format) -> torch.Tensor:
        ctx.backward_format = backward_format
        return _in_format(x, forward_format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _in_format(grad, ctx.backward_format), None, None


def _in_format(tensor: torch.Tensor, memory_format) -> torch.Tensor:
    if tensor.dim() != 4:
        memory_format = torch.contiguous_format
    out = tensor.contiguous(memory_format=memory_format)
    return out.view_as(out) if out is tensor else out  # a new tensor for autograd, never a copy


def _pipelining_schedule_class(name: str):
    try:
        from torch.distributed.pipelining.schedules import get_schedule_class
    except ImportError:  # torch 2.4
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

        return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]
    return get_schedule_class(name)


# --------------------------------------------------------------------------- direct rules


class _UnlockedSchedule(Schedule):
    """Shared by the direct rules: the forward pipeline with cut inputs, the output backward."""

    def _forward(self, x_m: torch.Tensor, batch: int, slot: int):
        inputs = x_m if self.stage.is_first else self._recv(batch, slot)
        with self.timer.phase("forward"):
            out, hidden = self.rule.forward(self.stage.blocks, inputs)
        if not self.stage.is_last:
            with self.timer.phase("send"):
                self.transport.send_activation(out)
        return out, hidden

    def _recv(self, batch: int, slot: int) -> torch.Tensor:
        with self.timer.phase("wait"):  # and post the next micro-batch's receive before computing
            return self.transport.recv_activation(batch, slot, post_next=slot + 1 < self.microbatches)

    def _output_backward(self, logits, y_m, total: int, metrics: StepMetrics) -> torch.Tensor:
        """The output block always learns from the true error ``e``; returns ``e``."""
        metrics.add(logits, y_m)
        error = output_error(logits, y_m, total)
        logits.backward(error)
        return error

    def _finish(self) -> None:
        with self.timer.phase("send"):
            self.transport.wait_sends()


class DirectSchedule(_UnlockedSchedule):
    """DFA, DKP: the last stage broadcasts ``e[m]``; every stage updates m-lag while m flows."""

    def train_step(self, x, y):
        x, y = self._start(x, y)
        metrics, total = StepMetrics(), len(y)
        pending: deque[tuple[list, torch.Tensor, Handle | None]] = deque()
        lag = update_lag(self.transport.ctx.stage, self.transport.ctx.stages)
        for slot, (x_m, y_m) in enumerate(zip(x.chunk(self.microbatches), y.chunk(self.microbatches))):
            out, hidden = self._forward(x_m, len(y_m), slot)
            if self.stage.is_last:
                with self.timer.phase("update"):
                    metrics.add(out, y_m)
                    error = output_error(out, y_m, total)
            else:
                error = torch.empty(len(y_m), self.num_classes, device=self.device)
            # The error leaves before the output block's backward, which overlaps with its flight.
            pending.append((hidden, error, self.transport.broadcast_error(error)))
            if self.stage.is_last:
                with self.timer.phase("update"):
                    out.backward(error)
            if len(pending) > lag:  # update m-lag while the later micro-batches flow on
                self._drain(pending)
        while pending:
            self._drain(pending)
        self._finish()
        return metrics

    def _drain(self, pending: deque) -> None:
        hidden, error, handle = pending.popleft()
        if handle is not None:
            with self.timer.phase("wait"):
                handle.wait()
        with self.timer.phase("update"):
            self.rule.local_update(hidden, self.rule.hidden_signal(error_BK=error, targets_BK=None))


class TargetsSchedule(_UnlockedSchedule):
    """DRTP: the labels are known up front, so every stage updates right after its own forward."""

    def train_step(self, x, y):
        x, y = self._start(x, y)
        metrics, total = StepMetrics(), len(y)
        for slot, (x_m, y_m) in enumerate(zip(x.chunk(self.microbatches), y.chunk(self.microbatches))):
            out, hidden = self._forward(x_m, len(y_m), slot)
            with self.timer.phase("update"):
                if self.stage.is_last:
                    self._output_backward(out, y_m, total, metrics)
                targets = target_signal(y_m, self.num_classes, total, out.dtype)
                self.rule.local_update(hidden, self.rule.hidden_signal(error_BK=None, targets_BK=targets))
        self._finish()
        return metrics


# --------------------------------------------------------------------------- choice


_UNLOCKED: dict[str, type[Schedule]] = {"error": DirectSchedule, "targets": TargetsSchedule}


def build_schedule(
    stage: Stage, transport: Transport, ctx: DistContext, *, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
    num_classes: int, microbatches: int, batch_size: int, pipeline_schedule: str = "gpipe",
    timer: NoTimer | None = None, channels_last: bool = False, engine_on_one_stage: bool = False,
) -> Schedule:
    """The step strategy for ``stage.rule`` on this process (see the module docstring);
    ``engine_on_one_stage``: a chained rule goes through torch's engine on one stage too."""
    common = dict(num_classes=num_classes, microbatches=microbatches, batch_size=batch_size, timer=timer,
                  channels_last=channels_last)
    signal = stage.rule.signal
    if signal in _UNLOCKED:
        return _UNLOCKED[signal](stage, transport, **common)
    if not (ctx.pipelined or engine_on_one_stage):
        return SerialSchedule(stage, transport, **common)
    return PipelinedSerialSchedule(
        stage, transport, ctx=ctx, in_shape=in_shape, out_shape=out_shape, schedule=pipeline_schedule, **common
    )
