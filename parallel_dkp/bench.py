"""Side-by-side step times of several rules (``parallel-dkp bench``), on one process or many.

Rules are interleaved step by step on the same batch, so drifting machine load hits all of
them alike; medians after warm-up are reported, with each rule's ratio to the first rule.
Under torchrun every rank runs the same interleaved sequence; each rank also reports the
median time of each phase (forward, update, wait, send, optimizer) and its idle fraction.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from rich.console import Console
from rich.table import Table

from parallel_dkp.config import Config, to_dict
from parallel_dkp.parallel.distributed import DistContext
from parallel_dkp.parallel.timing import PHASES
from parallel_dkp.train import build_job, train_step

ConfigFor = Callable[[str, Sequence[str]], Config]
"""``config_for(rule, extra_overrides)``: the run config of one rule, from the same loader as
``train`` (so ``[per_rule.<rule>]`` sections and validation apply to every rule)."""


def bench_rules(config_for: ConfigFor, rules: list[str], ctx: DistContext, *, steps: int = 20,
                warmup: int = 3) -> dict:
    """Median seconds per training step of each rule with the same model, batch and partition."""
    # A balanced partition is measured, and measurements vary: decide it once, for every rule.
    first = build_job(config_for(rules[0], ()), ctx, profile=True)
    same_partition = (f"parallel.partition={[len(r) for r in first.partition]}",)
    jobs = {rules[0]: first, **{rule: build_job(config_for(rule, same_partition), ctx, profile=True)
                                for rule in rules[1:]}}
    x, y = next(iter(first.train_loader))
    samples: dict[str, list[float]] = {rule: [] for rule in rules}
    for step in range(warmup + steps):
        for rule, job in jobs.items():
            ctx.barrier()  # every rule's step starts together on all ranks
            _sync(ctx)
            job.timer.start_step()
            start = time.perf_counter()
            train_step(job, x, y)
            job.timer.end_step()
            _sync(ctx)  # a benchmark waits for the device at step boundaries, never inside a step
            if step >= warmup:
                samples[rule].append(time.perf_counter() - start)
    base = statistics.median(samples[rules[0]])
    phases = {rule: job.timer.summary(skip=warmup) for rule, job in jobs.items()}
    per_rank = ctx.all_gather_object(phases)
    cfg = first.cfg
    return {
        "machine": _machine(ctx),
        "model": cfg.model.name, "data": cfg.data.name, "batch_size": cfg.data.batch_size,
        "microbatches": cfg.parallel.microbatches, "world_size": ctx.world_size,
        "partition": [[r.start, r.stop] for r in first.partition], "schedule": cfg.parallel.schedule,
        "steps": steps, "warmup": warmup,
        "rules": {rule: {"median_s": statistics.median(s), f"ratio_to_{rules[0]}": statistics.median(s) / base,
                         "samples_s": s} for rule, s in samples.items()},
        "phases_per_rank": {rule: [rank_phases[rule] for rank_phases in per_rank] for rule in rules},
        "configs": {rule: to_dict(job.cfg) for rule, job in jobs.items()},
    }


def _sync(ctx: DistContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()


def _machine(ctx: DistContext) -> dict:
    return {
        "node": platform.node(), "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads_per_rank": torch.get_num_threads(), "device": str(ctx.device),
        "device_name": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        "backend": ctx.backend,
    }


def print_bench(result: dict, console: Console) -> None:
    rules = list(result["rules"])
    m = result["machine"]
    table = Table(title=(
        f"{result['model']} on {result['data']}, batch {result['batch_size']}, M={result['microbatches']}, "
        f"{result['world_size']} rank(s) {result['partition']}, {m['device_name']}, "
        f"{m['threads_per_rank']} thread(s)/rank; "
        f"median of {result['steps']} steps after {result['warmup']} warm-up"))
    table.add_column("rule")
    table.add_column("step (ms)", justify="right")
    table.add_column(f"/ {rules[0]}", justify="right")
    for rank in range(result["world_size"]):
        table.add_column(f"rank {rank} idle", justify="right")
    for rule, row in result["rules"].items():
        idle = [p.get("idle_fraction") for p in result["phases_per_rank"][rule]]
        serial_pipeline = any(p.get("pipeline") for p in result["phases_per_rank"][rule])
        table.add_row(rule, f"{row['median_s'] * 1e3:.1f}", f"{row[f'ratio_to_{rules[0]}']:.3f}",
                      *("n/a" if serial_pipeline or i is None else f"{i:.0%}" for i in idle))
    console.print(table)
    phase_table = Table(title="median ms per step and phase, per rank")
    for col in ("rule", "rank", *PHASES):
        phase_table.add_column(col, justify="right")
    for rule in rules:
        for rank, p in enumerate(result["phases_per_rank"][rule]):
            phase_table.add_row(rule, str(rank), *(f"{p.get(ph, 0.0) * 1e3:.1f}" for ph in PHASES))
    console.print(phase_table)


def write_bench(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
