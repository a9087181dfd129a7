"""Functions run on every rank by the multi-rank tests (importable, so ``spawn`` can pickle them)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from parallel_dkp.config import Config, load_config
from parallel_dkp.parallel.distributed import DistContext, init_distributed
from parallel_dkp.train import build_job, evaluate, read_sums, train_step


def small_config(rule: str, *, partition=(), microbatches=2, extra=()) -> Config:
    return load_config(None, [
        f"rule.name={rule}", "model.name=conv2", "data.name=synthetic", "data.synthetic_shape=[1, 8, 8]",
        "data.synthetic_size=96", "data.batch_size=16", f"parallel.microbatches={microbatches}",
        f"parallel.partition={list(partition)}", "parallel.timeout_s=60", "run.progress=false",
        "optim.feedback.lr=0.01", *extra,
    ])


def run_steps(cfg: Config, ctx: DistContext, steps: int) -> dict:
    """Train ``steps`` steps and evaluate; return the stage state (global keys) and eval sums."""
    job = build_job(cfg, ctx)
    for step, (x, y) in enumerate(job.train_loader):
        if step == steps:
            break
        train_step(job, x, y)
    result = read_sums(job, evaluate(job))  # over the replicas, when there are several
    return {"state": {k: v.detach().clone() for k, v in job.stage.global_state_dict().items()},
            "eval": list(result), "partition": [list(r) for r in job.partition],
            "stage": ctx.stage, "replica": ctx.replica}


def train_rules(rank: int, world_size: int, out_dir: str, rules: list[str], partition, microbatches: int, steps: int,
                schedule: str = "gpipe", extra=()):
    for rule in rules:
        cfg = small_config(rule, partition=partition, microbatches=microbatches,
                           extra=[f"parallel.schedule={schedule}", *extra])
        ctx = init_distributed(cfg.parallel, cfg.run)
        torch.save(run_steps(cfg, ctx, steps), Path(out_dir) / f"{rule}-rank{rank}.pt")
    dist.destroy_process_group()


def die_after_one_step(rank: int, world_size: int, out_dir: str, rule: str):
    """Rank 0 crashes after one step; the others must fail with a clear error, not hang."""
    cfg = small_config(rule, extra=["parallel.timeout_s=20", "data.synthetic_size=640"])
    _one_rank_dies(rank, cfg, out_dir, dying_rank=0)


def _one_rank_dies(rank: int, cfg: Config, out_dir: str, *, dying_rank: int):
    """All ranks train one step, then ``dying_rank`` exits with code 3 and the others train on;
    each survivor writes ``rank{r}.json``: what it raised, and how long after the death."""
    ctx = init_distributed(cfg.parallel, cfg.run)
    job = build_job(cfg, ctx)
    batches = iter(job.train_loader)
    x, y = next(batches)
    train_step(job, x, y)
    if rank == dying_rank:
        os._exit(3)
    start = time.perf_counter()
    try:
        for x, y in batches:
            train_step(job, x, y)
    except Exception as err:  # noqa: BLE001 - the test inspects what was raised
        record = {"type": type(err).__name__, "message": str(err), "seconds": time.perf_counter() - start}
    else:
        record = {"type": None, "message": "no error", "seconds": time.perf_counter() - start}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    os._exit(0)


def train_until_signal(rank: int, world_size: int, out_dir: str, overrides: list[str], signal_rank: int | None,
                       signal_at: int | None):
    """``parallel_dkp.train.train`` with a real SIGTERM sent to rank ``signal_rank`` by itself after
    its ``signal_at``-th step; writes ``rank{r}.json`` saying how the run ended."""
    import signal as signals

    import parallel_dkp.train as train_module

    real_step, done = train_module.train_step, [0]

    def step_then_signal(job, x, y, **kwargs):
        result = real_step(job, x, y, **kwargs)
        done[0] += 1
        if rank == signal_rank and done[0] == signal_at:
            os.kill(os.getpid(), signals.SIGTERM)
        return result

    train_module.train_step = step_then_signal
    try:
        train_module.train(load_config(None, [*overrides, f"run.out_dir={out_dir}"]))
        record = {"ended": "finished"}
    except train_module.RunInterrupted as err:
        record = {"ended": "interrupted", "signal": err.signal_name, "message": str(err), "code": err.exit_code}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))


def poison_one_gradient(rank: int, world_size: int, out_dir: str, overrides: list[str], bad_rank: int, bad_step: int):
    """Train with rank ``bad_rank``'s first gradient turned to NaN at its ``bad_step``-th step
    (as a blown-up error or feedback would make it); ``rank{r}.json`` records how the run ended."""
    import parallel_dkp.train as train_module
    from parallel_dkp.guard import NonFiniteError, NonFiniteGuard

    real_observe, seen = NonFiniteGuard.observe, [0]

    def poisoned_observe(self, metrics):
        seen[0] += 1
        if rank == bad_rank and seen[0] == bad_step:
            grad = next(p.grad for p in self.stage.parameters() if p.grad is not None)
            grad.fill_(float("nan"))
        return real_observe(self, metrics)

    NonFiniteGuard.observe = poisoned_observe
    try:
        train_module.train(load_config(None, [*overrides, f"run.out_dir={out_dir}"]))
        record = {"ended": "finished"}
    except NonFiniteError as err:
        record = {"ended": "nonfinite", "message": str(err)}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))


BALANCED_MODELS = {
    "vit": ["model.name=vit", "model.dim=8", "model.heads=2", "model.patch=2", "model.depth=2"],
    "convdeep": ["model.name=convdeep", "model.width=4", "model.depth=2"],
}
"""Tiny ``vit`` and ``convdeep`` (4 blocks each: input block, 2 equal blocks, head) on small_config's
1x8x8 synthetic images."""


def balanced_config(model: str, rule: str, *, partition=(), microbatches=2) -> Config:
    return small_config(rule, partition=partition, microbatches=microbatches, extra=BALANCED_MODELS[model])


def train_balanced_models(rank: int, world_size: int, out_dir: str, models: list[str], rules: list[str], partition,
                          microbatches: int, steps: int):
    """``run_steps`` for every (model, rule) of the tiny balanced networks; ``{model}-{rule}-rank{r}.pt``."""
    for model in models:
        for rule in rules:
            cfg = balanced_config(model, rule, partition=partition, microbatches=microbatches)
            ctx = init_distributed(cfg.parallel, cfg.run)
            torch.save(run_steps(cfg, ctx, steps), Path(out_dir) / f"{model}-{rule}-rank{rank}.pt")
    dist.destroy_process_group()


def layout_config(rule: str, stages: int, replicas: int, *, microbatches: int, extra=()) -> Config:
    return small_config(rule, microbatches=microbatches,
                        extra=[f"parallel.stages={stages}", f"parallel.replicas={replicas}", *extra])


def train_layout(rank: int, world_size: int, out_dir: str, rules: list[str], stages: int, replicas: int,
                 microbatches: int, steps: int, extra=()):
    """``run_steps`` for every rule on a ``stages`` x ``replicas`` mesh; ``{rule}-rank{r}.pt``."""
    for rule in rules:
        cfg = layout_config(rule, stages, replicas, microbatches=microbatches, extra=extra)
        ctx = init_distributed(cfg.parallel, cfg.run)
        torch.save(run_steps(cfg, ctx, steps), Path(out_dir) / f"{rule}-rank{rank}.pt")
    dist.destroy_process_group()


def replica_dies(rank: int, world_size: int, out_dir: str, rule: str, dying_rank: int):
    """On a 2 x 2 mesh, ``dying_rank`` crashes after one step; every other rank must stop with a
    clear error within the timeout."""
    cfg = layout_config(rule, 2, 2, microbatches=2, extra=["parallel.timeout_s=20", "data.synthetic_size=640"])
    _one_rank_dies(rank, cfg, out_dir, dying_rank=dying_rank)


def describe_mesh(rank: int, world_size: int, out_dir: str):
    """The DeviceMesh view of a 2 x 2 layout, as each rank sees it: ``rank{r}.json``."""
    from parallel_dkp.parallel.mesh import Layout

    cfg = layout_config("dkp", 2, 2, microbatches=2)
    ctx = init_distributed(cfg.parallel, cfg.run)
    ctx.use_layout(Layout(2, 2), timeout_s=20)
    mesh = ctx.device_mesh()
    record = {"shape": list(mesh.shape), "names": list(mesh.mesh_dim_names), "grid": mesh.mesh.tolist(),
              "dp": dist.get_process_group_ranks(mesh.get_group("dp")),
              "pp": dist.get_process_group_ranks(mesh.get_group("pp")),
              "stage": ctx.stage, "replica": ctx.replica}
    total = torch.ones(1) * rank
    dist.all_reduce(total, group=mesh.get_group("dp"))  # the mesh's groups work
    record["dp_sum"] = total.item()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def engine_on_rank_0_alone(rank: int, world_size: int, out_dir: str, schedule: str, steps: int):
    """In a launched world, rank 0 alone trains bp through torch's engine on one stage (as
    ``bench`` measures the one-rank baseline under torchrun) while the others wait."""
    cfg = small_config("bp", microbatches=4,
                       extra=[f"parallel.schedule={schedule}", "parallel.engine_on_one_stage=true"])
    init_distributed(cfg.parallel, cfg.run)
    if rank == 0:
        torch.save(run_steps(cfg, DistContext(), steps), Path(out_dir) / "alone.pt")
    dist.barrier()
    dist.destroy_process_group()
