"""CPU ranks on one host: each on its own cores (``run.bind_cores``).

Several gloo ranks on one host share its cores with their helper threads: gloo's TCP loop and
work threads wake for every message. Left to the OS scheduler, a rank that sleeps in a receive
wakes on whichever core is free, and a message can wait for a helper thread to be scheduled. On
the 2-core VM, before a stage posted its next receive ahead (``Transport.recv_activation``),
binding took a 2-rank vit step from 42.8 to 38.0 ms (3 alternations of 150 steps); with the
receive posted ahead the two are within the VM's noise (``benchmarks/binding.sh``,
``docs/performance.md``). Binding each local rank, with all its threads, to an equal share of
the cores is what MPI launchers do by default (``--bind-to core``), and OpenMP threads then
never outnumber the cores a rank may use.

Only for CPU runs with more than one rank on the host, only when the ranks of a host were all
started on the same cores (a launcher that placed them itself, e.g. Slurm's ``--cpu-bind``, is
left alone), and only when every rank gets at least one core of its own: an oversubscribed host
is left to the scheduler. GPU ranks are not bound here (their host threads belong near their
GPU's NUMA node, which the cluster's launcher knows).
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from parallel_dkp.parallel.distributed import DistContext


def core_share(cores: list[int], local_rank: int, local_world_size: int) -> list[int] | None:
    """The cores of ``local_rank``: its consecutive equal share of ``cores`` (the remainder, if
    any, stays unused, so every rank has the same), or ``None`` when there are fewer cores than
    ranks."""
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"local rank {local_rank} is outside 0..{local_world_size - 1}")
    share = len(cores) // local_world_size
    if share == 0:
        return None
    ordered = sorted(cores)
    return ordered[local_rank * share:(local_rank + 1) * share]


def host_share(placements: list[tuple[str, tuple[int, ...]]], rank: int) -> tuple[int, int] | None:
    """``(index, count)`` of ``rank`` among the ranks on its host (by rank order), given every
    rank's ``(host, cores it may run on)``; ``None`` when its host's ranks were started on
    different cores (placed by their launcher already)."""
    host, cores = placements[rank]
    peers = [r for r, (h, _) in enumerate(placements) if h == host]
    if any(placements[r][1] != cores for r in peers):
        return None
    return peers.index(rank), len(peers)


def bind_ranks(ctx: "DistContext") -> list[int] | None:
    """Collective: bind every CPU rank to its share of its host's cores (:func:`bind_local_rank`),
    when the ranks of each host share one set of cores. Returns this rank's cores, or ``None``."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    placement = (socket.gethostname(), tuple(sorted(os.sched_getaffinity(0))))
    share = host_share(ctx.all_gather_object(placement), ctx.rank)
    return None if share is None else bind_local_rank(*share)


def bind_local_rank(local_rank: int, local_world_size: int) -> list[int] | None:
    """Bind this process (every thread it has, and so every thread it starts later) to its share
    of the cores it may run on, and cap torch's intra-op threads at that share. Returns the cores,
    or ``None`` when nothing was changed (one rank on the host, fewer cores than ranks, or an OS
    without ``sched_setaffinity``)."""
    if local_world_size <= 1 or not hasattr(os, "sched_setaffinity"):
        return None
    mine = core_share(list(os.sched_getaffinity(0)), local_rank, local_world_size)
    if mine is None:
        return None
    for thread in _threads():
        try:
            os.sched_setaffinity(thread, mine)
        except OSError:  # a thread that just ended
            pass
    if torch.get_num_threads() > len(mine):
        torch.set_num_threads(len(mine))
    return mine


def _threads() -> list[int]:
    """Ids of this process's threads (Linux), or just this one (0) elsewhere."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
