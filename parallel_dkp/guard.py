"""Divergence guard: a non-finite loss or update, seen by every rank, stops (or skips) together.

Each step, after the gradients are accumulated and *before* the optimizer step, every rank
flags on the device which of its own blocks received a non-finite gradient (direct rules:
from a non-finite error or feedback; every rule: from a non-finite loss), and the last rank
also flags a non-finite loss. This is device work only; nothing waits.

What happens next depends on ``run.on_nonfinite``:

* ``"stop"`` (default): the flags are read at the loop's read points (every ``run.log_every``
  steps, before every checkpoint, at a stop and at each epoch's end) and the ranks agree with one
  small all-reduce on a CPU group. If any rank saw a non-finite value, every rank stops with
  :class:`NonFiniteError` naming the first bad step, the blocks and the rule. No checkpoint is
  written after a bad step, so the last checkpoint on disk is a good one.
* ``"skip_batch"``: the ranks agree after *every* step, before its optimizer step, and all of
  them drop that step's update (its loss is left out of the epoch's sums). This reads one flag
  back per step, a host synchronisation on GPUs. BatchNorm running statistics of the skipped
  batch are kept (the forward pass already made them). After ``MAX_CONSECUTIVE_SKIPS`` skipped
  steps in a row the run stops as with ``"stop"``.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from parallel_dkp.parallel.distributed import DistContext
from parallel_dkp.parallel.metrics import StepMetrics
from parallel_dkp.parallel.stage import Stage

MAX_CONSECUTIVE_SKIPS = 10


class NonFiniteError(FloatingPointError):
    """A non-finite loss, error or update; raised on every rank at the same step."""


class NonFiniteGuard:
    """Device-side flags of non-finite gradients per block (and loss), agreed on by all ranks."""

    def __init__(self, stage: Stage, ctx: DistContext, *, mode: str, timeout_s: float, rule: str) -> None:
        self.stage, self.ctx, self.mode, self.rule = stage, ctx, mode, rule
        self.device = next((p.device for p in stage.parameters()), torch.device("cpu"))
        # Every trainable parameter of the stage and the index of its block: the norms of all the
        # gradients come from one fused call, and one index_add gathers them per block.
        owned = [(p, index) for index, block in enumerate(stage.blocks) for p in block.parameters() if p.requires_grad]
        self._params = [p for p, _ in owned]
        self._owner = [index for _, index in owned]
        self._num_blocks = len(stage.blocks)
        self._present: tuple[bool, ...] | None = None  # which parameters had a gradient last step
        self._index: torch.Tensor | None = None  # their blocks' indices, on the device
        self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if ctx.distributed else None
        self._step = torch.zeros((), dtype=torch.long, device=self.device)  # on the device: no copies
        self._reset()
        self.skipped = 0
        self._consecutive = 0

    def _reset(self) -> None:
        self._bad_blocks = torch.zeros(self._num_blocks, dtype=torch.bool, device=self.device)
        self._bad_loss = torch.zeros((), dtype=torch.bool, device=self.device)
        self._first = torch.full((), -1, dtype=torch.long, device=self.device)

    def start_at(self, global_step: int) -> None:
        """The global step count before the next step (set when an epoch starts or resumes)."""
        self._step.fill_(global_step)

    # ------------------------------------------------------------------ every step

    def observe(self, metrics: StepMetrics) -> None:
        """Flag this step's non-finite gradients and loss. Device work only, no host wait."""
        self._step += 1  # in place, on the device
        bad_blocks = self._bad_per_block()
        if metrics.loss_sum is not None:
            bad_loss = ~torch.isfinite(metrics.loss_sum)
        else:
            bad_loss = torch.zeros_like(self._bad_loss)
        bad = bad_blocks.any() | bad_loss
        self._latest = bad
        # What the *first* bad step saw: later steps spread the NaNs everywhere.
        first_now = bad & (self._first < 0)
        self._first = torch.where(first_now, self._step, self._first)
        self._bad_blocks = torch.where(first_now, bad_blocks, self._bad_blocks)
        self._bad_loss = torch.where(first_now, bad_loss, self._bad_loss)

    def _bad_per_block(self) -> torch.Tensor:
        """Per block of the stage: whether any of its gradients holds a non-finite value."""
        present = tuple(p.grad is not None for p in self._params)
        if present != self._present:
            self._present = present
            self._index = torch.tensor([i for i, has in zip(self._owner, present) if has], device=self.device)
        grads = [p.grad for p, has in zip(self._params, present) if has]
        bad = torch.zeros(self._num_blocks, device=self.device)
        if grads:  # one fused call for all of them (as clip_grad_norm_ takes its norms)
            norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
            bad.index_add_(0, self._index, (~torch.isfinite(norms)).float())
        return bad > 0

    def skip_this_step(self) -> bool:
        """``skip_batch`` mode, after ``observe``: whether every rank drops this step's update.

        Reads the step's flag back (a host synchronisation) and agrees with the other ranks.
        """
        skip = self.agree(bool(self._latest))
        if not skip:
            self._consecutive = 0
            return False
        self.skipped += 1
        self._consecutive += 1
        if self._consecutive >= MAX_CONSECUTIVE_SKIPS:
            self.raise_if_bad(force=True)
        self._reset()  # a dropped step leaves no trace
        return True

    # ------------------------------------------------------------------ read points

    def report(self) -> dict | None:
        """What this rank saw at its first non-finite step (one host read), or ``None``."""
        first, bad_loss, *bad_blocks = torch.cat([self._first.view(1), self._bad_loss.view(1).long(),
                                                 self._bad_blocks.long()]).tolist()
        if first < 0:
            return None
        blocks = [index for index, bad in zip(self.stage.indices, bad_blocks) if bad]
        return {"rank": self.ctx.rank, "step": first, "blocks": blocks, "loss": bool(bad_loss)}

    def agree(self, bad: bool) -> bool:
        """Whether any rank says ``bad`` (a blocking all-reduce of one number on a CPU group)."""
        if self._group is None:
            return bad
        flag = torch.tensor([1.0 if bad else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag[0] > 0)

    def raise_if_bad(self, *, force: bool = False, last_checkpoint: str | None = None) -> None:
        """At a read point: if any rank saw a non-finite value, raise :class:`NonFiniteError` on
        every rank, with every rank's findings in the message."""
        mine = self.report()
        if not self.agree(mine is not None or force):
            return
        reports = [r for r in self.ctx.all_gather_object(mine) if r is not None]
        raise NonFiniteError(self._message(reports, last_checkpoint))

    def _message(self, reports: list[dict], last_checkpoint: str | None) -> str:
        if reports:
            step = min(r["step"] for r in reports)
            reports = [r for r in reports if r["step"] == step]
            blocks = sorted({b for r in reports for b in r["blocks"]})
            where = f"block(s) {', '.join(map(str, blocks))} got non-finite gradients" if blocks else ""
            if any(r["loss"] for r in reports):
                where = "the loss became non-finite" + (f" and {where}" if where else "")
            found = f"at step {step}, {where} under rule {self.rule}"
        else:
            found = f"{self.skipped} steps in a row were skipped under rule {self.rule}"
        kept = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
        return (
            f"training diverged: {found}{kept}; lower optim.forward.lr or optim.feedback.lr, keep "
            "model.batch_norm=true (DFA/DKP need it), or set run.on_nonfinite=skip_batch to drop such steps"
        )
