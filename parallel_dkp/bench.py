"""``parallel-dkp bench``: side-by-side step times, and the unlocking benchmark.

Two modes, one measurement core (:func:`measure_world`):

* **this world** (no ``--ranks``): the variants (``bp``, ``dkp``, ``bp@1f1b``, ...) are
  interleaved step by step on the same batch and partition, so drifting machine load hits all of
  them alike; medians after warm-up, each variant's ratio to the first. Under torchrun every rank
  runs the same sequence and reports its phases (forward, update, wait, send, optimizer), idle
  fraction and peak memory; a step's time is the slowest rank's.
* **unlocking** (``--ranks 1,2 [--microbatches 4,8]``): on the CPU it launches its own gloo
  worlds, one thread per rank unless told otherwise, and measures (:func:`run_unlocking`)

  - one device (one process, all cores, M = 1): bp, dfa, dkp;
  - for each M: one rank at the per-rank thread budget (dkp, dfa, bp, and every block's
    phases for the cost model; bp also through torch's engine on one stage, GPipe and 1F1B,
    which gives the cost model the engine's own host time), one rank using all the cores
    (dkp: so that nobody mistakes a thread-starved baseline for a speed-up), and each N > 1
    ranks: dkp and dfa through our runtime, bp through torch.distributed.pipelining GPipe and
    1F1B, all on one partition, and between them dkp and bp on rank 0 alone (the unlocking
    speed-up's one-rank baseline, taken at the same moments; the one-rank world, minutes away,
    calibrates the cost model) and then on every rank at once, without messages (the machine's
    parallel ceiling);
  - with ``--replicas 2``: each N as N stages x 2 data-parallel replicas (dkp and bp), every
    replica on a batch of the configured size (weak scaling: the global batch grows with the
    replicas), where the machine has a core for every rank's threads;

  then the ratios, the cost model's predictions and its error against every measured
  configuration. Under torchrun (GPUs) it measures one rank (rank 0 alone) and the whole world.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from rich.console import Console
from rich.table import Table

from parallel_dkp.config import Config, to_dict
from parallel_dkp.parallel import costmodel
from parallel_dkp.parallel.distributed import DistContext
from parallel_dkp.parallel.timing import PHASES, make_timer
from parallel_dkp.rules import RULES
from parallel_dkp.train import build_job, train_step


@dataclass(frozen=True)
class Variant:
    """A rule, for a chained rule on several ranks the pipeline schedule, and optionally the
    memory layout against the run's or no messages: ``bp@1f1b``, ``bp@1f1b:nchw``, ``dkp:local``."""

    rule: str
    schedule: str = ""
    layout: str = ""
    """``nchw``: 4-D weights and activations in the default layout, whatever ``run.channels_last``
    says (a baseline that runs faster that way is measured that way too)."""
    messages: bool = True
    """``False`` (``:local``): the stages exchange nothing (``parallel.messages = false``), a
    control that times what the stages' compute alone allows."""

    @classmethod
    def parse(cls, text: str) -> "Variant":
        head, _, option = text.strip().partition(":")
        rule, _, schedule = head.partition("@")
        if rule not in RULES:
            raise ValueError(f"bench variant {text!r}: {rule!r} is not a rule ({', '.join(RULES)})")
        if schedule and schedule not in ("gpipe", "1f1b"):
            raise ValueError(f"bench variant {text!r}: the schedule after @ must be gpipe or 1f1b")
        if schedule and RULES[rule].signal != "chain":
            raise ValueError(f"bench variant {text!r}: {rule} is backward-unlocked; @{schedule} is for the "
                             "chained rules (bp, bp_fc_only, fa, kp) that run through torch's pipelining")
        if option not in ("", "nchw", "local"):
            raise ValueError(f"bench variant {text!r}: after : comes nchw (the default layout) or local (no messages)")
        if option == "local" and RULES[rule].signal == "chain":
            raise ValueError(f"bench variant {text!r}: :local is for the backward-unlocked rules (dfa, dkp, drtp)")
        return cls(rule, schedule, "nchw" if option == "nchw" else "", option != "local")

    @property
    def name(self) -> str:
        name = f"{self.rule}@{self.schedule}" if self.schedule else self.rule
        option = self.layout or ("" if self.messages else "local")
        return f"{name}:{option}" if option else name

    @property
    def overrides(self) -> tuple[str, ...]:
        # a named schedule runs through torch's engine on any number of stages, one included
        engine = (f"parallel.schedule={self.schedule}", "parallel.engine_on_one_stage=true") if self.schedule else ()
        return ((f"rule.name={self.rule}",) + engine + (("run.channels_last=false",) if self.layout else ())
                + (() if self.messages else ("parallel.messages=false",)))

    def method(self, default_schedule: str) -> costmodel.Method:
        signal = RULES[self.rule].signal
        if signal == "error":
            return "direct"
        if signal == "targets":
            return "targets"
        return self.schedule or default_schedule  # type: ignore[return-value]


def parse_list(text: str, what: str, *, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{what} {text!r}: give comma-separated whole numbers >= {minimum}, e.g. {what} 1,2")
    return list(dict.fromkeys(values))


ConfigFor = Callable[[Sequence[str]], Config]
"""``config_for(extra_overrides)``: a run config from the same loader as ``train`` (so
``[per_rule.*]`` sections and validation apply to every variant)."""


# --------------------------------------------------------------------------- one world


def measure_world(config_for: ConfigFor, variants: list[Variant], ctx: DistContext, *, microbatches: list[int],
                  steps: int, warmup: int, block_costs: bool = False, link: bool = False,
                  alone: Sequence[Variant] = ()) -> dict:
    """Median step time of each variant at each M on this world, interleaved step by step.

    ``alone``: rules also stepped on rank 0 alone, between the world's steps (the other ranks wait
    at the next barrier): the one-rank baseline of the unlocking speed-up, measured at the same
    moments as the world it is compared with (under each M's ``"alone"``). Each is then stepped
    on every rank at once, each rank with the whole network and no messages (``"together"``, a
    step's time the slowest rank's): what N busy ranks of this machine do to one another, the
    ceiling of any N-rank scheme at that time (:func:`assemble`'s ``*_parallel_ceiling``).

    With several ranks, every variant's timed step is followed at once by a second one, with no
    barrier between (``"streamed"``): each rank's time from the end of the first to the end of
    the second is the step period of training, where each rank starts its next step as soon as it
    is done with the last (the direct rules' first stage then starts step t+1 while the later
    stages still finish step t; torch's engine cannot, its first stage finishes last)."""
    out: dict = {"ranks": ctx.world_size, "threads_per_rank": torch.get_num_threads(), "by_microbatches": {}}
    partition: tuple[str, ...] = ()  # measured for the first M, then kept: one partition for all
    for m in microbatches:
        def variant_config(v: Variant, extra: Sequence[str] = (), m: int = m) -> Config:
            return config_for([*v.overrides, f"parallel.microbatches={m}", *partition, *extra])

        result = _measure(variant_config, variants, ctx, steps=steps, warmup=warmup, block_costs=block_costs,
                          alone=alone)
        out["by_microbatches"][str(m)] = result
        partition = (f"parallel.partition={[b - a for a, b in result['partition']]}",)
    if link and ctx.distributed:
        out["link"] = measure_link(ctx)
    out["peak_rss_mb_per_rank"] = ctx.all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def _measure(config_for, variants: list[Variant], ctx: DistContext, *, steps: int, warmup: int,
             block_costs: bool, alone: Sequence[Variant] = ()) -> dict:
    # A balanced partition is measured, and measurements vary: decide it once, for every variant.
    first = build_job(config_for(variants[0]), ctx, profile=True)
    same = (f"parallel.partition={[len(r) for r in first.partition]}",)
    jobs = {variants[0].name: first,
            **{v.name: build_job(config_for(v, extra=same), ctx, profile=True) for v in variants[1:]}}
    alone = list(alone) if ctx.distributed else []

    def whole_network(v: Variant):  # on this rank, in a world of its own
        return build_job(config_for(v, extra=("parallel.partition=[]", "parallel.stages=0", "parallel.replicas=1")),
                         DistContext(device=ctx.device), profile=True)

    alone_jobs = {v.name: whole_network(v) for v in alone} if ctx.rank == 0 else {}
    together_jobs = {v.name: whole_network(v) for v in alone}
    x, y = next(iter(first.train_loader))
    samples: dict[str, list[float]] = {name: [] for name in jobs}
    alone_samples: dict[str, list[float]] = {name: [] for name in alone_jobs}
    together_samples: dict[str, list[float]] = {name: [] for name in together_jobs}
    streamed: dict[str, list[float]] = {name: [] for name in jobs} if ctx.distributed else {}
    # the steps back to back are timed phase by phase too, by timers of their own
    streamed_timers = {name: make_timer(ctx.device, True) for name in streamed}
    peak: dict[str, float] = {name: 0.0 for name in jobs}
    cuda = ctx.device.type == "cuda"

    def timed_step(job) -> float:
        _sync(ctx)
        job.timer.start_step()
        start = time.perf_counter()
        train_step(job, x, y)
        job.timer.end_step()
        _sync(ctx)  # a benchmark waits for the device at step boundaries, never inside a step
        return time.perf_counter() - start

    for step in range(warmup + steps):
        for name, job in jobs.items():
            ctx.barrier()  # every variant's step starts together on all ranks
            if cuda:
                torch.cuda.reset_peak_memory_stats(ctx.device)
            elapsed = timed_step(job)
            if step >= warmup:
                samples[name].append(elapsed)
                if cuda:
                    peak[name] = max(peak[name], torch.cuda.max_memory_allocated(ctx.device) / 2**20)
            if name in streamed:  # the next step straight on, as training runs, on a timer of its own
                timer, job.schedule.timer = job.schedule.timer, streamed_timers[name]
                elapsed = timed_step(job)  # its leading device sync finds the device idle already
                job.schedule.timer = timer
                if step >= warmup:
                    streamed[name].append(elapsed)
        for v in alone:
            ctx.barrier()  # the other ranks wait here, idle, while rank 0 steps alone
            if v.name in alone_jobs:
                elapsed = timed_step(alone_jobs[v.name])
                if step >= warmup:
                    alone_samples[v.name].append(elapsed)
            ctx.barrier()  # then every rank steps its own copy at once
            elapsed = timed_step(together_jobs[v.name])
            if step >= warmup:
                together_samples[v.name].append(elapsed)
    # A step is over when its slowest rank is (the next one starts with a barrier).
    per_rank = ctx.all_gather_object({
        "samples": samples, "peak": peak, "together": together_samples, "streamed": streamed,
        "streamed_phases": {n: t.summary(skip=warmup) for n, t in streamed_timers.items()},
        "phases": {n: j.timer.summary(skip=warmup) for n, j in jobs.items()}})

    def slowest(part: str) -> dict[str, list[float]]:  # each step's slowest rank, per variant
        return {name: [max(r[part][name][i] for r in per_rank) for i in range(steps)] for name in per_rank[0][part]}

    base = statistics.median(slowest("samples")[variants[0].name])
    cfg = first.cfg
    result = {
        "model": cfg.model.name, "data": cfg.data.name, "batch_size": cfg.data.batch_size,
        "microbatches": cfg.parallel.microbatches, "world_size": ctx.world_size,
        "partition": [[r.start, r.stop] for r in first.partition], "steps": steps, "warmup": warmup,
        "rules": {name: {"median_s": statistics.median(s), f"ratio_to_{variants[0].name}": statistics.median(s) / base,
                         "samples_s": s} for name, s in slowest("samples").items()},
        "phases_per_rank": {name: [r["phases"][name] for r in per_rank] for name in jobs},
        "peak_memory_mb_per_rank": {name: [r["peak"][name] for r in per_rank] for name in jobs} if cuda else None,
        "configs": {name: to_dict(job.cfg) for name, job in jobs.items()},
    }
    if streamed:  # a period is over when the slowest rank's is
        result["streamed"] = {"rules": _step_rows(slowest("streamed")),
                              "phases_per_rank": {name: [r["streamed_phases"][name] for r in per_rank]
                                                  for name in streamed}}
    if alone:
        phases = {n: j.timer.summary(skip=warmup) for n, j in alone_jobs.items()}
        gathered = ctx.broadcast_object((alone_samples, phases) if ctx.rank == 0 else None, src=0)
        result["alone"] = {"rules": _step_rows(gathered[0]), "phases": gathered[1]}
        result["together"] = {"rules": _step_rows(slowest("together"))}
    if block_costs and not ctx.distributed:
        from parallel_dkp.parallel.costs import measure_block_phases

        microbatch = cfg.data.batch_size // cfg.parallel.microbatches
        result["block_costs"] = measure_block_phases(
            cfg, x[:microbatch], y[:microbatch], num_classes=first.info.num_classes, total=cfg.data.batch_size,
            device=ctx.device,
        ).as_dict()
    del jobs, first, alone_jobs, together_jobs
    return result


def _step_rows(samples: dict[str, list[float]]) -> dict[str, dict]:
    """Each variant's step times and their median."""
    return {name: {"median_s": statistics.median(s), "samples_s": s} for name, s in samples.items()}


def measure_link(ctx: DistContext, sizes: Sequence[int] = (1 << 10, 1 << 16, 1 << 20, 1 << 22),
                 repeats: int = 9) -> dict:
    """Latency and bandwidth between ranks 0 and 1 (ping-pong, half round trips, least squares)."""
    from parallel_dkp.parallel.transport import ping_pong

    samples = [ping_pong(ctx, n_bytes, repeats=repeats) for n_bytes in sizes]  # timed on rank 0
    times = ctx.broadcast_object([statistics.median(s) for s in samples] if ctx.rank == 0 else None, src=0)
    return {**fit_link(sizes, times), "host_copies": ctx.device.type == "cpu",  # gloo on CPUs: the ranks'
            "sizes_bytes": list(sizes), "one_way_s": times}                     # cores copy every message


def fit_link(sizes: Sequence[int], times: Sequence[float]) -> dict[str, float]:
    """``latency_s`` and ``bandwidth_Bps`` of the least-squares line through (bytes, one-way seconds)."""
    n = len(sizes)
    mean_x, mean_t = sum(sizes) / n, sum(times) / n
    slope = (sum((x - mean_x) * (t - mean_t) for x, t in zip(sizes, times))
             / sum((x - mean_x) ** 2 for x in sizes))
    latency = max(0.0, mean_t - slope * mean_x)
    return {"latency_s": latency, "bandwidth_Bps": 1.0 / slope if slope > 0 else float("inf")}


def _cpu_count() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _sync(ctx: DistContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()


def machine(ctx: DistContext) -> dict:
    return {
        "node": platform.node(), "processor": platform.processor() or platform.machine(),
        "cpus": _cpu_count(),
        "torch": torch.__version__, "threads_per_rank": torch.get_num_threads(), "device": str(ctx.device),
        "device_name": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        "backend": ctx.backend,
    }


def print_world(result: dict, console: Console) -> None:
    """Tables of one world's measurement: step times and ratios, then phases per rank."""
    m = result["machine"]
    for micro, res in result["by_microbatches"].items():
        names = list(res["rules"])
        table = Table(title=(
            f"{res['model']} on {res['data']}, batch {res['batch_size']}, M={micro}, {res['world_size']} rank(s) "
            f"{res['partition']}, {m['device_name']}, {result['threads_per_rank']} thread(s)/rank; "
            f"median of {res['steps']} steps after {res['warmup']} warm-up"))
        table.add_column("variant")
        table.add_column("step (ms)", justify="right")
        table.add_column(f"/ {names[0]}", justify="right")
        for rank in range(res["world_size"]):
            table.add_column(f"rank {rank} idle", justify="right")
        for name, row in res["rules"].items():
            idle = [p.get("idle_fraction") for p in res["phases_per_rank"][name]]
            piped = any(p.get("pipeline") for p in res["phases_per_rank"][name])
            table.add_row(name, f"{row['median_s'] * 1e3:.1f}", f"{row[f'ratio_to_{names[0]}']:.3f}",
                          *("n/a" if piped or i is None else f"{i:.0%}" for i in idle))
        console.print(table)
        phases = Table(title=f"M={micro}: median ms per step and phase, per rank")
        for col in ("variant", "rank", *PHASES):
            phases.add_column(col, justify="right")
        for name in names:
            for rank, p in enumerate(res["phases_per_rank"][name]):
                phases.add_row(name, str(rank), *(f"{p.get(ph, 0.0) * 1e3:.1f}" for ph in PHASES))
        console.print(phases)
        streamed = res.get("streamed", {})
        for name, row in streamed.get("rules", {}).items():
            waits = ", ".join(f"rank {r} waits {p.get('wait', 0.0) * 1e3:.1f}"
                              for r, p in enumerate(streamed.get("phases_per_rank", {}).get(name, [])))
            console.print(f"M={micro}, {name} with steps back to back (no barrier between them, as in training): "
                          f"{row['median_s'] * 1e3:.1f} ms per step" + (f" ({waits})" if waits else ""))
        n = res["world_size"]
        for name, alone in res.get("alone", {}).get("rules", {}).items():
            together = res["together"]["rules"][name]["median_s"]
            console.print(f"M={micro}, {name} on the whole network: rank 0 alone {alone['median_s'] * 1e3:.1f} ms, "
                          f"all {n} ranks at once {together * 1e3:.1f} ms (parallel ceiling "
                          f"{n * alone['median_s'] / together:.2f} of {n})")


def write_json(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))


# --------------------------------------------------------------------------- unlocking


@dataclass(frozen=True)
class WorldSpec:
    """One measured world of the unlocking benchmark."""

    role: str  # "single_device", "per_rank", "pipeline" or "mesh"
    ranks: int
    """Pipeline stages (ranks per replica)."""
    threads: int
    variants: tuple[str, ...]
    microbatches: tuple[int, ...]
    replicas: int = 1
    alone: tuple[str, ...] = ()
    """Rules also stepped between the world's steps, on rank 0 alone and then on every rank at once
    (:func:`measure_world`)."""

    @property
    def key(self) -> str:
        if self.role == "mesh":
            return f"mesh:{self.ranks}stages-{self.replicas}replicas-{self.threads}threads"
        return f"{self.role}:{self.ranks}x{self.threads}"

    @property
    def processes(self) -> int:
        return self.ranks * self.replicas


def unlocking_worlds(ranks: list[int], microbatches: list[int], *, threads: int, all_cores: int,
                     replicas: Sequence[int] = (1,), channels_last: bool = False) -> list[WorldSpec]:
    """The worlds of the unlocking benchmark. With ``channels_last`` the N-rank worlds also run bp
    through torch's 1F1B in the default layout: its engine re-lays activations and gradients out at
    every stage boundary, so it may be faster that way, and dkp is compared with the faster bp."""
    torch_bp = ("bp@gpipe", "bp@1f1b", *(("bp@1f1b:nchw",) if channels_last else ()))
    worlds = [
        WorldSpec("single_device", 1, all_cores, ("bp", "dfa", "dkp"), tuple(dict.fromkeys([1, *microbatches]))),
        WorldSpec("per_rank", 1, threads, ("dkp", "dfa", "bp", "bp@gpipe", "bp@1f1b"), tuple(microbatches)),
    ]
    worlds += [WorldSpec("pipeline", n, threads, ("dkp", "dfa", *torch_bp, "dkp:local"), tuple(microbatches),
                         alone=("dkp", "bp")) for n in ranks if n > 1]
    worlds += [WorldSpec("mesh", n, threads, ("dkp", "bp@1f1b" if n > 1 else "bp"), tuple(microbatches), r)
               for r in replicas if r > 1 for n in ranks]
    return worlds


def _check_ranks(cfg: Config, ranks: list[int]) -> None:
    """Before anything is launched: every rank count fits the model as pipeline stages."""
    from parallel_dkp.models.blocks import num_blocks

    blocks = num_blocks(cfg.model)
    if max(ranks) > blocks:
        raise ValueError(f"--ranks {','.join(map(str, ranks))}: {cfg.model.name} has {blocks} blocks, so at most "
                         f"{blocks} pipeline stages can run it; drop the larger counts (and add --replicas for "
                         "data-parallel copies) or pick a deeper model")


def run_unlocking(args, config: Config, console: Console) -> dict:
    """Launch every world of the benchmark on this machine's CPU (gloo), ``args.rounds`` times in
    turn, and merge: the samples of a world are pooled over rounds before taking medians."""
    ranks = sorted(set([1, *parse_list(args.ranks, "--ranks")]))
    micro = parse_list(args.microbatches, "--microbatches")
    replicas = parse_list(getattr(args, "replicas", "1") or "1", "--replicas")
    _check_ranks(config, ranks)
    all_cores = _cpu_count()
    worlds = unlocking_worlds(ranks, micro, threads=args.threads_per_rank, all_cores=all_cores, replicas=replicas,
                              channels_last=config.run.channels_last)
    skipped = {s.key: f"needs {s.processes * s.threads} cores, this machine has {all_cores}"
               for s in worlds if s.role == "mesh" and s.processes * s.threads > all_cores}
    for key, why in skipped.items():
        console.print(f"[yellow]skipping the {key} world:[/] it {why} (timings would measure oversubscription)")
    worlds = [s for s in worlds if s.key not in skipped]
    merged: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="parallel-dkp-bench-") as tmp:
        for round_ in range(args.rounds):
            for spec in worlds:
                console.print(f"[dim]round {round_ + 1}/{args.rounds}: {spec.role}, {spec.ranks} stage(s) x "
                              f"{spec.replicas} replica(s) x {spec.threads} thread(s), M in "
                              f"{list(spec.microbatches)} ...[/]")
                out = Path(tmp) / f"{spec.key.replace(':', '-').replace('/', '-')}-{round_}.json"
                _launch(spec, args, out, cost=spec.role == "per_rank" and round_ == 0,
                        batch_size=config.data.batch_size)
                _merge(merged, spec.key, json.loads(out.read_text()))
    result = assemble(merged, worlds, ranks=ranks, microbatches=micro)
    result["skipped_worlds"] = skipped
    result["machine"] = {**merged[worlds[1].key]["machine"], "threads_per_rank": args.threads_per_rank}
    result["command"] = " ".join(sys.argv)
    result["rounds"] = args.rounds
    return result


def _launch(spec: WorldSpec, args, out: Path, *, cost: bool, batch_size: int) -> None:
    mesh = []
    if spec.role == "mesh":  # every replica on a full batch: the global batch grows with them
        mesh = [f"parallel.stages={spec.ranks}", f"parallel.replicas={spec.replicas}",
                f"data.batch_size={batch_size * spec.replicas}"]
    cmd = ["-m", "parallel_dkp", "bench", *(["--config", args.config] if args.config else []),
           *[a for s in [*args.overrides, *mesh] for a in ("--set", s)], "--set", "run.device=cpu",
           "--rules", ",".join(spec.variants), *(["--alone", ",".join(spec.alone)] if spec.alone else []),
           "--microbatches", ",".join(map(str, spec.microbatches)),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out), "--quiet"]
    if cost:
        cmd.append("--block-costs")
    if spec.processes > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node",
               str(spec.processes), *cmd]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(spec.threads), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    proc = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        # the ranks' own one-line errors first: torchrun's report after them says little
        ours = [line for line in lines if line.startswith(("error:", "config error:", "peer failure:"))]
        ranks = [line for line in lines if line.startswith("[rank")]  # torchrun's prefix on a rank's traceback
        tail = "\n".join(ours or ranks[-15:] or lines[-25:])
        raise RuntimeError(f"the {spec.key} world ({spec.processes} rank(s)) failed with exit code "
                           f"{proc.returncode}:\n{tail}")


def _merge(merged: dict, key: str, world: dict) -> None:
    """Pool a world's samples across rounds (and keep each round's median), average its phase
    timers' medians over the rounds (so that the cost model, calibrated from them, sees the same
    rounds as the pooled step times), and fit the link to each size's median one-way time over
    the rounds (one busy moment of the machine no longer sets it); the first round's other
    fields stay."""
    def rows(res: dict) -> dict:  # the world's variants, and those stepped alone and together
        return {(part, name): row for part in ("rules", "alone", "together", "streamed")
                for name, row in (res[part] if part == "rules" else res.get(part, {}).get("rules", {})).items()}

    def phases(res: dict) -> list[dict]:  # every rank's phase medians of every variant
        return ([p for part in (res, res.get("streamed", {})) for per_rank in part.get("phases_per_rank", {}).values()
                 for p in per_rank] + list(res.get("alone", {}).get("phases", {}).values()))

    for res in world["by_microbatches"].values():
        for row in rows(res).values():
            row["round_medians_s"] = [row["median_s"]]
    if "link" in world:
        world["link"]["one_way_s_by_round"] = [world["link"]["one_way_s"]]
    if key not in merged:
        merged[key] = {**world, "rounds_merged": 1}
        return
    done = merged[key]["rounds_merged"]
    if "link" in world:
        link = merged[key]["link"]
        link["one_way_s_by_round"] += world["link"]["one_way_s_by_round"]
        link["one_way_s"] = [statistics.median(ts) for ts in zip(*link["one_way_s_by_round"])]
        link.update(fit_link(link["sizes_bytes"], link["one_way_s"]))
    for m, res in world["by_microbatches"].items():
        mine = rows(merged[key]["by_microbatches"][m])
        for name, row in rows(res).items():
            mine[name]["samples_s"] += row["samples_s"]
            mine[name]["median_s"] = statistics.median(mine[name]["samples_s"])
            mine[name]["round_medians_s"] += row["round_medians_s"]
        for old, new in zip(phases(merged[key]["by_microbatches"][m]), phases(res)):
            for k, v in new.items():
                if isinstance(v, (int, float)) and isinstance(old.get(k), (int, float)):
                    old[k] = (old[k] * done + v) / (done + 1)
    merged[key]["rounds_merged"] = done + 1


def ratios_by_round(numerator: dict, denominator: dict) -> list[float]:
    """Two variants' step-time ratio round by round (rows of merged worlds, as ``_merge`` leaves them)."""
    rounds = (row.get("round_medians_s", [row["median_s"]]) for row in (numerator, denominator))
    return [a / b for a, b in zip(*rounds)]


def assemble(merged: dict, worlds: list[WorldSpec], *, ranks: list[int], microbatches: list[int]) -> dict:
    """Ratios, the cost model's validation and predictions, from the measured worlds."""
    by_role = {(s.role, s.ranks): merged[s.key] for s in worlds if s.role != "mesh"}
    meshes = {(s.ranks, s.replicas): merged[s.key] for s in worlds if s.role == "mesh"}
    single, per_rank = by_role["single_device", 1], by_role["per_rank", 1]

    def median(world: dict, m: int, name: str) -> float:
        return world["by_microbatches"][str(m)]["rules"][name]["median_s"]

    def speedup(pipe: dict, m: int, one_name: str, many_name: str) -> tuple[float, list[float]]:
        """One rank's step time over the world's, pooled and round by round. The one rank is the
        world's own rank 0 stepping alone between the world's steps (``unlocking_worlds`` gives
        every pipeline world those steps), so a drifting machine hits both alike."""
        res = pipe["by_microbatches"][str(m)]
        one, many = res["alone"]["rules"][one_name], res["rules"][many_name]
        return one["median_s"] / many["median_s"], ratios_by_round(one, many)

    largest = max(ranks)
    ratios_by_ranks: dict[str, dict] = {}
    for n in ranks[1:]:
        pipe = by_role["pipeline", n]
        ratios_by_ranks[str(n)] = {}
        for m in microbatches:
            unlocking, unlocking_by_round = speedup(pipe, m, "dkp", "dkp")
            bp_speedup, bp_by_round = speedup(pipe, m, "bp", "bp@1f1b")
            ratios_by_ranks[str(n)][str(m)] = {
                "dkp_over_bp_single_device": median(single, 1, "dkp") / median(single, 1, "bp"),
                "dfa_over_bp_single_device": median(single, 1, "dfa") / median(single, 1, "bp"),
                "dkp_over_bp_gpipe": median(pipe, m, "dkp") / median(pipe, m, "bp@gpipe"),
                "dkp_over_bp_1f1b": median(pipe, m, "dkp") / median(pipe, m, "bp@1f1b"),
                # against torch's 1F1B in whichever layout ran it faster (the same where only one ran)
                "dkp_over_fastest_bp_1f1b": median(pipe, m, "dkp") / min(
                    row["median_s"] for name, row in pipe["by_microbatches"][str(m)]["rules"].items()
                    if name.startswith("bp@1f1b")),
                "dfa_over_bp_gpipe": median(pipe, m, "dfa") / median(pipe, m, "bp@gpipe"),
                "dfa_over_bp_1f1b": median(pipe, m, "dfa") / median(pipe, m, "bp@1f1b"),
                "dkp_unlocking_speedup": unlocking,
                "dkp_speedup_over_one_rank_all_cores": median(single, m, "dkp") / median(pipe, m, "dkp"),
                "bp_1f1b_speedup": bp_speedup,
                # Each round is a separate launch of the world, minutes after the last: a drifting
                # machine shows as spread here (the pooled ratios above average it out).
                "dkp_unlocking_speedup_by_round": unlocking_by_round,
                "bp_1f1b_speedup_by_round": bp_by_round,
                # The same against the one-rank world launched on its own, minutes apart: what this
                # benchmark reported before the one-rank steps were interleaved with the world's.
                "dkp_unlocking_speedup_across_worlds": median(per_rank, m, "dkp") / median(pipe, m, "dkp"),
            }
            res, row = pipe["by_microbatches"][str(m)], ratios_by_ranks[str(n)][str(m)]
            if "streamed" in res:
                # Steps back to back, as training runs them: the direct rules' first stage starts the
                # next step while the later stages finish this one, so the pipeline fills once per
                # run rather than once per step; torch's engine cannot overlap its steps.
                streamed, alone = res["streamed"]["rules"], res["alone"]["rules"]
                row["dkp_unlocking_speedup_streamed"] = alone["dkp"]["median_s"] / streamed["dkp"]["median_s"]
                row["dkp_unlocking_speedup_streamed_by_round"] = ratios_by_round(alone["dkp"], streamed["dkp"])
                row["bp_1f1b_speedup_streamed"] = alone["bp"]["median_s"] / streamed["bp@1f1b"]["median_s"]
                row["dkp_over_bp_1f1b_streamed"] = streamed["dkp"]["median_s"] / streamed["bp@1f1b"]["median_s"]
                row["dkp_over_fastest_bp_1f1b_streamed"] = streamed["dkp"]["median_s"] / min(
                    r["median_s"] for name, r in streamed.items() if name.startswith("bp@1f1b"))
            together_dkp = res.get("together", {}).get("rules", {}).get("dkp")
            if "streamed" in res and "dkp:local" in res["streamed"]["rules"] and together_dkp:
                # The period against the machine's ideal one: N whole networks stepped at once, over
                # N (every rank busy, no messages, no fill). The stages without messages (each rank
                # its own stage, inputs there when asked) split the gap: what the partition and the
                # stages' compute leave, and what the messages add.
                ideal = together_dkp["median_s"] / n
                period, local = (res["streamed"]["rules"][k]["median_s"] for k in ("dkp", "dkp:local"))
                row["dkp_period_over_ideal_streamed"] = period / ideal
                row["dkp_local_period_over_ideal_streamed"] = local / ideal
                row["dkp_period_over_local_streamed"] = period / local
            for rule, together in res.get("together", {}).get("rules", {}).items():
                # N copies of the whole network at once, no messages: what N ranks of this machine can
                # give any scheme at that time (N on a machine whose ranks do not slow each other)
                alone = res["alone"]["rules"][rule]
                row[f"{rule}_parallel_ceiling"] = n * alone["median_s"] / together["median_s"]
                row[f"{rule}_parallel_ceiling_by_round"] = [n * r for r in ratios_by_round(alone, together)]
    headline = ratios_by_ranks.get(str(largest), {})
    result = {
        "model": per_rank["by_microbatches"][str(microbatches[0])]["model"],
        "data": per_rank["by_microbatches"][str(microbatches[0])]["data"],
        "batch_size": per_rank["by_microbatches"][str(microbatches[0])]["batch_size"],
        "ranks": ranks, "microbatches": microbatches, "threads_per_rank": per_rank["threads_per_rank"],
        "single_device": {
            "threads": single["threads_per_rank"],
            "step_s": {name: median(single, 1, name) for name in ("bp", "dfa", "dkp")},
        },
        "ratios": headline.get(str(microbatches[0]), {}),
        "ratios_by_microbatches": {m: r for m, r in headline.items()},
        "ratios_by_ranks": ratios_by_ranks,
        "mesh": _mesh_results(meshes, per_rank, microbatches),
        "worlds": {s.key: {**merged[s.key], "role": s.role} for s in worlds},
    }
    result["cost_model"] = validate_cost_model(result, by_role, ranks=ranks, microbatches=microbatches, meshes=meshes)
    return result


def _mesh_results(meshes: dict, per_rank: dict, microbatches: list[int]) -> dict:
    """Per stages x replicas world and M: step times, examples per second, and the throughput
    against one rank (same threads, same per-replica batch): ``R · T(1 rank) / T(mesh)``."""
    out = {}
    for (stages, replicas), world in meshes.items():
        rows = {}
        for m in microbatches:
            res = world["by_microbatches"][str(m)]
            row = {"batch_size": res["batch_size"]}
            for name, r in res["rules"].items():
                rule = Variant.parse(name).rule
                one = per_rank["by_microbatches"][str(m)]["rules"][rule]["median_s"]
                row[name] = {"step_s": r["median_s"], "examples_per_s": res["batch_size"] / r["median_s"],
                             "throughput_over_one_rank": replicas * one / r["median_s"]}
            rows[str(m)] = row
        out[f"{stages}x{replicas}"] = {"stages": stages, "replicas": replicas, "by_microbatches": rows}
    return out


def in_step_factors(isolated: costmodel.BlockCosts, phases_per_rank: dict, microbatches: int, *,
                    direct: str = "dkp") -> dict[str, float]:
    """How much longer each phase takes inside a real one-rank step than the per-block costs
    measured in isolation say: the phase timers' totals (the direct rule ``direct``'s forward,
    update and optimizer, bp's backward, which its schedule times as ``update``, and optimizer)
    over M times the blocks' sums. The isolated costs time one direct update (dkp's) for every
    direct rule, so each rule's own factor also carries its own update's level (dfa's is cheaper).

    Blocks timed alone, one micro-batch at a time, find their weights and activations in cache;
    inside a step M micro-batches' activations are alive and every other block runs in between
    (vit on the 2-core VM: 12-13 % longer). The cost model keeps the blocks' relative costs and
    takes their level from the step; the step time itself is not used, so one-rank predictions
    still miss whatever a step does outside its phases."""
    rule, bp = phases_per_rank[direct][0], phases_per_rank["bp"][0]
    totals = {"forward": (rule["forward"], isolated.forward, microbatches),
              "update": (rule["update"], isolated.update, microbatches),
              "backward": (bp["update"], isolated.backward, microbatches),
              "optim_direct": (rule["optim"], isolated.optim_direct, 1),
              "optim_bp": (bp["optim"], isolated.optim_bp, 1)}
    return {k: (phase / (times * sum(blocks)) if phase > 0 and sum(blocks) > 0 else 1.0)
            for k, (phase, blocks, times) in totals.items()}


def step_overheads(phases_per_rank: dict) -> dict[str, float]:
    """Per rule, the seconds of a one-rank step outside its timed phases: zeroing the gradients,
    the divergence guard, splitting the batch, Python between the phases."""
    return {name: max(0.0, p[0]["step"] - sum(p[0].get(k, 0.0) for k in PHASES))
            for name, p in phases_per_rank.items() if p and p[0].get("step")}


def machine_levels(world_res: dict, per_rank_res: dict) -> dict[str, float]:
    """How fast the machine ran while a world was measured, against the one-rank world the block
    costs were calibrated in: per rule stepped beside the world with every rank busy
    (``"together"``; else rank 0 ``"alone"``), its step time there over the one-rank world's
    (1.2: everything took 20 % longer). A shared or throttled machine drifts between worlds
    measured minutes apart, and busy ranks can slow one another; this is what a prediction of the
    world is scaled by. Empty where the world stepped nothing beside its own steps.

    Every rank busy, even for a pipeline whose stages idle part of the step: a model that ran
    each op at the level of the ranks busy with it (measured alone and together, linear in
    between) predicted conv2's 2-rank rows 7-12 % too fast in two runs of three, and the
    no-message control (``dkp:local``) showed conv2's busy stage computing at the ``together``
    level while the other idled 70 % of the time (docs/performance.md)."""
    one = per_rank_res["rules"]
    beside = world_res.get("together") or world_res.get("alone") or {}
    return {name: row["median_s"] / one[name]["median_s"]
            for name, row in beside.get("rules", {}).items() if name in one}


def _level(levels: dict[str, float], rule: str) -> float:
    """A rule's machine level: its own, else that of the rules with its kind of signal, else any."""
    if rule in levels:
        return levels[rule]
    alike = [v for r, v in levels.items() if RULES[r].signal == RULES[rule].signal] or list(levels.values())
    return statistics.mean(alike) if alike else 1.0


def engine_overheads(one_rank_res: dict, microbatches: int) -> dict[str, float]:
    """Per torch schedule (``gpipe``, ``1f1b``), the host seconds its engine adds per micro-batch
    and stage: in the one-rank world, where bp ran both through the engine on one stage and
    through the plain loop, interleaved step by step, the median of the steps' differences over
    M (at least 0). Empty where bp did not run through the engine there."""
    rows = one_rank_res["rules"]
    out = {}
    for name, row in rows.items():
        variant = Variant.parse(name)
        if variant.rule == "bp" and variant.schedule and not variant.layout and "bp" in rows:
            extra = [e - s for e, s in zip(row["samples_s"], rows["bp"]["samples_s"])]
            out[variant.schedule] = max(0.0, statistics.median(extra) / microbatches)
    return out


_OVERHEAD_RULE = {"direct": "dkp", "gpipe": "bp", "1f1b": "bp"}
"""Whose measured per-step overhead the predictions to 64 ranks take, by method."""


def validate_cost_model(result: dict, by_role: dict, *, ranks: list[int], microbatches: list[int],
                        meshes: dict | None = None) -> dict:
    """Predict every measured per-rank-thread configuration (stages x replicas ones included)
    from the block costs, the link and torch's engine overhead; the relative errors, and the
    predictions for N = 1 ... 64 (as far as the blocks go). bp through torch's engine on one rank
    calibrates that overhead (:func:`engine_overheads`), so it is not among the validated rows."""
    per_rank = by_role["per_rank", 1]
    link_world = next((by_role["pipeline", n] for n in ranks if n > 1), None)
    link = costmodel.Link(**{k: link_world["link"][k] for k in ("latency_s", "bandwidth_Bps", "host_copies")
                             if k in link_world["link"]}) if link_world and "link" in link_world else costmodel.Link()
    rows = []
    costs_by_m, isolated_by_m, factors_by_m, overhead_by_m, engine_by_m = {}, {}, {}, {}, {}
    for m in microbatches:
        one = per_rank["by_microbatches"][str(m)]
        isolated = costmodel.BlockCosts.from_dict(one["block_costs"])
        phases = one["phases_per_rank"]
        factors_by_m[m] = {rule: in_step_factors(isolated, phases, m, direct=rule)
                           for rule in ("dkp", "dfa") if rule in phases}
        overhead_by_m[m] = step_overheads(phases)
        engine_by_m[m] = engine_overheads(one, m)
        by_rule = {rule: isolated.scaled(f) for rule, f in factors_by_m[m].items()}
        costs = by_rule["dkp"]  # bp's rows and the predictions to 64 ranks
        costs_by_m[m], isolated_by_m[m] = costs, isolated
        worlds = [(n, 1, per_rank if n == 1 else by_role["pipeline", n]) for n in ranks]
        worlds += [(n, r, world) for (n, r), world in (meshes or {}).items()]
        for n, replicas, world in worlds:
            res = world["by_microbatches"][str(m)]
            partition = [range(a, b) for a, b in res["partition"]]
            levels = machine_levels(res, one)
            # steps that start together on every rank, and (several ranks) steps back to back
            measured_rows = [(False, res["rules"]), (True, res.get("streamed", {}).get("rules", {}))]
            for streamed, named in measured_rows:
                for name, row in named.items():
                    variant = Variant.parse(name)
                    if variant.layout or not variant.messages:  # block costs: the run's layout; real steps
                        continue
                    if variant.schedule and n * replicas == 1:  # the engine's calibration itself
                        continue
                    method = variant.method(default_schedule="gpipe")
                    level = _level(levels, variant.rule)
                    calibrated = by_rule.get(variant.rule, costs).scaled(dict.fromkeys(costmodel.TIMED_PHASES, level))
                    overhead = level * overhead_by_m[m].get(variant.rule, 0.0)
                    # bp on one stage runs the plain loop, unless the variant named a schedule
                    engine = level * engine_by_m[m].get(method, 0.0) if variant.schedule or n > 1 else 0.0
                    predicted, from_isolated = (
                        costmodel.simulate(costmodel.stage_costs(c, partition, method, e), microbatches=m,
                                           method=method, link=lk, error_bytes=c.error_bytes, replicas=replicas,
                                           step_overhead=o, streamed=streamed)
                        for c, lk, o, e in ((calibrated, link, overhead, engine),
                                            (isolated, replace(link, host_copies=False), 0.0, 0.0)))
                    measured = row["median_s"]
                    rows.append({"ranks": n, "replicas": replicas, "microbatches": m, "variant": name,
                                 "streamed": streamed, "measured_s": measured, "predicted_s": predicted,
                                 "machine_level": level, "relative_error": abs(predicted - measured) / measured,
                                 "predicted_from_isolated_s": from_isolated,
                                 "relative_error_from_isolated": abs(from_isolated - measured) / measured})
    num_blocks = next(iter(costs_by_m.values())).num_blocks
    predictions = {}
    for m, costs in costs_by_m.items():
        predictions[str(m)] = {method: {str(n): costmodel.predict(
            costs, ranks=n, microbatches=m, method=method, link=link,
            step_overhead=overhead_by_m[m].get(_OVERHEAD_RULE[method], 0.0),
            engine_overhead=engine_by_m[m].get(method, 0.0) if n > 1 else 0.0)
                                        for n in range(1, min(64, num_blocks) + 1)}
                               for method in ("direct", "gpipe", "1f1b")}
    ideal = {}
    for m, costs in costs_by_m.items():
        f, u, b = sum(costs.forward), sum(costs.update), sum(costs.backward)
        ideal[str(m)] = {str(n): {
            "dkp_unlocking_speedup": costmodel.ideal_direct_speedup(f / n, u / n, ranks=n, microbatches=m),
            "dkp_over_bp_1f1b": (m * (f + u) + (n - 1) * f) / n / ((m + n - 1) * (f + b) / n),
        } for n in ranks if n > 1}
    return {
        "link": {"latency_s": link.latency_s, "bandwidth_Bps": link.bandwidth_Bps, "host_copies": link.host_copies},
        "block_costs": {str(m): c.as_dict() for m, c in isolated_by_m.items()},
        "in_step_factors": {str(m): f for m, f in factors_by_m.items()},
        "step_overhead_s": {str(m): o for m, o in overhead_by_m.items()},
        "engine_overhead_s": {str(m): e for m, e in engine_by_m.items()},
        "validation": rows,
        "validation_error": max(r["relative_error"] for r in rows),
        "validation_error_from_isolated": max(r["relative_error_from_isolated"] for r in rows),
        "predictions_s": predictions,
        "ideal": ideal,
    }


def print_unlocking(result: dict, console: Console) -> None:
    sd = result["single_device"]
    console.print(f"[bold]{result['model']}[/] on {result['data']}, batch {result['batch_size']}; one device "
                  f"({sd['threads']} thread(s), M=1): "
                  + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sd["step_s"].items()))
    columns = [(n, m) for n, by_m in result["ratios_by_ranks"].items() for m in by_m]
    if columns:
        table = Table(title=f"ratios, {result['threads_per_rank']} thread(s) per rank (dkp/bp < 1: dkp is faster)")
        table.add_column("ratio")
        for n, m in columns:
            table.add_column(f"N={n} M={m}", justify="right")
        for key in result["ratios_by_ranks"][columns[0][0]][columns[0][1]]:
            table.add_row(key, *(_ratio_text(result["ratios_by_ranks"][n][m][key]) for n, m in columns))
        console.print(table)
    for key, mesh in result.get("mesh", {}).items():
        for m, row in mesh["by_microbatches"].items():
            console.print(f"{key} (stages x replicas), M={m}, batch {row['batch_size']}: " + ", ".join(
                f"{name} {r['step_s'] * 1e3:.1f} ms ({r['throughput_over_one_rank']:.2f}x one rank's throughput)"
                for name, r in row.items() if name != "batch_size"))
    for key, why in result.get("skipped_worlds", {}).items():
        console.print(f"skipped {key}: {why}")
    cm = result["cost_model"]
    console.print(f"cost model: link {cm['link']['latency_s'] * 1e6:.0f} µs + "
                  f"{cm['link']['bandwidth_Bps'] / 1e9:.2f} GB/s; largest relative error against the "
                  f"{len(cm['validation'])} measured configurations: {cm['validation_error']:.3f} with block costs "
                  f"at their in-step level, {cm['validation_error_from_isolated']:.3f} with the isolated ones")
    for m, engine in cm.get("engine_overhead_s", {}).items():
        if engine:
            console.print(f"torch's engine at M={m}: " + ", ".join(
                f"{name} +{s * 1e3:.2f} ms" for name, s in engine.items()) + " per micro-batch and stage (host time)")


def _ratio_text(value: float | list[float]) -> str:
    """A ratio, or the range of its per-round values."""
    if isinstance(value, list):
        return f"{min(value):.2f}-{max(value):.2f}" if value else "-"
    return f"{value:.3f}"


def run_unlocking_in_world(config_for: ConfigFor, args, ctx: DistContext, console: Console) -> dict:
    """The unlocking benchmark inside a launched world (torchrun, GPUs): one rank is rank 0 alone
    (which is also the single device), the pipeline is the whole world."""
    ranks = sorted(set([1, *parse_list(args.ranks, "--ranks")]))
    if not set(ranks) <= {1, ctx.world_size}:
        raise ValueError(f"--ranks {args.ranks} under torchrun with {ctx.world_size} rank(s): inside a launched world "
                         f"only 1 and {ctx.world_size} can be measured; pass --ranks 1,{ctx.world_size}")
    micro = parse_list(args.microbatches, "--microbatches")
    worlds = unlocking_worlds(ranks, micro, threads=torch.get_num_threads(), all_cores=torch.get_num_threads(),
                              channels_last=config_for([]).run.channels_last)
    single, per_rank = worlds[0], worlds[1]
    variants = [Variant.parse(v) for v in dict.fromkeys(single.variants + per_rank.variants)]
    one = None
    if ctx.rank == 0:
        console.print(f"[dim]one rank: rank 0 alone on {ctx.device}, M in {sorted(set([1, *micro]))} ...[/]")
        one = measure_world(config_for, variants, DistContext(device=ctx.device),
                            microbatches=list(single.microbatches), steps=args.steps, warmup=args.warmup,
                            block_costs=True)
    one = ctx.broadcast_object(one, src=0)  # the other ranks wait here while rank 0 measures
    merged = {single.key: one, per_rank.key: one}
    for spec in worlds[2:]:
        merged[spec.key] = measure_world(config_for, [Variant.parse(v) for v in spec.variants], ctx,
                                         microbatches=micro, steps=args.steps, warmup=args.warmup, link=True,
                                         alone=[Variant.parse(v) for v in spec.alone])
    result = assemble(merged, worlds, ranks=ranks, microbatches=micro)
    result["machine"] = machine(ctx)
    return result
