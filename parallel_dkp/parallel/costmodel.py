"""A cost model of one training step: layer-parallel direct rules against pipelined backprop.

Pure Python, no torch: it replays each stage's program, op by op, as the schedules in
``schedules.py`` and ``torch.distributed.pipelining`` issue them, and returns the time at which
the slowest stage finishes. Inputs are measured (``costs.measure_block_phases`` and
``bench.measure_link``) per block and per micro-batch:

* ``forward`` F — the block's forward pass;
* ``backward`` B — its backprop backward (input gradient included, except for block 0);
* ``update`` U — its direct-rule local update (``e·B_j``, the backward inside the block, ``eᵀa_j``;
  for the output block: the output error and its backward);
* ``optim_bp`` / ``optim_direct`` — its optimizer step (once per step), and the bytes it sends on;
* ``weight_bytes`` / ``feedback_bytes`` — what its replicas average after a step: the gradients of
  its weights (and its BN statistics), and of its learned feedback matrix (direct rules).

Per stage and micro-batch, torch's pipelining engine (bp's GPipe and 1F1B) also spends host time
of its own around the blocks' phases (``engine_overhead``, measured by running it on one stage
beside the plain loop).

Communication follows a rendezvous model (gloo and NCCL both move a message once the receiver
has posted its receive): a message of ``n`` bytes completes at ``max(send posted, receive
posted) + latency + n / bandwidth`` and costs the sender and receiver nothing else. Compute on
one rank is sequential. With a balanced pipeline and no communication the model reduces to the
closed forms (tested): GPipe ``(M+N-1)(F+B)``, direct ``M(F+U) + (N-1)F``.

Stages × replicas: every replica runs the same program on its own shard, so one pipeline is
replayed and each stage, once its last local update (or backward) is done, spends a ring
all-reduce of its bytes over its ``R`` replicas, ``2(R-1)·(latency + n/(R·bandwidth))``, before
its optimizer step. Stages reduce independently, so one stage's reduction overlaps with the
others' remaining work; the step ends when the slowest stage has stepped.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Sequence

from parallel_dkp.parallel.partition import balanced_partition

Method = Literal["direct", "targets", "gpipe", "1f1b"]
METHODS: tuple[Method, ...] = ("direct", "targets", "gpipe", "1f1b")
"""``direct``: dfa/dkp (:class:`DirectSchedule`); ``targets``: drtp; ``gpipe``/``1f1b``: bp through
torch.distributed.pipelining (on one rank both are the serial schedule)."""


@dataclass(frozen=True)
class Link:
    """A point-to-point link: ``seconds(n) = latency_s + n / bandwidth_Bps``.

    ``host_copies``: the ranks' own cores move every message (gloo over TCP on CPUs), so a
    message also takes ``n / bandwidth_Bps`` of compute from its sender when posted, and from its
    receiver when it had arrived before the receiver asked for it (copied in while the receiver
    computed). GPU links (NCCL) copy without the host: ``False``."""

    latency_s: float = 0.0
    bandwidth_Bps: float = float("inf")
    host_copies: bool = False

    def seconds(self, num_bytes: float) -> float:
        return self.latency_s + num_bytes / self.bandwidth_Bps

    def copy_seconds(self, num_bytes: float) -> float:
        """Compute time a message takes from each end (0 unless ``host_copies``)."""
        return num_bytes / self.bandwidth_Bps if self.host_copies else 0.0


TIMED_PHASES = ("forward", "backward", "update", "optim_bp", "optim_direct", "relayout")
"""The per-block times a :class:`BlockCosts` holds."""


@dataclass(frozen=True)
class BlockCosts:
    """Measured seconds per micro-batch of every block (lists indexed by block), and bytes."""

    forward: Sequence[float]
    backward: Sequence[float]
    update: Sequence[float]
    optim_bp: Sequence[float]
    optim_direct: Sequence[float]
    out_bytes: Sequence[float]
    """Bytes of each block's output for one micro-batch (what a stage boundary after it sends)."""
    error_bytes: float = 0.0
    """Bytes of one micro-batch's output error (broadcast by the last stage)."""
    weight_bytes: Sequence[float] = ()
    """Bytes each block's replicas average per step: its weights' gradients and BN statistics
    (empty: not measured, taken as 0)."""
    feedback_bytes: Sequence[float] = ()
    """Bytes of each block's learned feedback gradient (DKP's ``B_j``), averaged by the direct rules."""
    relayout: Sequence[float] = ()
    """Seconds to copy each block's output (one micro-batch) from the run's channels-last storage
    into the default layout (empty: not channels-last, taken as 0). torch's pipelining engine
    moves activations and gradients across stage boundaries in the default layout, so with
    channels-last stages each crossing costs such a copy on both sides; our transport sends the
    storage as it is."""

    def __post_init__(self) -> None:
        for name in ("weight_bytes", "feedback_bytes", "relayout"):
            if not len(getattr(self, name)):
                object.__setattr__(self, name, [0.0] * len(self.forward))
        sizes = {len(v) for v in (self.forward, self.backward, self.update, self.optim_bp, self.optim_direct,
                                  self.out_bytes, self.weight_bytes, self.feedback_bytes, self.relayout)}
        if len(sizes) != 1:
            raise ValueError(f"BlockCosts lists must all have one entry per block, got lengths {sorted(sizes)}")

    @property
    def num_blocks(self) -> int:
        return len(self.forward)

    def as_dict(self) -> dict:
        return {k: list(getattr(self, k)) if k != "error_bytes" else self.error_bytes
                for k in ("forward", "backward", "update", "optim_bp", "optim_direct", "out_bytes", "error_bytes",
                          "weight_bytes", "feedback_bytes", "relayout")}

    @classmethod
    def from_dict(cls, d: dict) -> "BlockCosts":
        return cls(**d)

    def scaled(self, factors: dict[str, float]) -> "BlockCosts":
        """Every block's time of each named phase (``forward``, ``backward``, ``update``,
        ``optim_bp``, ``optim_direct``, ``relayout``) multiplied by its factor; bytes unchanged."""
        unknown = set(factors) - set(TIMED_PHASES)
        if unknown:
            raise ValueError(f"no such phase to scale: {sorted(unknown)}")
        return replace(self, **{k: [v * f for v in getattr(self, k)] for k, f in factors.items()})

    def repeated(self, num_blocks: int) -> "BlockCosts":
        """A deeper network of the same kind: the middle (repeated) block copied until there are
        ``num_blocks``; the first and last blocks stay. For stacks of equal blocks (vit, convdeep)."""
        if self.num_blocks < 3 or num_blocks < 2:
            raise ValueError("repeating needs a first, a middle and a last block, and at least 2 blocks out")
        idx = [0] + [self.num_blocks // 2] * (num_blocks - 2) + [self.num_blocks - 1]
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return BlockCosts(pick(self.forward), pick(self.backward), pick(self.update), pick(self.optim_bp),
                          pick(self.optim_direct), pick(self.out_bytes), self.error_bytes, pick(self.weight_bytes),
                          pick(self.feedback_bytes), pick(self.relayout))


@dataclass(frozen=True)
class StageCosts:
    """One stage's seconds per micro-batch (sums over its blocks) and its boundary bytes."""

    forward: float
    backward: float
    update_hidden: float
    """Local updates of the stage's hidden blocks (drained one micro-batch behind)."""
    update_output: float
    """The last stage's output error and output-block backward (0 elsewhere)."""
    optim: float
    send_bytes: float
    """Bytes of the stage's output per micro-batch (0 on the last stage)."""
    reduce_bytes: float = 0.0
    """Bytes the stage's replicas average after a step."""


def stage_costs(costs: BlockCosts, partition: Sequence[range], method: Method,
                engine_overhead: float = 0.0) -> list[StageCosts]:
    """Each stage's costs under ``method``. ``engine_overhead``: host seconds torch's pipelining
    engine spends per micro-batch and stage beyond the blocks' own phases (its Python around each
    chunk: micro-batch bookkeeping, the autograd call it makes, the loss), measured on one stage
    against the plain loop (``bench``); half is added to each forward and half to each backward
    of ``gpipe``/``1f1b`` (it is host time, so every stage pays all of it, however few its blocks)."""
    last = costs.num_blocks - 1
    torch_engine = method in ("gpipe", "1f1b")
    chunk = engine_overhead / 2 if torch_engine else 0.0
    optim = costs.optim_bp if torch_engine else costs.optim_direct
    stages = []
    for r in partition:
        hidden = [i for i in r if i != last]
        # torch's engine: the input received and the output sent are re-laid out in the forward,
        # their gradients in the backward (0 where the run is not channels-last)
        relayout = ((costs.relayout[r.start - 1] if r.start > 0 else 0.0)
                    + (costs.relayout[r.stop - 1] if last not in r else 0.0)) if torch_engine else 0.0
        stages.append(StageCosts(
            forward=sum(costs.forward[i] for i in r) + relayout + chunk,
            backward=sum(costs.backward[i] for i in r) + relayout + chunk,
            update_hidden=sum(costs.update[i] for i in hidden),
            update_output=costs.update[last] if last in r else 0.0,
            optim=sum(optim[i] for i in r),
            send_bytes=0.0 if last in r else costs.out_bytes[r.stop - 1],
            reduce_bytes=sum(costs.weight_bytes[i] + (costs.feedback_bytes[i] if method == "direct" else 0.0)
                             for i in r),
        ))
    return stages


# --------------------------------------------------------------------------- the replay


@dataclass
class _Op:
    kind: Literal["compute", "send", "post", "recv", "wait", "bcast_root", "bcast_post", "bcast_wait", "mark"]
    seconds: float = 0.0
    key: tuple = ()
    keys: tuple = ()


@dataclass
class _Replay:
    """Each stage's ops, replayed with rendezvous messages until every stage has finished."""

    programs: list[list[_Op]]
    link: Link
    sizes: dict = field(default_factory=dict)
    marks: list[list[float]] = field(default_factory=list)
    """Each stage's clock at its ``mark`` ops (the end of each of its steps)."""

    def run(self) -> list[float]:
        n = len(self.programs)
        self.marks = [[] for _ in range(n)]
        clock, pc = [0.0] * n, [0] * n
        posted: dict[tuple, float] = {}  # (role, key) -> time posted
        done: dict[tuple, float] = {}  # key -> time the message completed
        while any(pc[s] < len(self.programs[s]) for s in range(n)):
            progressed = False
            for s in range(n):
                while pc[s] < len(self.programs[s]):
                    op = self.programs[s][pc[s]]
                    t = self._try(op, s, clock[s], posted, done)
                    if t is None:
                        break
                    clock[s], pc[s], progressed = t, pc[s] + 1, True
            if not progressed:
                stuck = {s: self.programs[s][pc[s]] for s in range(n) if pc[s] < len(self.programs[s])}
                raise RuntimeError(f"cost model deadlock (a schedule bug): {stuck}")
        return clock

    def _complete(self, key, posted, done) -> float | None:
        if key in done:
            return done[key]
        if ("send", key) in posted and ("recv", key) in posted:
            done[key] = max(posted["send", key], posted["recv", key]) + self.link.seconds(self.sizes[key])
            return done[key]
        return None

    def _try(self, op: _Op, s: int, now: float, posted, done) -> float | None:
        if op.kind == "compute":
            return now + op.seconds
        if op.kind == "mark":
            self.marks[s].append(now)
            return now
        if op.kind == "send":  # asynchronous: posting costs nothing, unless the host copies
            posted.setdefault(("send", op.key), now)
            return now + self.link.copy_seconds(self.sizes[op.key])
        if op.kind == "post":  # a receive posted ahead of the blocking ``recv`` that completes it
            posted.setdefault(("recv", op.key), now)
            return now
        if op.kind == "recv":  # blocking
            posted.setdefault(("recv", op.key), now)
            end = self._complete(op.key, posted, done)
            if end is None:
                return None
            return now + self.link.copy_seconds(self.sizes[op.key]) if end <= now else end
        if op.kind == "wait":  # for sends (or receives) posted earlier
            ends = [self._complete(k, posted, done) for k in op.keys]
            return None if any(e is None for e in ends) else max([now, *ends])
        if op.kind == "bcast_root":
            posted.setdefault(("root", op.key), now)
            posted.setdefault(("root_stage", op.key), s)
            return now
        if op.kind == "bcast_post":
            posted.setdefault(("leaf", op.key, s), now)
            return now
        if op.kind == "bcast_wait":
            if ("root", op.key) not in posted:
                return None
            root = posted["root", op.key]
            if posted["root_stage", op.key] == s:  # the root has e already: its send only leaves
                return max(now, root)
            start = max(root, posted.get(("leaf", op.key, s), root))
            return max(now, start + self.link.seconds(self.sizes[op.key]))
        raise AssertionError(op.kind)


def update_lag(stage: int, num_stages: int) -> int:
    """How many micro-batches behind its forward pass a stage runs its local updates under the
    direct schedule: the error of micro-batch ``m`` exists once ``m`` has crossed the stages after
    this one, so waiting for it any sooner would stall the forward pipeline. The last stage, which
    has ``e[m]`` at once, still lags by one: it forwards micro-batch m+1 (and sends its error on)
    before it updates m, so the earlier stages finish their steps first and start the next while it
    catches up. In training, where steps follow one another, that hides the pipeline's fill (a step
    costs M(F+U), not M(F+U)+F, when balanced). Updating at once (lag 0) was 1-3 % faster in steps
    that start together on every rank, but 2-4 % slower back to back (vit and convdeep, 2 ranks)."""
    return max(1, num_stages - 1 - stage)


def _act(s: int, m: int) -> tuple:
    return ("act", s, m)  # stage s's output of micro-batch m, to stage s+1


def _grad(s: int, m: int) -> tuple:
    return ("grad", s, m)  # gradient of stage s's input of micro-batch m, to stage s-1


@dataclass
class _Program:
    """The ops of stage ``s`` of ``n``, with helpers that write them in the schedules' words."""

    s: int
    n: int
    cost: StageCosts
    ops: list[_Op] = field(default_factory=list)
    base: int = 0
    """Micro-batches of the steps before this one: message keys number micro-batches across steps."""

    @property
    def first(self) -> bool:
        return self.s == 0

    @property
    def last(self) -> bool:
        return self.s == self.n - 1

    def compute(self, seconds: float) -> None:
        if seconds:
            self.ops.append(_Op("compute", seconds))

    def act_out(self, m: int) -> list[tuple]:
        return [] if self.last else [_act(self.s, self.base + m)]

    def act_in(self, m: int) -> list[tuple]:
        return [] if self.first else [_act(self.s - 1, self.base + m)]

    def grad_out(self, m: int) -> list[tuple]:
        return [] if self.first else [_grad(self.s, self.base + m)]

    def grad_in(self, m: int) -> list[tuple]:
        return [] if self.last else [_grad(self.s + 1, self.base + m)]

    def err(self, m: int) -> tuple:
        return ("err", self.base + m)

    def send(self, keys: list[tuple]) -> None:
        self.ops += [_Op("send", key=k) for k in keys]

    def recv(self, keys: list[tuple]) -> None:
        self.ops += [_Op("recv", key=k) for k in keys]

    def post(self, keys: list[tuple]) -> None:
        self.ops += [_Op("post", key=k) for k in keys]

    def wait(self, keys: list[tuple]) -> None:
        self.ops.append(_Op("wait", keys=tuple(keys)))

    def exchange(self, sends: list[tuple], recvs: list[tuple]) -> None:
        """Sends and receives fired as one batch and waited for together (torch's fused P2P)."""
        self.send(sends)
        self.recv(recvs)
        self.wait(sends)


def _direct(p: _Program, M: int, *, targets: bool) -> None:
    """:class:`DirectSchedule` (``targets``: :class:`TargetsSchedule`)."""
    lag, c = update_lag(p.s, p.n), p.cost
    for m in range(M):
        p.recv(p.act_in(m))
        if m + 1 < M:  # the next micro-batch's receive is posted before computing this one
            p.post(p.act_in(m + 1))
        p.compute(c.forward)
        p.send(p.act_out(m))
        if targets:
            p.compute(c.update_output + c.update_hidden)
            continue
        # The error is broadcast as soon as it exists, before the output block's backward.
        p.ops.append(_Op("bcast_root" if p.last else "bcast_post", key=p.err(m)))
        p.compute(c.update_output)
        if m >= lag:
            p.ops.append(_Op("bcast_wait", key=p.err(m - lag)))
            p.compute(c.update_hidden)
    if not targets:
        for m in range(max(0, M - lag), M):
            p.ops.append(_Op("bcast_wait", key=p.err(m)))
            p.compute(c.update_hidden)
    p.wait([k for m in range(M) for k in p.act_out(m)])


def _gpipe(p: _Program, M: int) -> None:
    """torch.distributed.pipelining's ScheduleGPipe: every forward, then every backward."""
    for m in range(M):
        p.recv(p.act_in(m))
        p.compute(p.cost.forward)
        p.send(p.act_out(m))
    for m in range(M):
        p.recv(p.grad_in(m))
        p.compute(p.cost.backward)
        p.send(p.grad_out(m))
    p.wait([k for m in range(M) for k in p.act_out(m) + p.grad_out(m)])


def _one_f_one_b(p: _Program, M: int) -> None:
    """torch.distributed.pipelining's Schedule1F1B, op for op: ``N - s`` warm-up forwards (the
    last one's send held back and fused with the first backward's receive), then one backward
    and one forward in turn, then the remaining backwards."""
    warmup = min(M, p.n - p.s)
    f = b = 0
    in_flight: list[tuple] = []
    held: list[tuple] = []
    for _ in range(warmup):
        p.recv(p.act_in(f))
        p.compute(p.cost.forward)
        p.wait(in_flight)
        in_flight, held = ([], p.act_out(f)) if f == warmup - 1 else (p.act_out(f), [])
        p.send(in_flight)
        f += 1
    while True:
        p.exchange(held, p.grad_in(b))
        p.compute(p.cost.backward)
        held = p.grad_out(b)
        b += 1
        if f == M:
            break
        p.exchange(held, p.act_in(f))
        p.compute(p.cost.forward)
        held = p.act_out(f)
        f += 1
    p.send(held)
    in_flight = held
    while b < M:
        p.recv(p.grad_in(b))
        p.compute(p.cost.backward)
        p.wait(in_flight)
        in_flight = p.grad_out(b)
        p.send(in_flight)
        b += 1
    p.wait(in_flight)


def allreduce_seconds(num_bytes: float, replicas: int, link: Link) -> float:
    """A ring all-reduce of ``num_bytes`` over ``replicas`` ranks: ``2(R-1)`` transfers of ``n/R``."""
    if replicas <= 1 or not num_bytes:
        return 0.0
    return 2 * (replicas - 1) * link.seconds(num_bytes / replicas)


def _programs(stages: list[StageCosts], M: int, method: Method, sizes: dict, error_bytes: float,
              replicas: int = 1, reduce_link: Link = Link(), step_overhead: float = 0.0,
              steps: int = 1) -> list[list[_Op]]:
    """Each stage's ops for ``steps`` steps run back to back (a stage starts its next step as
    soon as it is done with the last, as training does), each step ending in a ``mark``."""
    n = len(stages)
    for m in range(steps * M):
        sizes[("err", m)] = error_bytes
    for s, st in enumerate(stages[:-1]):
        for m in range(steps * M):
            sizes[_act(s, m)] = sizes[_grad(s + 1, m)] = st.send_bytes
    programs = []
    for s, cost in enumerate(stages):
        p = _Program(s, n, cost)
        for step in range(steps):
            p.base = step * M
            p.compute(step_overhead)  # the step's own host work outside the measured phases
            if method in ("direct", "targets"):
                _direct(p, M, targets=method == "targets")
            elif method == "gpipe" or n == 1:
                _gpipe(p, M)
            else:
                _one_f_one_b(p, M)
            p.compute(allreduce_seconds(cost.reduce_bytes, replicas, reduce_link))  # over the stage's replicas
            p.compute(cost.optim)  # the optimizer step, once the stage's gradients are complete
            p.ops.append(_Op("mark"))
        programs.append(p.ops)
    return programs


def simulate(stages: list[StageCosts], *, microbatches: int, method: Method, link: Link = Link(),
             error_bytes: float = 0.0, replicas: int = 1, reduce_link: Link | None = None,
             step_overhead: float = 0.0, streamed: bool = False) -> float:
    """Predicted seconds of one training step (the slowest stage's finish), on every replica
    (each its own pipeline of ``stages``); ``reduce_link`` (default ``link``) carries the
    gradient all-reduce among a stage's ``replicas``; ``step_overhead``: every rank's host work
    per step outside the blocks' phases (zeroing gradients, the divergence guard, Python).

    ``streamed``: the second of two steps run back to back instead, as ``bench`` measures it
    (each stage's time from the end of its first step to the end of its second; the slowest
    stage's): the direct rules' first stage starts step 2 while the later stages finish step 1."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if microbatches < 1 or replicas < 1:
        raise ValueError(f"microbatches = {microbatches} and replicas = {replicas} must be >= 1")
    sizes: dict = {}
    programs = _programs(list(stages), microbatches, method, sizes, error_bytes, replicas, reduce_link or link,
                         step_overhead, steps=2 if streamed else 1)
    replay = _Replay(programs, link, sizes)
    ends = replay.run()
    if streamed:
        return max(second - first for first, second in replay.marks)
    return max(ends)


def predict(costs: BlockCosts, *, ranks: int, microbatches: int, method: Method, link: Link = Link(),
            partition: Sequence[range] | None = None, replicas: int = 1, reduce_link: Link | None = None,
            step_overhead: float = 0.0, streamed: bool = False, engine_overhead: float = 0.0) -> float:
    """Predicted step seconds of ``method`` on ``ranks`` stages (of ``replicas`` replicas each,
    every replica on a micro-batch of the size ``costs`` were measured at). Without an explicit
    ``partition`` the stages are balanced on what the method pays per block, as the runtime
    does: forward + local update for the direct rules, forward + backward for backprop.
    ``engine_overhead``: see :func:`stage_costs`."""
    if partition is None:
        second = costs.backward if method in ("gpipe", "1f1b") else costs.update
        weights = [f + b for f, b in zip(costs.forward, second)]
        partition = balanced_partition(weights, world_size=ranks)
    return simulate(stage_costs(costs, partition, method, engine_overhead), microbatches=microbatches,
                    method=method, link=link, error_bytes=costs.error_bytes, replicas=replicas,
                    reduce_link=reduce_link, step_overhead=step_overhead, streamed=streamed)


def ideal_direct_speedup(forward: float, update: float, *, ranks: int, microbatches: int) -> float:
    """N balanced stages, no communication: ``N·M(F+U) / (M(F+U) + (N-1)F)`` (per-stage F, U)."""
    return ranks * microbatches * (forward + update) / (microbatches * (forward + update) + (ranks - 1) * forward)
