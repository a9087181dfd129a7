"""Alignment measurements: how close a rule's learning signal is to backpropagation's.

Taken every ``analysis.align_every`` steps (free when 0), on the step's own batch, inside the
step (after the rule's gradients are accumulated, before the optimizer step), by each rank on
its own blocks; the last rank writes the rows to ``alignment.jsonl``:

``fig2_angle`` (dfa, dkp, drtp; paper Fig. 2)
    The angle between ``a_j · B_jᵀ`` (the logits a hidden block's direct feedback "predicts"
    from its output ``a_j``) and the network's logits ``h_k``. The paper does not say how it
    averages over the batch; we take the angle between the two ``K``-vectors of each example and
    average the angles (in degrees) over the examples, so that a few large logits cannot hide
    the others.
``grad_angle`` (every rule)
    The angle between the block's update (all its trained parameters' gradients, flattened
    together) and the true backprop gradient on the same batch and micro-batches, from a shadow
    BP pass (BN running statistics and the rule's gradients are restored afterwards). 0 for bp.
``feedback_angle`` (kp, dkp)
    The angle, and ``norm_ratio = |B| / |W|``, between a learned feedback matrix and the forward
    weight it comes to mirror: KP's ``B`` against its own layer's ``W``; DKP's last hidden
    block's ``B_{L-1}`` against the output layer's ``W_L`` (paper §2.4-2.5), fetched from the
    next rank when the output block lives there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel_dkp.rules import DirectBlock
from parallel_dkp.rules.feedback_layers import FeedbackConv2d, FeedbackLinear, true_gradients


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle in degrees between two tensors taken as flat vectors (90 when either is zero)."""
    return float(_angles_deg(a.detach().flatten().double()[None], b.detach().flatten().double()[None])[0])


def mean_row_angle_deg(a_NK: torch.Tensor, b_NK: torch.Tensor) -> float:
    """Mean over rows (examples) of the angle in degrees between matching rows; rows where either
    side is zero (an example whose ReLUs are all off) have no angle and are left out."""
    a_NK, b_NK = a_NK.detach().double(), b_NK.detach().double()
    defined = (a_NK.norm(dim=1) > 0) & (b_NK.norm(dim=1) > 0)
    if not bool(defined.any()):
        return 90.0
    return float(_angles_deg(a_NK[defined], b_NK[defined]).mean())


def _angles_deg(a_NK: torch.Tensor, b_NK: torch.Tensor) -> torch.Tensor:
    """Row-wise angles by Kahan's formula ``2·atan2(|a|b| - b|a||, |a|b| + b|a||)``, accurate near
    0° and 180° where ``acos`` of a cosine loses half the digits; 90° where a row is zero."""
    norm_a, norm_b = a_NK.norm(dim=1, keepdim=True), b_NK.norm(dim=1, keepdim=True)
    u, v = a_NK * norm_b, b_NK * norm_a
    angles = torch.rad2deg(2 * torch.atan2((u - v).norm(dim=1), (u + v).norm(dim=1)))
    zero = (norm_a[:, 0] == 0) | (norm_b[:, 0] == 0)
    return torch.where(zero, torch.full_like(angles, 90.0), angles)


def _body(block: nn.Module) -> nn.Module:
    return block.block if isinstance(block, DirectBlock) else block


def _trained(block: nn.Module) -> list[nn.Parameter]:
    """The forward parameters of a block that the rule trains (feedback excluded)."""
    from parallel_dkp.rules.base import forward_parameters

    return forward_parameters(block)


class AlignmentProbe:
    """Measures the alignment rows of one step for one stage (see the module docstring)."""

    def __init__(self, job) -> None:
        self.job = job
        self.stage, self.rule, self.transport = job.stage, job.stage.rule, job.schedule.transport
        self.ctx = job.ctx

    def measure(self, x: torch.Tensor, y: torch.Tensor, *, step: int, epoch: int) -> list[dict]:
        """Rows for this rank's blocks. Collective: every rank calls it at the same step."""
        stage = self.stage
        params = {index: _trained(block) for index, block in zip(stage.indices, stage.blocks)}
        rule_grads = {index: [None if p.grad is None else p.grad.clone() for p in ps] for index, ps in params.items()}
        # Everything the shadow pass touches, restored afterwards: every gradient (learned
        # feedback's too) and every buffer (BN running statistics).
        saved_grads = [(p, None if p.grad is None else p.grad.clone()) for p in stage.parameters()]
        buffers = {name: b.clone() for name, b in stage.named_buffers()}
        was_training = stage.training
        try:
            hidden, logits = self._shadow_backprop(x, y)
            rows = self._grad_rows(params, rule_grads)
            rows += self._fig2_rows(hidden, logits)
            rows += self._feedback_rows()
        finally:
            for p, grad in saved_grads:
                p.grad = grad
            with torch.no_grad():
                for name, b in stage.named_buffers():
                    b.copy_(buffers[name])
            stage.train(was_training)
        base = {"epoch": epoch, "step": step, "rule": self.rule.name}
        return [{**base, **row} for row in rows]

    # ------------------------------------------------------------------ shadow backprop

    def _shadow_backprop(self, x, y):
        """True BP gradients on this step's micro-batches, across ranks when the network is split.

        Returns the hidden blocks' outputs ``{index: a_j [N, ...]}`` and (on the last rank) the
        logits ``[N, K]``, both detached and concatenated over micro-batches.
        """
        stage, transport, schedule = self.stage, self.transport, self.job.schedule
        stage.zero_grad(set_to_none=True)
        stage.train()
        x, y = schedule._start(x, y)
        total = len(y)
        hidden: dict[int, list[torch.Tensor]] = {}
        logits_all = []
        with true_gradients():
            for x_m, y_m in zip(x.chunk(schedule.microbatches), y.chunk(schedule.microbatches)):
                inp = x_m if stage.is_first else transport.recv_activation(len(y_m)).clone().requires_grad_(True)
                out = inp
                for index, block in zip(stage.indices, stage.blocks):
                    out = _body(block)(out)
                    if index < stage.num_blocks - 1:
                        hidden.setdefault(index, []).append(out.detach())
                if stage.is_last:
                    logits_all.append(out.detach())
                    (F.cross_entropy(out, y_m, reduction="sum") / total).backward()
                else:
                    transport.send_blocking(out.detach())
                    out.backward(transport.recv_backward(tuple(out.shape)))
                if not stage.is_first:
                    transport.send_backward(inp.grad if inp.grad is not None else torch.zeros_like(inp))
        hidden_cat = {index: torch.cat(outs) for index, outs in hidden.items()}
        return hidden_cat, torch.cat(logits_all) if logits_all else None

    # ------------------------------------------------------------------ the three metrics

    def _grad_rows(self, params, rule_grads) -> list[dict]:
        rows = []
        for index, ps in params.items():
            pairs = [(g, p.grad) for p, g in zip(ps, rule_grads[index]) if g is not None and p.grad is not None]
            if not pairs:
                continue  # nothing trained here (bp_fc_only's frozen blocks)
            rule = torch.cat([g.flatten() for g, _ in pairs])
            true = torch.cat([t.flatten() for _, t in pairs])
            rows.append({"block": index, "metric": "grad_angle", "value": angle_deg(rule, true), "norm_ratio":
                         float(rule.norm() / true.norm()) if true.norm() > 0 else None})
        return rows

    def _fig2_rows(self, hidden, logits) -> list[dict]:
        if not self.rule.backward_unlocked:
            return []
        logits = self._logits_everywhere(hidden, logits)
        rows = []
        for index, block in zip(self.stage.indices, self.stage.blocks):
            if block.feedback is None:
                continue
            estimate = hidden[index].flatten(1) @ block.feedback.weight.detach().T
            rows.append({"block": index, "metric": "fig2_angle", "value": mean_row_angle_deg(estimate, logits),
                         "norm_ratio": None})
        return rows

    def _logits_everywhere(self, hidden, logits) -> torch.Tensor:
        """The last rank's logits on every rank (one broadcast on the error group)."""
        if not self.ctx.pipelined:
            return logits
        if logits is None:
            batch = next(iter(hidden.values())).shape[0] if hidden else self.job.schedule.batch_size
            logits = torch.empty(batch, self.job.info.num_classes, device=self.job.schedule.device)
        handle = self.transport.broadcast_error(logits)
        handle.wait()
        return logits

    def _feedback_rows(self) -> list[dict]:
        rows = []
        if self.rule.name == "kp":
            for index, block in zip(self.stage.indices, self.stage.blocks):
                for layer in block.modules():
                    if isinstance(layer, (FeedbackLinear, FeedbackConv2d)):
                        rows.append(self._pair_row(index, layer.feedback.weight, layer.weight))
        elif self.rule.name == "dkp":
            w_out = self._output_weight()
            for index, block in zip(self.stage.indices, self.stage.blocks):
                if index == self.stage.num_blocks - 2 and w_out is not None:
                    rows.append(self._pair_row(index, block.feedback.weight, w_out))
        return rows

    def _output_weight(self) -> torch.Tensor | None:
        """``W_L`` where the last hidden block lives (sent over when the output block is alone)."""
        stage, last = self.stage, self.stage.num_blocks - 1
        output_alone = stage.is_last and stage.indices.start == last
        holds_last_hidden = last - 1 in stage.indices
        if output_alone and self.ctx.pipelined:
            self.transport.send_backward(_body(stage.blocks[-1])[-1].weight.detach())
            return None
        if holds_last_hidden and not stage.is_last:
            # W_L has the shape of B_{L-1}: [K, D_{L-1}].
            return self.transport.recv_backward(tuple(stage.blocks[-1].feedback.weight.shape))
        if holds_last_hidden:
            return _body(stage.blocks[-1])[-1].weight.detach()
        return None

    @staticmethod
    def _pair_row(index: int, feedback: torch.Tensor, weight: torch.Tensor) -> dict:
        return {"block": index, "metric": "feedback_angle", "value": angle_deg(feedback, weight),
                "norm_ratio": float(feedback.detach().norm() / weight.detach().norm())}
