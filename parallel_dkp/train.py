"""The training loop. One step is the runtime's job; this file wires the pieces and loops."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from parallel_dkp import checkpoint
from parallel_dkp.analysis.alignment import AlignmentProbe
from parallel_dkp.analysis.tensorboard import TensorBoardLogger
from parallel_dkp.checkpoint import Position
from parallel_dkp.config import Config, dump_config
from parallel_dkp.data import DatasetInfo, build_loaders
from parallel_dkp.guard import NonFiniteGuard
from parallel_dkp.models import block_output_shapes, build_blocks
from parallel_dkp.optim import Optimizers
from parallel_dkp.parallel.costs import choose_partition
from parallel_dkp.parallel.distributed import DistContext, StopRequest, distributed, peer_errors
from parallel_dkp.parallel.mesh import ReplicaAverager, replica_seed, resolve_layout
from parallel_dkp.parallel.metrics import StepMetrics
from parallel_dkp.parallel.schedules import Schedule, build_schedule
from parallel_dkp.parallel.stage import Stage
from parallel_dkp.parallel.timing import PHASE_LABELS, PHASES, NoTimer, make_timer
from parallel_dkp.parallel.transport import LocalTransport, Transport
from parallel_dkp.rules import build_rule


@dataclass
class Job:
    """Everything one rank holds for a run."""

    cfg: Config
    ctx: DistContext
    info: DatasetInfo
    partition: list[range]
    stage: Stage
    schedule: Schedule
    optimizers: Optimizers
    guard: NonFiniteGuard
    train_loader: object
    test_loader: object
    averager: ReplicaAverager | None = None
    """Averages this stage's gradients over its replicas (``None`` with one replica)."""
    alignment: list[dict] = field(default_factory=list)
    """Alignment rows measured on this rank and not yet written."""
    tensorboard: TensorBoardLogger | None = None
    """The last rank's TensorBoard logger, when ``run.tensorboard`` asks for one."""

    @property
    def timer(self) -> NoTimer:
        return self.schedule.timer


def build_job(cfg: Config, ctx: DistContext, *, profile: bool | None = None) -> Job:
    """Data, the seeded network, the stages × replicas layout, this rank's stage, its schedule
    and optimizers.

    The whole network is built on the CPU from per-block seeds (so every device and partition
    starts from the same numbers), then moved to this rank's device before anything measures
    or adapts it. Each replica reads its own shard of every batch. ``profile`` overrides
    ``run.profile`` (phase timers on or off).
    """
    torch.manual_seed(cfg.run.seed)
    train_loader, test_loader, info = build_loaders(cfg.data, seed=cfg.run.seed)
    blocks = build_blocks(cfg.model, input_shape=info.input_shape, num_classes=info.num_classes, seed=cfg.run.seed)
    ctx.use_layout(resolve_layout(
        world_size=ctx.world_size, num_blocks=len(blocks), stages=cfg.parallel.stages, replicas=cfg.parallel.replicas,
        partition=cfg.parallel.partition, batch_size=cfg.data.batch_size, microbatches=cfg.parallel.microbatches,
    ), cfg.parallel.timeout_s)
    if ctx.replicas > 1:
        train_loader.shard(ctx.replica, ctx.replicas, split_batches=True)
        test_loader.shard(ctx.replica, ctx.replicas, split_batches=False)
        # Replicas draw different dropout masks; replica 0 keeps the single-process stream.
        torch.manual_seed(replica_seed(cfg.run.seed, ctx.replica))
    out_shapes = block_output_shapes(blocks, info.input_shape)
    layout = torch.channels_last if cfg.run.channels_last else torch.preserve_format  # 4-D weights only
    blocks = blocks.to(ctx.device, memory_format=layout)
    batch = cfg.data.batch_size // ctx.replicas  # what one replica trains on per step
    microbatch = batch // cfg.parallel.microbatches
    rule = build_rule(cfg.rule)
    if not cfg.parallel.messages and not rule.backward_unlocked:
        raise ValueError(f"parallel.messages = false is for the backward-unlocked rules (dfa, dkp, drtp), not "
                         f"{cfg.rule.name}: torch's pipeline engine needs its gradients; set parallel.messages=true")
    partition = choose_partition(
        cfg.parallel.partition, ctx, blocks=blocks, input_shape=info.input_shape, microbatch=microbatch,
        input_grads=not rule.backward_unlocked,  # direct rules cut every block's input
    )
    own = partition[ctx.stage]
    stage = Stage(
        [blocks[i] for i in own], indices=own, num_blocks=len(blocks), rule=rule,
        out_shapes=out_shapes, num_classes=info.num_classes, seed=cfg.run.seed,
    )
    del blocks  # other ranks' blocks
    in_shape = info.input_shape if own.start == 0 else out_shapes[own.start - 1]
    transport_class = Transport if cfg.parallel.messages else LocalTransport
    transport = transport_class(ctx, is_first=stage.is_first, is_last=stage.is_last, in_shape=in_shape,
                                timeout_s=cfg.parallel.timeout_s, channels_last=cfg.run.channels_last,
                                error_messages=cfg.parallel.error_messages)
    schedule = build_schedule(
        stage, transport, ctx, in_shape=in_shape, out_shape=out_shapes[own.stop - 1], num_classes=info.num_classes,
        microbatches=cfg.parallel.microbatches, batch_size=batch,
        pipeline_schedule=cfg.parallel.schedule, channels_last=cfg.run.channels_last,
        engine_on_one_stage=cfg.parallel.engine_on_one_stage,
        timer=make_timer(ctx.device, cfg.run.profile if profile is None else profile),
    )
    optimizers = Optimizers(forward=stage.forward_parameters(), feedback=stage.feedback_parameters(), cfg=cfg.optim)
    guard = NonFiniteGuard(stage, ctx, mode=cfg.run.on_nonfinite, timeout_s=cfg.parallel.timeout_s, rule=cfg.rule.name)
    averager = None
    if ctx.replicas > 1:
        averager = ReplicaAverager(stage.forward_parameters() + stage.feedback_parameters(), list(stage.buffers()),
                                   group=ctx.replica_group, replicas=ctx.replicas, bucket_mb=cfg.parallel.bucket_mb)
    return Job(cfg, ctx, info, partition, stage, schedule, optimizers, guard, train_loader, test_loader, averager)


def train_step(job: Job, x: torch.Tensor, y: torch.Tensor, *, align: Position | None = None) -> StepMetrics:
    """One optimisation step of this rank's stage. Reads nothing back from the device (except
    with ``run.on_nonfinite = "skip_batch"``, which must decide before the optimizer step, and at
    an ``align`` step, which measures the alignment of this step's update into ``job.alignment``).

    ``x, y`` are this replica's shard of the batch. With several replicas the stage's gradients
    (and BN running statistics) are averaged over them: the all-reduce starts as soon as the
    stage's last local update is done and is waited for just before the optimizer step.
    """
    with peer_errors(job.ctx, job.cfg.parallel.timeout_s, "a training step"):
        job.stage.zero_grad(set_to_none=True)
        metrics = job.schedule.train_step(x, y)
        if job.averager is not None:
            job.averager.start()
        if align is not None:  # this replica's own update (the probe restores the gradients)
            job.alignment += AlignmentProbe(job).measure(x, y, step=align.global_step, epoch=align.epoch)
        job.guard.observe(metrics)  # before the optimizer step, on the device
        if job.averager is not None:
            with job.timer.phase("reduce"):
                job.averager.wait()
        if job.guard.mode == "skip_batch" and job.guard.skip_this_step():
            job.stage.zero_grad(set_to_none=True)
            return StepMetrics()  # the dropped step's loss stays out of the sums
        with job.timer.phase("optim"):
            job.optimizers.step()
    return metrics


def read_sums(job: Job, metrics: StepMetrics) -> tuple[float, int, int]:
    """``(loss_sum, correct, count)`` of ``metrics`` summed over this stage's replicas.
    Collective over the replicas: all of them call it at the same point."""
    if job.ctx.replica_group is None:
        return metrics.read()
    return metrics.read_summed(job.ctx.replica_group, job.schedule.device)


def train_one_epoch(
    job: Job, epoch: int, progress: Progress | None, *, position: Position | None = None,
    stop: StopRequest | None = None, out_dir: Path | None = None,
) -> tuple[StepMetrics, float, bool]:
    """Train epoch ``epoch`` from ``position`` on; returns the epoch's sums (last rank), the
    wall time of its training steps and whether the ranks agreed to stop early.

    Loss and accuracy stay on the device; they are read (one host sync) every
    ``run.log_every`` steps and at the end, where a non-finite loss stops the run. With
    ``out_dir``, a checkpoint is written every ``run.checkpoint_every`` steps and on a stop.
    """
    position = position or Position(epoch=epoch)
    # The saved sums are those of all replicas together: replica 0 carries them on.
    total = StepMetrics.restored(position.sums if job.ctx.replica == 0 else {}, job.schedule.device)
    seconds = float(position.sums.get("seconds", 0.0))
    num_steps = len(job.train_loader)
    if job.cfg.run.max_steps:
        num_steps = min(num_steps, job.cfg.run.max_steps)
    job.train_loader.set_epoch(epoch - 1)
    # Resuming mid-epoch: the epoch's batches from the next one on, exactly as uninterrupted.
    batches = itertools.islice(iter(job.train_loader), position.step, num_steps)
    task = progress.add_task(f"epoch {epoch}", total=num_steps, completed=position.step, stats="") if progress else None
    every, align_every = job.cfg.run.checkpoint_every, job.cfg.analysis.align_every
    job.guard.start_at(position.global_step)
    for x, y in batches:
        if stop is not None:
            stop.start()
        start = time.perf_counter()
        job.timer.start_step()
        aligning = align_every and (position.global_step + 1) % align_every == 0
        upcoming = Position(epoch=epoch, step=position.step + 1, global_step=position.global_step + 1)
        total += train_step(job, x, y, align=upcoming if aligning else None)
        job.timer.end_step()
        seconds += time.perf_counter() - start
        position.step += 1
        position.global_step += 1
        if aligning and out_dir is not None:
            _write_alignment(job, out_dir)
        stopping = stop is not None and stop.agreed()
        saving = out_dir is not None and (stopping or (every and position.global_step % every == 0))
        logging = position.step % job.cfg.run.log_every == 0 or position.step == num_steps
        if logging or saving:  # the read points: never log or save past a non-finite step
            last = checkpoint.latest(out_dir) if out_dir is not None else None
            job.guard.raise_if_bad(last_checkpoint=str(last) if last else None)
        if logging:
            _log(job, total, position.step, progress, task)
        elif progress is not None:
            progress.update(task, advance=1)
        if saving:
            _checkpoint(job, out_dir, position, total, seconds)
        if stopping:
            return total, seconds, True
    job.optimizers.epoch_end()
    return total, seconds, False


def _write_alignment(job: Job, out_dir: Path) -> None:
    """Gather every rank's alignment rows to the last rank, which appends them to alignment.jsonl."""
    # Replica 0's pipeline speaks for all: every replica measures the same rule on its own shard.
    mine = job.alignment if job.ctx.replica == 0 else []
    rows = [row for rank_rows in job.ctx.all_gather_object(mine) for row in rank_rows]
    job.alignment.clear()
    if job.ctx.reports:
        with (out_dir / "alignment.jsonl").open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in sorted(rows, key=lambda r: (r["block"], r["metric"])))
        if job.tensorboard is not None:
            job.tensorboard.log_alignment(rows)


def _checkpoint(job: Job, out_dir: Path, position: Position, total: StepMetrics | None, seconds: float) -> Path:
    if total is not None:
        loss_sum, correct, count = read_sums(job, total)
        position.sums = {"loss_sum": loss_sum, "correct": correct, "count": count, "seconds": seconds}
    else:
        position.sums = {}
    return checkpoint.save(
        out_dir, cfg=job.cfg, ctx=job.ctx, stage=job.stage, optimizers=job.optimizers, partition=job.partition,
        position=position, keep=job.cfg.run.keep_checkpoints,
    )


def _log(job: Job, total: StepMetrics, step: int, progress: Progress | None, task) -> None:
    """Read the running sums back (this waits for the device) and show them."""
    if not (job.ctx.is_last and job.cfg.run.progress):
        return
    loss_sum, correct, count = read_sums(job, total)  # on every replica of the last stage
    if progress is None:
        return
    stats = f"loss {loss_sum / max(count, 1):.4f}  acc {correct / max(count, 1):.2%}"
    progress.update(task, completed=step, stats=stats)


def evaluate(job: Job) -> StepMetrics:
    total = StepMetrics()
    for x, y in job.test_loader:
        with peer_errors(job.ctx, job.cfg.parallel.timeout_s, "evaluation"):
            total += job.schedule.eval_step(x, y)
    return total


class RunInterrupted(Exception):
    """Training stopped on request (SIGTERM, SIGINT) at a step boundary, after a checkpoint."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by that signal."""
        number = getattr(signal.Signals, self.signal_name, None)
        return 128 + int(number) if number is not None else 1


def train(cfg: Config, *, console: Console | None = None, resume: bool | None = None) -> list[dict]:
    """Train with ``cfg`` on this process (and its peers, when launched distributed).

    ``resume``: ``True`` continues from the newest checkpoint in ``run.out_dir`` (an error if
    there is none); ``None`` (the default) does so when one exists for the same config;
    ``False`` starts over, discarding the folder's old checkpoints.

    Returns the per-epoch metrics on the rank that owns the loss, ``[]`` elsewhere.
    Raises :class:`RunInterrupted` after a requested stop (its checkpoint is written).
    """
    console = console or Console(stderr=True, soft_wrap=True)
    with distributed(cfg.parallel, cfg.run) as ctx:
        return _train(cfg, ctx, console, resume)


def _train(cfg: Config, ctx: DistContext, console: Console, resume: bool | None) -> list[dict]:
    out_dir = Path(cfg.run.out_dir)
    found = ctx.broadcast_object(_checkpoint_to_resume(cfg, out_dir, resume, console if ctx.reports else None))
    job = build_job(cfg, ctx)
    position = Position()
    if found is not None:
        position = checkpoint.load(Path(found), stage=job.stage, optimizers=job.optimizers, device=ctx.device,
                                   replica=ctx.replica, replicas=ctx.replicas)
    reporter = ctx.reports
    history = _start_metrics(out_dir, cfg, position) if reporter else []
    if reporter:
        resumed = f" resumed from {found} (epoch {position.epoch}, step {position.step})" if found else ""
        console.print(
            f"[bold]parallel-dkp[/] rule={cfg.rule.name} model={cfg.model.name} data={cfg.data.name} "
            f"world_size={ctx.world_size} ({ctx.layout}) partition={[len(r) for r in job.partition]} "
            f"microbatches={cfg.parallel.microbatches} device={ctx.device}{resumed}"
        )
    if reporter and position.epoch > cfg.run.epochs:
        console.print(f"this run already finished its {cfg.run.epochs} epoch(s); raise run.epochs to train on")
    progress = _progress(console) if reporter and cfg.run.progress else None
    if reporter and cfg.run.tensorboard:
        job.tensorboard = TensorBoardLogger(out_dir / "tensorboard")
    with StopRequest(ctx, cfg.parallel.timeout_s) as stop, progress or contextlib.nullcontext():
        for epoch in range(position.epoch, cfg.run.epochs + 1):
            train_sums, seconds, stopped = train_one_epoch(
                job, epoch, progress, position=position, stop=stop, out_dir=out_dir)
            if stopped:
                raise RunInterrupted(_stop_message(cfg, position, out_dir), stop.signal_name or "SIGTERM")
            test_sums = evaluate(job)
            train_read, test_read = read_sums(job, train_sums), read_sums(job, test_sums)
            if reporter:
                row = _metrics_row(cfg, epoch, train_read, test_read, seconds, ctx)
                history.append(row)
                with (out_dir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
                if job.tensorboard is not None:
                    job.tensorboard.log_epoch(row)
                console.print(
                    f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%} | "
                    f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2%} | {seconds:.1f}s"
                )
            position = Position(epoch=epoch + 1, step=0, global_step=position.global_step)
            _checkpoint(job, out_dir, position, None, 0.0)  # the last one is the final model
    if job.tensorboard is not None:
        job.tensorboard.close()
    _report_phases(job, console, out_dir)
    return history


def evaluate_checkpoint(cfg: Config, *, directory: str | Path | None = None,
                        console: Console | None = None) -> dict | None:
    """Test metrics of a saved model: the newest checkpoint in ``run.out_dir`` or ``directory``,
    on this process's layout (any partition: shards are keyed by global block index).

    Returns ``{"test_loss", "test_acc", "test_examples", "checkpoint"}`` on the last rank.
    """
    console = console or Console(stderr=True, soft_wrap=True)
    found = Path(directory) if directory else checkpoint.latest(cfg.run.out_dir)
    if found is None or not (found / checkpoint.MANIFEST).is_file():
        raise FileNotFoundError(
            f"no complete checkpoint {'at ' + str(directory) if directory else 'in ' + cfg.run.out_dir}; "
            "train first, or point --checkpoint at a checkpoint folder (one holding manifest.json)"
        )
    # The network's shape comes from these keys: a checkpoint of another one cannot be loaded.
    shaping = ("model.", "rule.name", "data.name", "data.image_size", "data.synthetic_shape", "data.synthetic_classes")
    differences = [d for d in checkpoint.config_differences(checkpoint.read_manifest(found)["config"], cfg)
                   if d.startswith(shaping)]
    if differences:
        raise ValueError(
            f"checkpoint {found} was trained with another network ({'; '.join(differences[:4])}); evaluate it with "
            f"the config it was trained with: --config {found.parent.parent / 'config.toml'}"
        )
    with distributed(cfg.parallel, cfg.run) as ctx:
        job = build_job(cfg, ctx)
        checkpoint.load(found, stage=job.stage, optimizers=None, device=ctx.device, restore_rng=False)
        loss_sum, correct, count = read_sums(job, evaluate(job))
    if not ctx.reports:
        return None
    result = {"test_loss": loss_sum / max(count, 1), "test_acc": correct / max(count, 1),
              "test_examples": count, "checkpoint": str(found)}
    console.print(f"{found}: test loss {result['test_loss']:.4f} acc {result['test_acc']:.2%} "
                  f"({count} examples, {ctx.world_size} rank(s))")
    return result


def _checkpoint_to_resume(cfg: Config, out_dir: Path, resume: bool | None, console: Console | None) -> str | None:
    """The checkpoint this run continues from (decided by one rank, shared with all)."""
    newest = checkpoint.latest(out_dir)
    if resume is False:
        if newest is not None:
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
            if console is not None:
                console.print(f"starting over: removed the old checkpoints in {out_dir / 'checkpoints'}")
        return None
    if newest is None:
        if resume:
            raise FileNotFoundError(
                f"--resume: {out_dir} holds no complete checkpoint (looked for {out_dir}/checkpoints/step-*/"
                f"{checkpoint.MANIFEST}); drop --resume to start a new run there"
            )
        return None
    differences = checkpoint.config_differences(checkpoint.read_manifest(newest)["config"], cfg)
    if differences:
        raise ValueError(
            f"run.out_dir {out_dir} holds a checkpoint of a different run ({'; '.join(differences[:4])}); "
            "set another run.out_dir, or pass --no-resume to discard it and start over there"
        )
    return str(newest)


def _start_metrics(out_dir: Path, cfg: Config, position: Position) -> list[dict]:
    """Write the resolved config; keep the metrics (and alignment) rows of the epochs (steps)
    already done when resuming, none otherwise."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir / "config.toml")
    path = out_dir / "metrics.jsonl"
    rows = []
    if position.epoch > 1 and path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [row for row in rows if row["epoch"] < position.epoch]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # Alignment rows of steps the resumed run will measure again are dropped.
    align = out_dir / "alignment.jsonl"
    if align.is_file():
        kept = [line for line in align.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= position.global_step]
        align.write_text("".join(line + "\n" for line in kept))
    return rows


def _stop_message(cfg: Config, position: Position, out_dir: Path) -> str:
    if Path(sys.argv[0]).name in ("parallel-dkp", "__main__.py"):  # the command line (or torchrun -m)
        command = " ".join(shlex.quote(a) for a in ["parallel-dkp", *sys.argv[1:]])
        command += "" if "--resume" in sys.argv else " --resume"
    else:
        command = "train(cfg, resume=True)"
    return (
        f"stopped at epoch {position.epoch}, step {position.step} (global step {position.global_step}); "
        f"checkpoint written to {out_dir / 'checkpoints'}. Resume with: {command} "
        "(under torchrun, relaunch the same torchrun command: it resumes from run.out_dir)"
    )


def _metrics_row(cfg: Config, epoch: int, train: tuple[float, int, int], test: tuple[float, int, int],
                 seconds: float, ctx: DistContext) -> dict:
    train_loss, train_correct, train_count = train
    test_loss, test_correct, test_count = test
    return {
        "epoch": epoch,
        "rule": cfg.rule.name,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "train_loss": train_loss / max(train_count, 1),
        "train_acc": train_correct / max(train_count, 1),
        "test_loss": test_loss / max(test_count, 1),
        "test_acc": test_correct / max(test_count, 1),
        "train_seconds": seconds,
        "train_examples": train_count,
        "test_examples": test_count,
        "world_size": ctx.world_size,
        "stages": ctx.stages,
        "replicas": ctx.replicas,
    }


def _report_phases(job: Job, console: Console, out_dir: Path) -> None:
    """Per-rank median seconds per step of each phase, gathered to and shown by the last rank
    (only when ``run.profile`` timed them)."""
    if not job.timer.enabled:
        return
    summary = job.timer.summary(skip=1)
    summary["rank"] = job.ctx.rank
    summary["stage"], summary["replica"] = job.ctx.stage, job.ctx.replica
    summary["blocks"] = [job.partition[job.ctx.stage].start, job.partition[job.ctx.stage].stop]
    summary["cores"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    rows = job.ctx.all_gather_object(summary)
    if not job.ctx.reports or not rows[0].get("step"):
        return
    table = Table(title="median ms per step, per rank (first step skipped)")
    for column in ("rank", "blocks", *PHASE_LABELS, "step", "idle"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["rank"]), f"{row['blocks'][0]}-{row['blocks'][1] - 1}",
            *(f"{row[p] * 1e3:.1f}" for p in PHASES), f"{row['step'] * 1e3:.1f}",
            # Inside torch.distributed.pipelining compute and waiting are not told apart.
            "n/a" if row["pipeline"] else f"{row['idle_fraction']:.0%}",
        )
    console.print(table)
    (out_dir / "phases.json").write_text(json.dumps({"machine": platform.node(), "ranks": rows}, indent=2))


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"), console=console, transient=False,
    )
