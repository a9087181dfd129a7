"""The runtime on one process: device placement, host synchronisation, phase timers, bench configs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import CONV_INPUT, TINY_CONV, make_blocks, make_stage

import parallel_dkp.train as train_module
from parallel_dkp.config import load_config
from parallel_dkp.models import block_output_shapes
from parallel_dkp.parallel.costs import choose_partition, measure_block_costs
from parallel_dkp.parallel.distributed import DistContext
from parallel_dkp.parallel.metrics import StepMetrics
from parallel_dkp.parallel.timing import NoTimer, WallClockTimer
from parallel_dkp.rules import RULES

META = torch.device("meta")


class _PretendTwoRanks(DistContext):
    """Rank 0 of a two-rank world whose collectives are the identity: the partition code runs
    its distributed path (measure, agree, balance) without a process group."""

    def broadcast_object(self, obj, src: int = 0):
        return obj


def _tiny_config(rule="dkp", *extra):
    return load_config(None, [
        f"rule.name={rule}", "model.name=conv2", "data.name=synthetic", "data.synthetic_shape=[1, 8, 8]",
        "data.synthetic_size=128", "data.batch_size=16", "parallel.microbatches=2", "run.progress=false",
        *extra,
    ])


# --------------------------------------------------------------------------- device placement


def test_partition_is_measured_on_the_blocks_own_device():
    """Pinpoints the multi-GPU start-up crash: the balanced partition timed the blocks on
    ``ctx.device`` while they still sat elsewhere. Here ``ctx.device`` is the CPU and the
    blocks are on ``meta``; the measurement must follow the blocks."""
    blocks = make_blocks(TINY_CONV, CONV_INPUT).to(META)
    ctx = _PretendTwoRanks(rank=0, world_size=2, device=torch.device("cpu"))
    partition = choose_partition((), ctx, blocks=blocks, input_shape=CONV_INPUT, microbatch=4)
    assert len(partition) == 2 and sum(len(r) for r in partition) == len(blocks)
    assert len(measure_block_costs(blocks, input_shape=CONV_INPUT, batch=4)) == len(blocks)


def test_build_job_moves_the_network_to_the_device_before_measuring_or_adapting(monkeypatch):
    """Pinpoints blocks being measured (or given feedback) before they reach the rank's device:
    with ``ctx.device = meta`` everything the partition sees and the stage holds is on meta."""
    seen = []
    real = train_module.choose_partition

    def spy(counts, ctx, *, blocks, **kwargs):
        seen.extend({p.device for p in blocks.parameters()})
        return real(counts, ctx, blocks=blocks, **kwargs)

    monkeypatch.setattr(train_module, "choose_partition", spy)
    job = train_module.build_job(_tiny_config("kp"), DistContext(device=META))
    assert seen == [META]
    assert {t.device for t in (*job.stage.parameters(), *job.stage.buffers())} == {META}


@pytest.mark.parametrize("rule", list(RULES))
def test_every_rule_creates_its_feedback_on_the_modules_device(rule):
    """Pinpoints a rule that creates tensors on a fixed device instead of its module's: every
    feedback matrix (and every output shape probe) must follow a network placed on meta."""
    blocks = make_blocks(TINY_CONV, CONV_INPUT).to(META)
    assert block_output_shapes(blocks, CONV_INPUT)[0] == (32, 6, 6)
    stage = make_stage(rule, TINY_CONV, CONV_INPUT, blocks=blocks)
    assert {p.device for p in stage.parameters()} == {META}


# --------------------------------------------------------------------------- no host sync in a step


class _SyncCounter:
    """Counts every way Python code can make the host wait for a device's result."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for owner, name in ((torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "__bool__"),
                            (torch.Tensor, "__float__"), (torch.Tensor, "__int__"), (torch.cuda, "synchronize")):
            monkeypatch.setattr(owner, name, self._counting(name, getattr(owner, name)))

    def _counting(self, name, original):
        def wrapper(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)
        return wrapper


@pytest.mark.parametrize("rule", list(RULES))
def test_training_steps_never_read_back_from_the_device(rule, monkeypatch):
    """Pinpoints a host synchronisation inside a training step (``.item()``, ``tolist``, a tensor
    in an ``if``, ``cuda.synchronize``): on a GPU each one drains the queue the pipeline lives on."""
    job = train_module.build_job(_tiny_config(rule), DistContext())
    batches = iter(job.train_loader)
    train_module.train_step(job, *next(batches))  # warm-up outside the count
    counter = _SyncCounter(monkeypatch)
    for _ in range(3):
        train_module.train_step(job, *next(batches))
    assert counter.calls == []


def test_device_values_are_read_once_per_log_interval(monkeypatch):
    """Pinpoints values read back from the device more often than ``run.log_every`` asks (or
    never): 7 steps with log_every=3 read at steps 3, 6 and 7 (the epoch's end) - the running
    sums for the progress bar and the divergence guard's flags, three times each, no more."""
    from rich.progress import Progress

    from parallel_dkp.guard import NonFiniteGuard

    job = train_module.build_job(_tiny_config("dkp", "run.log_every=3", "run.max_steps=7", "run.progress=true"),
                                 DistContext())
    reads, checks = [], []
    real_read, real_report = StepMetrics.read, NonFiniteGuard.report
    monkeypatch.setattr(StepMetrics, "read", lambda self: reads.append(self.count) or real_read(self))
    monkeypatch.setattr(NonFiniteGuard, "report", lambda self: checks.append(1) or real_report(self))
    with Progress(disable=True) as progress:
        total, _, stopped = train_module.train_one_epoch(job, 1, progress=progress)
    assert not stopped
    assert reads == [3 * 16, 6 * 16, 7 * 16]
    assert len(checks) == 3
    loss_sum, correct, count = real_read(total)
    assert count == 7 * 16 and 0 <= correct <= count and loss_sum > 0


def test_step_metrics_sum_like_the_per_example_loss():
    """Pinpoints device-side sums that drift from the plain cross-entropy and accuracy."""
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(10, 4, generator=g), torch.randint(0, 4, (10,), generator=g)
    metrics = StepMetrics()
    metrics.add(logits[:6], y[:6])
    other = StepMetrics()
    other.add(logits[6:], y[6:])
    metrics += other
    loss_sum, correct, count = metrics.read()
    assert loss_sum == pytest.approx(torch.nn.functional.cross_entropy(logits, y, reduction="sum").item())
    assert (correct, count) == ((logits.argmax(1) == y).sum().item(), 10)


def test_step_metrics_take_the_sums_of_a_steps_microbatches_at_once(monkeypatch):
    """Pinpoints per-micro-batch metric work on the last stage's path (each small op there
    delays the micro-batches after it): the micro-batches of a step are summed in one go, when
    the sums are first asked for, and later adds join the sums already taken."""
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(12, 5, generator=g), torch.randint(0, 5, (12,), generator=g)
    calls = []
    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    metrics = StepMetrics()
    for part in range(4):
        metrics.add(logits[3 * part:3 * part + 3], y[3 * part:3 * part + 3])
    assert calls == [] and metrics.count == 12
    assert metrics.loss_sum.item() == pytest.approx(real(logits[:12], y, reduction="sum").item())
    assert calls == [1]
    metrics.add(logits[:2], y[:2])  # after the sums were taken
    loss_sum, correct, count = metrics.read()
    assert calls == [1, 1] and count == 14
    want = real(logits, y, reduction="sum") + real(logits[:2], y[:2], reduction="sum")
    assert loss_sum == pytest.approx(want.item())
    assert correct == (logits.argmax(1) == y).sum().item() + (logits[:2].argmax(1) == y[:2]).sum().item()


# --------------------------------------------------------------------------- phase timers


def test_phase_timing_is_off_unless_asked_for():
    """Pinpoints timers that run (and, on GPUs, synchronise) in a normal run; with
    ``run.profile`` the CPU timer records every phase of every step."""
    plain = train_module.build_job(_tiny_config("dkp"), DistContext())
    assert isinstance(plain.timer, NoTimer) and not plain.timer.enabled
    profiled = train_module.build_job(_tiny_config("dkp", "run.profile=true"), DistContext())
    assert isinstance(profiled.timer, WallClockTimer)
    for x, y in list(profiled.train_loader)[:3]:
        profiled.timer.start_step()
        train_module.train_step(profiled, x, y)
        profiled.timer.end_step()
    summary = profiled.timer.summary()
    assert summary["step"] > 0 and summary["forward"] > 0 and summary["update"] > 0 and summary["optim"] > 0
    assert summary["forward"] + summary["update"] + summary["optim"] <= summary["step"] * 1.01


def test_phases_are_profiler_ranges_only_while_a_profiler_records(monkeypatch):
    """Pinpoints a profiler range entered in every phase of every benchmarked step (its cost was
    3-10 % of a 2-rank vit step here), or phases missing from a profiler's trace."""
    from torch.profiler import ProfilerActivity, profile

    timer = WallClockTimer()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with timer.phase("update"):
            torch.ones(4).sum()
    assert "update" in {event.key for event in prof.key_averages()}

    def no_range(name):
        raise AssertionError(f"record_function({name!r}) entered with no profiler recording")

    monkeypatch.setattr(torch.profiler, "record_function", no_range)
    timer.start_step()
    with timer.phase("forward"):
        torch.ones(4).sum()
    timer.end_step()
    assert timer.summary()["forward"] > 0


# --------------------------------------------------------------------------- bench


def test_bench_applies_each_rules_own_config_section(tmp_path):
    """Pinpoints ``bench`` timing every rule with the base config: each rule's
    ``[per_rule.<rule>]`` section must apply, through the same loader as ``train``."""
    config = tmp_path / "exp.toml"
    config.write_text(
        '[model]\nname = "conv2"\n[data]\nname = "synthetic"\nsynthetic_shape = [1, 8, 8]\nsynthetic_size = 64\n'
        'batch_size = 16\n[per_rule.bp.optim.forward]\nlr = 0.1\n'
        '[per_rule.dkp.optim.feedback]\nname = "adam"\nlr = 0.003\n'
    )
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "parallel_dkp", "bench", "--config", str(config), "--rules", "dkp,bp",
         "--steps", "1", "--warmup", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    configs = json.loads(out.read_text())["by_microbatches"]["1"]["configs"]
    assert configs["bp"]["optim"]["forward"]["lr"] == 0.1
    assert configs["dkp"]["optim"]["forward"]["lr"] == 0.01
    assert (configs["dkp"]["optim"]["feedback"]["name"], configs["dkp"]["optim"]["feedback"]["lr"]) == ("adam", 0.003)
    assert configs["bp"]["optim"]["feedback"]["name"] == "sgd"


# --------------------------------------------------------------------------- parallel.messages = false


def test_a_local_transport_moves_nothing_and_hands_out_fixed_finite_tensors(monkeypatch):
    """Pinpoints the no-message control sending after all, or feeding a stage garbage (an
    uninitialised buffer can hold NaNs, which the guard would stop the run for) or tensors whose
    shape or layout differ from what the real transport delivers."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from parallel_dkp.parallel.transport import LocalTransport

    for name in ("isend", "irecv", "send", "recv", "broadcast"):
        monkeypatch.setattr(dist, name, lambda *a, _name=name, **k: pytest.fail(f"LocalTransport called dist.{_name}"))
    ctx = SimpleNamespace(device=torch.device("cpu"), backend="gloo", stage=1, pipelined=False,
                          pipeline_rank=lambda stage: stage)
    middle = LocalTransport(ctx, is_first=False, is_last=False, in_shape=(3, 4, 5), timeout_s=1, channels_last=True)
    x = middle.recv_activation(2, 0, post_next=True)
    assert x.shape == (2, 3, 4, 5) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(x).all() and x.abs().sum() > 0
    assert middle.recv_activation(2, 0) is x and torch.equal(middle.recv_activation(2, 0), x)  # filled once
    middle.send_activation(torch.ones(2, 6))
    middle.wait_sends()
    errors = [torch.full((2, 10), float("nan")) for _ in range(2)]
    assert all(middle.broadcast_error(e) is None for e in errors)
    assert torch.isfinite(errors[0]).all() and torch.equal(errors[0], errors[1])
    last = LocalTransport(ctx, is_first=False, is_last=True, in_shape=(6,), timeout_s=1)
    e = torch.arange(20.0).view(2, 10)
    assert last.broadcast_error(e) is None and torch.equal(e, torch.arange(20.0).view(2, 10))  # its own e stays


def test_no_messages_is_refused_for_the_chained_rules():
    with pytest.raises(ValueError, match="parallel.messages = false is for the backward-unlocked rules"):
        train_module.build_job(_tiny_config("bp", "parallel.messages=false"), DistContext())
