"""Partition logic without processes: explicit counts, balancing, and the errors users can cause."""

from __future__ import annotations

import itertools

import pytest

from parallel_dkp.parallel.partition import balanced_partition, explicit_partition


def test_explicit_partition_ranges():
    """Pinpoints block counts mapped to the wrong global indices."""
    assert explicit_partition((1, 2, 1), num_blocks=4, world_size=3) == [range(0, 1), range(1, 3), range(3, 4)]


@pytest.mark.parametrize(
    "counts,world_size,needle",
    [((2, 1), 2, "sums to 3"), ((1, 1, 2), 2, "3 entries"), ((4, 0), 2, "at least one block")],
)
def test_explicit_partition_errors_name_the_fix(counts, world_size, needle):
    """Pinpoints a bad partition that is accepted, or rejected without saying what is wrong."""
    with pytest.raises(ValueError, match=needle):
        explicit_partition(counts, num_blocks=4, world_size=world_size)


def test_world_size_larger_than_model_is_rejected():
    """Pinpoints more ranks than blocks slipping through to training."""
    with pytest.raises(ValueError, match="larger than the number of blocks"):
        balanced_partition([1.0, 1.0], world_size=3)


def _brute_force(costs, world_size):
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), world_size - 1):
        bounds = (0, *cuts, len(costs))
        worst = max(sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("costs", [[5, 1, 1, 1, 1, 1], [1, 2, 3, 4, 5, 6, 7], [3, 3, 3, 3], [10, 1, 10, 1, 1]])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_balanced_partition_is_optimal_and_contiguous(costs, world_size):
    """Pinpoints a balancer that leaves a rank idle, breaks contiguity or is not optimal."""
    stages = balanced_partition(costs, world_size=world_size)
    assert len(stages) == world_size
    assert [i for r in stages for i in r] == list(range(len(costs)))
    assert all(len(r) >= 1 for r in stages)
    assert max(sum(costs[i] for i in r) for r in stages) == pytest.approx(_brute_force(costs, world_size))


def test_mpi_launch_without_torchrun_variables_is_rejected(monkeypatch):
    """Pinpoints an MPI launch that silently trains N independent single-process copies."""
    from parallel_dkp.config import ParallelConfig, RunConfig
    from parallel_dkp.parallel.distributed import init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="launch with torchrun"):
        init_distributed(ParallelConfig(), RunConfig())
