"""Per-rank phase timers: forward compute, local update, waiting, communication, optimizer."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

PHASES = ("forward", "update", "pipeline", "wait", "send", "optim")
PHASE_LABELS = ("fwd", "upd", "pipe", "wait", "send", "opt")  # short column titles
"""``update``: output backward and local updates (direct rules) or the serial backward;
``pipeline``: a whole step inside torch.distributed.pipelining (its phases are not split);
``wait``: blocked on a receive or on the error broadcast; ``send``: completing sends."""


class PhaseTimer:
    """Accumulates wall time per phase within a step; keeps one total per step."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.step_seconds: list[float] = []
        self._step_start = 0.0

    @contextmanager
    def phase(self, name: str):
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.current[name] += time.perf_counter() - start

    def start_step(self) -> None:
        self.current = defaultdict(float)
        self._step_start = time.perf_counter()

    def end_step(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.step_seconds.append(time.perf_counter() - self._step_start)
        self.steps.append(dict(self.current))

    def summary(self, skip: int = 0) -> dict[str, float]:
        """Median seconds per step of each phase and of the whole step, after ``skip`` warm-up steps."""
        steps = self.steps[skip:] or self.steps
        totals = self.step_seconds[skip:] or self.step_seconds
        if not totals:
            return {}
        out = {p: statistics.median(s.get(p, 0.0) for s in steps) for p in PHASES}
        out["step"] = statistics.median(totals)
        busy = sum(out[p] for p in ("forward", "update", "pipeline", "optim"))
        out["idle_fraction"] = max(0.0, 1.0 - busy / out["step"]) if out["step"] else 0.0
        return out
