"""Splitting a block list into contiguous pipeline stages. Pure functions, no torch.distributed."""

from __future__ import annotations

from typing import Sequence


def explicit_partition(counts: Sequence[int], *, num_blocks: int, world_size: int) -> list[range]:
    """Stages from block counts per stage, e.g. ``(2, 2)`` → ``[range(0, 2), range(2, 4)]``."""
    if len(counts) != world_size:
        raise ValueError(
            f"parallel.partition {list(counts)} has {len(counts)} entries but there are {world_size} pipeline "
            "stages (parallel.stages; with parallel.replicas = 1, the world size); give one block count per stage"
        )
    if any(c < 1 for c in counts):
        raise ValueError(f"parallel.partition {list(counts)}: every rank needs at least one block")
    if sum(counts) != num_blocks:
        raise ValueError(
            f"parallel.partition {list(counts)} sums to {sum(counts)} but the model has "
            f"{num_blocks} blocks; the counts must add up to {num_blocks}"
        )
    stages, start = [], 0
    for c in counts:
        stages.append(range(start, start + c))
        start += c
    return stages


def balanced_partition(costs: Sequence[float], *, world_size: int) -> list[range]:
    """Contiguous split of blocks with per-block ``costs`` minimising the costliest stage.

    Exact dynamic programme, ``O(L² · N)``; ties go to the split that puts blocks earlier.
    """
    num_blocks = len(costs)
    check_world_size(num_blocks=num_blocks, world_size=world_size)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    inf = float("inf")
    # best[n][i]: minimal max-stage cost placing the first i blocks on n stages.
    best = [[inf] * (num_blocks + 1) for _ in range(world_size + 1)]
    cut = [[0] * (num_blocks + 1) for _ in range(world_size + 1)]
    best[0][0] = 0.0
    for n in range(1, world_size + 1):
        for i in range(n, num_blocks - (world_size - n) + 1):
            for j in range(n - 1, i):
                value = max(best[n - 1][j], prefix[i] - prefix[j])
                if value < best[n][i]:
                    best[n][i], cut[n][i] = value, j
    bounds, i = [], num_blocks
    for n in range(world_size, 0, -1):
        j = cut[n][i]
        bounds.append(range(j, i))
        i = j
    return bounds[::-1]


def check_world_size(*, num_blocks: int, world_size: int) -> None:
    if world_size > num_blocks:
        raise ValueError(
            f"the world size ({world_size}) is larger than the number of blocks ({num_blocks}); "
            f"launch at most {num_blocks} ranks (e.g. torchrun --nproc-per-node {num_blocks}) or pick a deeper model"
        )
