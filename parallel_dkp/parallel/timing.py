"""Per-rank phase timers: forward compute, local update, waiting, communication, optimizer.

Timing is off unless asked for (``run.profile = true``, or ``parallel-dkp bench``): a normal
step gets :class:`NoTimer`, whose phases cost nothing. When on, every phase is also a
``torch.profiler.record_function`` range while a profiler records (it shows up in the trace).
A phase must cost next to nothing, or the timer slows what it times: on this 2-core CPU a
2-rank vit step (4 and 8 micro-batches) timed with a range and a generator per phase took
3-10 % longer than an untimed one, and 0-2 % with neither (interleaved steps of one process).
Then

* on the CPU, phases are wall-clock intervals (the host *is* the device there);
* on CUDA, phases are pairs of CUDA events recorded on the current stream, read back only
  when they have completed (``Event.query``) or when the summary is asked for, so the host
  never waits inside a step.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict

import torch

PHASES = ("forward", "update", "pipeline", "wait", "send", "reduce", "optim")
PHASE_LABELS = ("fwd", "upd", "pipe", "wait", "send", "red", "opt")  # short column titles
"""``update``: output backward and local updates (direct rules) or the serial backward;
``pipeline``: a whole step inside torch.distributed.pipelining (its phases are not split);
``wait``: blocked on a receive or on the error broadcast; ``send``: completing sends;
``reduce``: waiting for the gradient average over the stage's replicas (what of it did not
overlap with other work)."""




class NoTimer:
    """Phase timing switched off: every method is free."""

    enabled = False

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def start_step(self) -> None:
        pass

    def end_step(self) -> None:
        pass

    def summary(self, skip: int = 0) -> dict[str, float]:
        return {}


class _Timer(NoTimer):
    """Seconds per phase and per step, kept per step; subclasses say how an interval is taken."""

    enabled = True

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.step_seconds: list[float] = []

    def phase(self, name: str) -> "_Phase":
        return _Phase(self, name)

    def _begin(self):
        raise NotImplementedError

    def _end(self, name: str, start) -> None:
        raise NotImplementedError

    def summary(self, skip: int = 0) -> dict[str, float]:
        """Median seconds per step of each phase and of the whole step, after ``skip`` warm-up steps."""
        self._resolve(wait=True)
        steps = self.steps[skip:] or self.steps
        totals = self.step_seconds[skip:] or self.step_seconds
        if not totals:
            return {}
        out = {p: statistics.median(s.get(p, 0.0) for s in steps) for p in PHASES}
        out["step"] = statistics.median(totals)
        busy = sum(out[p] for p in ("forward", "update", "pipeline", "optim"))
        out["idle_fraction"] = max(0.0, 1.0 - busy / out["step"]) if out["step"] else 0.0
        return out

    def _resolve(self, wait: bool) -> None:
        pass


class WallClockTimer(_Timer):
    """Host wall-clock intervals: right on the CPU, where compute happens on the host."""

    def __init__(self) -> None:
        super().__init__()
        self._current: dict[str, float] = defaultdict(float)
        self._step_start = 0.0

    def _begin(self) -> float:
        return time.perf_counter()

    def _end(self, name: str, start: float) -> None:
        self._current[name] += time.perf_counter() - start

    def start_step(self) -> None:
        self._current = defaultdict(float)
        self._step_start = time.perf_counter()

    def end_step(self) -> None:
        self.step_seconds.append(time.perf_counter() - self._step_start)
        self.steps.append(dict(self._current))


class CudaEventTimer(_Timer):
    """CUDA events on the current stream; read back without ever blocking inside a step."""

    def __init__(self) -> None:
        super().__init__()
        self._current: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._step_start: torch.cuda.Event | None = None
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event, list]] = []

    @staticmethod
    def _event() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _begin(self) -> torch.cuda.Event:
        return self._event()

    def _end(self, name: str, start: torch.cuda.Event) -> None:
        self._current.append((name, start, self._event()))

    def start_step(self) -> None:
        self._current = []
        self._step_start = self._event()

    def end_step(self) -> None:
        self._pending.append((self._step_start, self._event(), self._current))
        self._resolve(wait=False)

    def _resolve(self, wait: bool) -> None:
        """Turn completed steps' events into seconds (all of them, after a sync, if ``wait``)."""
        if wait and self._pending:
            torch.cuda.synchronize()
        while self._pending and self._pending[0][1].query():
            start, end, phases = self._pending.pop(0)
            per_phase: dict[str, float] = defaultdict(float)
            for name, a, b in phases:
                per_phase[name] += a.elapsed_time(b) / 1e3
            self.steps.append(dict(per_phase))
            self.step_seconds.append(start.elapsed_time(end) / 1e3)


class _Phase:
    """One timed interval of a step (a plain object, not a generator: a phase is entered a few
    dozen times per step, and cheap entries keep the timer out of what it measures); also a
    range of the profiler's trace while a profiler records."""

    __slots__ = ("timer", "name", "start", "range")

    def __init__(self, timer: _Timer, name: str) -> None:
        self.timer, self.name, self.range = timer, name, None

    def __enter__(self) -> None:
        if torch._C._autograd._profiler_enabled():
            self.range = torch.profiler.record_function(self.name)
            self.range.__enter__()
        self.start = self.timer._begin()

    def __exit__(self, *exc) -> None:
        self.timer._end(self.name, self.start)
        if self.range is not None:
            self.range.__exit__(*exc)


def make_timer(device: torch.device, enabled: bool) -> NoTimer:
    """The timer for a run on ``device``: off, wall-clock (CPU) or CUDA events."""
    if not enabled:
        return NoTimer()
    return CudaEventTimer() if device.type == "cuda" else WallClockTimer()
