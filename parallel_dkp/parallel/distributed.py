"""The one place that sets up distribution: environment, backend, device, process groups."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel_dkp.config import ParallelConfig, RunConfig
from parallel_dkp.cpu_memory import keep_freed_memory
from parallel_dkp.parallel.affinity import bind_ranks
from parallel_dkp.parallel.mesh import Layout

_world_of_one = False
"""Whether this process made its own world of one (:meth:`DistContext.group_of_one`)."""


@dataclass
class DistContext:
    """Where this process stands. ``world_size == 1`` is the single-process fallback.

    ``layout`` places the ranks on a stages × replicas grid (:mod:`parallel_dkp.parallel.mesh`);
    until :meth:`use_layout` is called every rank is a stage of one pipeline.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    layout: Layout | None = None
    pipeline_group: object = None
    """This replica's pipeline (``None``: the whole world, when there is one replica)."""
    replica_group: object = None
    """This stage's replicas (``None`` when there is one replica)."""

    def __post_init__(self) -> None:
        if self.layout is None:
            self.layout = Layout(stages=self.world_size, replicas=1)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def stage(self) -> int:
        """This rank's pipeline stage."""
        return self.layout.coords(self.rank)[0]

    @property
    def replica(self) -> int:
        """Which copy of its stage this rank is (0 … replicas-1)."""
        return self.layout.coords(self.rank)[1]

    @property
    def stages(self) -> int:
        return self.layout.stages

    @property
    def replicas(self) -> int:
        return self.layout.replicas

    @property
    def pipelined(self) -> bool:
        """Whether this rank's pipeline spans several ranks (activations and errors travel)."""
        return self.layout.stages > 1

    @property
    def is_last(self) -> bool:
        """This rank holds its pipeline's last stage: the output block and the loss."""
        return self.stage == self.stages - 1

    @property
    def reports(self) -> bool:
        """The one rank that prints, logs metrics and writes manifests: replica 0's last stage."""
        return self.is_last and self.replica == 0

    @property
    def last_rank(self) -> int:
        """The global rank of this pipeline's last stage (the source of the error broadcast)."""
        return self.layout.rank(self.stages - 1, self.replica)

    def pipeline_rank(self, stage: int) -> int:
        """The global rank of ``stage`` in this rank's pipeline."""
        return self.layout.rank(stage, self.replica)

    def use_layout(self, layout: Layout, timeout_s: float) -> None:
        """Place the ranks on ``layout`` and build its process groups (collective: every rank
        calls it with the same layout at the same point of its program)."""
        if layout.world_size != self.world_size:
            raise ValueError(f"layout {layout} does not have {self.world_size} ranks")
        if layout == self.layout and (layout.replicas == 1 or self.replica_group is not None):
            return
        self.layout = layout
        self.pipeline_group = self.replica_group = None
        if layout.replicas > 1:
            self.pipeline_group = self.group_of(layout.pipelines(), timeout_s)
            self.replica_group = self.group_of(layout.stage_groups(), timeout_s)

    def device_mesh(self):
        """The layout as a ``torch.distributed.DeviceMesh`` of shape ``(stages, replicas)`` with
        dimensions ``("pp", "dp")``, built on the run's own process groups (so it keeps their
        timeouts), for tools that compose with meshes (DTensor, FSDP). Needs replicas > 1 (the
        groups exist only then) and torch >= 2.5 (multi-dimensional ``DeviceMesh.from_group``)."""
        from torch.distributed.device_mesh import DeviceMesh

        if self.replica_group is None:
            raise ValueError(f"{self.layout}: a device mesh is built for runs with parallel.replicas > 1")
        if torch.__version__ < (2, 5):
            raise RuntimeError(f"DeviceMesh.from_group with two groups needs torch >= 2.5, not {torch.__version__}")
        grid = torch.arange(self.world_size).view(self.stages, self.replicas)
        return DeviceMesh.from_group([self.pipeline_group, self.replica_group], self.device.type, mesh=grid,
                                     mesh_dim_names=("pp", "dp"))

    def group_of(self, families: list[list[int]], timeout_s: float):
        """A process group per rank list of ``families`` (disjoint, covering the world); returns
        the one holding this rank. Collective: every rank creates every group, in order."""
        mine = None
        for ranks in families:
            group = dist.new_group(ranks=ranks, backend=self.backend, timeout=timedelta(seconds=timeout_s))
            if self.rank in ranks:
                mine = group
        return mine

    def group_of_one(self):
        """A process group of this rank alone, for tools that need a group on one process (torch's
        pipelining engine on a one-stage pipeline). Outside a launched world this process joins a
        world of one (an in-process store, no network; left with the run, see :func:`distributed`)
        and the group is that world (``None``, the default group); inside one, only this rank
        creates it, the others go on."""
        global _world_of_one
        if dist.is_initialized():
            return None if _world_of_one else dist.new_group([dist.get_rank()], use_local_synchronization=True)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        kwargs = {"device_id": self.device} if backend == "nccl" else {}
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        _world_of_one = True
        return None

    # World-level collectives used outside the training step (setup, reports, benchmarks).
    # On a single process each one is the identity.

    def broadcast_object(self, obj, src: int = 0):
        """``obj`` of rank ``src``, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(run: RunConfig, local_rank: int = 0) -> torch.device:
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device = 'cuda' but CUDA is not available here; use run.device=cpu or auto")
    if run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(parallel: ParallelConfig, run: RunConfig) -> DistContext:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun, accelerate launch, srun torchrun) and join.

    Not launched distributed (no WORLD_SIZE, or 1): the single-process fallback, no group.
    """
    mpi_size = os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE")
    if "WORLD_SIZE" not in os.environ and mpi_size and int(mpi_size) > 1:
        # Otherwise every MPI process would quietly train its own single-process copy.
        raise ValueError(
            f"launched by MPI with {mpi_size} processes, but WORLD_SIZE/RANK are not set; launch with "
            "torchrun (or srun torchrun, or accelerate launch with launch/accelerate_cpu.yaml)"
        )
    world_size, rank, local_rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise ValueError(
            f"WORLD_SIZE={world_size} is set in the environment but MASTER_ADDR/MASTER_PORT are not, so this "
            "process was not started by torchrun (a stale export?); for one process run `unset WORLD_SIZE RANK "
            f"LOCAL_RANK`, for {world_size} ranks launch: torchrun --nproc-per-node {world_size} "
            "-m parallel_dkp train ..."
        )
    if world_size > 1 and not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside 0..{world_size - 1} (WORLD_SIZE={world_size}); launch with torchrun")
    if run.keep_freed_memory:
        keep_freed_memory()  # before the run allocates anything large
    device = resolve_device(run, local_rank)
    if world_size == 1:
        return DistContext(device=device)

    backend = parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        if device.type != "cuda":
            raise ValueError("parallel.backend = 'nccl' needs CUDA; use parallel.backend=gloo on CPU")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} has no GPU (this node has {torch.cuda.device_count()}); "
                "launch at most one rank per GPU"
            )
        torch.cuda.set_device(device)  # before the first NCCL call, one GPU per rank
    timeout = timedelta(seconds=parallel.timeout_s)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    ctx = DistContext(rank, world_size, local_rank, device, backend)
    if run.bind_cores and device.type == "cpu":
        bind_ranks(ctx)  # every thread of the rank, gloo's included
    return ctx


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={text!r} is not an integer; unset it or launch with torchrun"
        ) from None


class PeerFailure(RuntimeError):
    """A transfer or collective with another rank failed: it crashed, hung up or timed out."""


@contextmanager
def peer_errors(ctx: DistContext, timeout_s: float, what: str):
    """Turn a failed P2P transfer or collective into a ``PeerFailure`` that says what to do."""
    try:
        yield
    except PeerFailure:
        raise
    except RuntimeError as err:  # torch.distributed.DistError and gloo's errors are RuntimeErrors
        if not ctx.distributed or not _is_communication_error(err):
            raise
        raise PeerFailure(
            f"rank {ctx.rank}/{ctx.world_size}: lost a peer during {what} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}). Another rank has probably crashed or hung - its log "
            f"says why. Each wait is bounded by parallel.timeout_s={timeout_s:g}."
        ) from err


def _is_communication_error(err: RuntimeError) -> bool:
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


@contextmanager
def distributed(parallel: ParallelConfig, run: RunConfig):
    """``init_distributed``, then leave the group cleanly: after a normal exit all ranks meet at
    a barrier first (without it, torch 2.4's gloo teardown could hang a rank whose peer had
    already gone); after an error the group is torn down at once, since peers may be dead."""
    ctx = init_distributed(parallel, run)
    try:
        yield ctx
    except BaseException:
        _destroy(ctx)
        raise
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
    _destroy(ctx)


def _destroy(ctx: DistContext) -> None:
    global _world_of_one
    if (ctx.distributed or _world_of_one) and dist.is_initialized():
        dist.destroy_process_group()
    _world_of_one = False


class StopRequest:
    """SIGTERM / SIGINT (pre-emption, Ctrl-C) turned into a stop that every rank agrees on.

    The signal handler only sets a flag. At each step boundary the ranks combine their flags
    with an all-reduce on a CPU (gloo) group of its own, started before the step and read after
    it, so it overlaps the step and never waits on a GPU queue; every rank therefore sees the
    same answer after the same step. A second Ctrl-C interrupts at once, as usual.
    """

    def __init__(self, ctx: DistContext, timeout_s: float) -> None:
        self.ctx = ctx
        self.signal_name: str | None = None
        self._group = None
        if ctx.distributed:
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self._pending = None
        self._flag = torch.zeros(1)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.signal_name = signal.Signals(signum).name

    def request(self, name: str = "request") -> None:
        """Ask for a stop from code (tests, callbacks), as a signal would."""
        self.signal_name = self.signal_name or name

    def start(self) -> None:
        """Contribute this rank's flag (before a step)."""
        self._flag.fill_(1.0 if self.signal_name else 0.0)
        if self._group is not None:
            self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)

    def agreed(self) -> bool:
        """Whether any rank asked to stop before this step (after it)."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        return bool(self._flag.item())  # a CPU tensor: no device is waited for
