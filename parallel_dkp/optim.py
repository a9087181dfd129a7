"""Separate optimizers (and schedulers) for forward weights and feedback matrices (paper §3.1)."""

from __future__ import annotations

import re
import warnings
from typing import Sequence

import torch
from torch import nn

from parallel_dkp.config import OptimConfig, OptimizerConfig


def build_optimizer(params: Sequence[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer | None:
    params = list(params)
    if not params:
        return None
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer {cfg.name!r} is not sgd or adam")


class Optimizers:
    """The forward and the feedback optimizer of one stage, stepped together.

    Schedulers (StepLR) advance once per epoch. ``state_dict`` captures both optimizers and
    both schedulers, so a stage can be checkpointed and restored on its own.
    """

    def __init__(self, *, forward: Sequence[nn.Parameter], feedback: Sequence[nn.Parameter], cfg: OptimConfig):
        self.forward = build_optimizer(forward, cfg.forward)
        self.feedback = build_optimizer(feedback, cfg.feedback)
        self.schedulers = {
            side: torch.optim.lr_scheduler.StepLR(opt, step_size=side_cfg.step_size, gamma=side_cfg.gamma)
            for side, opt, side_cfg in (
                ("forward", self.forward, cfg.forward), ("feedback", self.feedback, cfg.feedback)
            )
            if opt is not None and side_cfg.scheduler == "step"
        }

    def _optimizers(self):
        return [o for o in (self.forward, self.feedback) if o is not None]

    def zero_grad(self) -> None:
        for opt in self._optimizers():
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self._optimizers():
            opt.step()

    def epoch_end(self) -> None:
        with warnings.catch_warnings():
            # A run resumed exactly at an epoch's end steps its schedulers before any optimizer
            # step of this process, which torch warns about; the order is right here.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            for scheduler in self.schedulers.values():
                scheduler.step()

    def state_dict(self) -> dict:
        return {
            "forward": self.forward.state_dict() if self.forward else None,
            "feedback": self.feedback.state_dict() if self.feedback else None,
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        for side in ("forward", "feedback"):
            opt = getattr(self, side)
            if opt is not None and state.get(side) is not None:
                opt.load_state_dict(state[side])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
