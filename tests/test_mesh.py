"""Stages × replicas: the layout, sharded data, gradient averaging, and equality with one process."""

from __future__ import annotations

import json

import pytest
import torch
from multirank import spawn
from workers import describe_mesh, layout_config, replica_dies, run_steps, small_config, train_layout

from parallel_dkp.data.common import TensorImageDataset
from parallel_dkp.data.loader import BatchLoader
from parallel_dkp.data.transforms import PadCropFlip
from parallel_dkp.parallel.distributed import DistContext
from parallel_dkp.parallel.mesh import Layout, _buckets, replica_seed, resolve_layout

STEPS = 3
BN_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------- layout


def _resolve(world_size, num_blocks=4, batch_size=16, microbatches=2, **kw):
    return resolve_layout(world_size=world_size, num_blocks=num_blocks, batch_size=batch_size,
                          microbatches=microbatches, **kw)


@pytest.mark.parametrize("world_size,num_blocks,kw,want", [
    (1, 4, {}, (1, 1)),
    (2, 4, {}, (2, 1)),             # as many stages as the blocks allow: the old pipeline
    (8, 4, {}, (4, 2)),             # the rest becomes replicas
    (6, 4, {}, (3, 2)),             # the largest divisor that fits
    (5, 4, {}, (1, 5)),             # a prime world larger than the model: pure data parallel
    (4, 4, {"replicas": 2}, (2, 2)),
    (4, 4, {"stages": 1}, (1, 4)),
    (4, 8, {"partition": (4, 4)}, (2, 2)),
    (4, 4, {"stages": 2, "replicas": 2}, (2, 2)),
])
def test_layout_is_chosen_to_fit(world_size, num_blocks, kw, want):
    """Pinpoints a layout whose stages exceed the blocks, whose product is not the world, or that
    ignores what the user fixed."""
    layout = _resolve(world_size, num_blocks, batch_size=40 * world_size, **kw)
    assert (layout.stages, layout.replicas) == want
    assert layout.world_size == world_size


@pytest.mark.parametrize("world_size,kw,needle", [
    (4, {"stages": 3, "replicas": 2},
     r"parallel.stages \(3\) x parallel.replicas \(2\) = 6 ranks, but the world size is 4"),
    (4, {"stages": 3}, r"parallel.stages = 3 does not divide the world size \(4\)"),
    (4, {"replicas": 3}, r"parallel.replicas = 3 does not divide the world size \(4\)"),
    (1, {"stages": 2}, r"= 2 ranks, but the world size is 1|does not divide the world size \(1\)"),
    (8, {"stages": 8}, r"8 pipeline stages but the model has only 4 blocks"),
    (4, {"partition": (2, 2), "stages": 4}, r"has 2 stages but parallel.stages = 4"),
    (4, {"replicas": 4, "batch_size": 12}, r"data.batch_size \(12\) must be divisible by parallel.replicas \(4\) x "
                                            r"parallel.microbatches \(2\) = 8"),
])
def test_layout_errors_say_what_to_change(world_size, kw, needle):
    """Pinpoints a layout that cannot work being accepted (and failing or hanging later)."""
    with pytest.raises(ValueError, match=needle):
        _resolve(world_size, **kw)


def test_layout_places_replicas_of_a_stage_on_neighbouring_ranks():
    """Pinpoints a rank mapping that is not a bijection or puts a pipeline on adjacent ranks."""
    layout = Layout(stages=3, replicas=2)
    assert layout.pipelines() == [[0, 2, 4], [1, 3, 5]]
    assert layout.stage_groups() == [[0, 1], [2, 3], [4, 5]]
    assert sorted(layout.coords(r) for r in range(6)) == [(s, r) for s in range(3) for r in range(2)]
    assert all(layout.rank(*layout.coords(r)) == r for r in range(6))


def test_config_rejects_a_batch_the_replicas_cannot_share():
    with pytest.raises(ValueError, match="parallel.replicas"):
        small_config("dkp", microbatches=2, extra=["parallel.replicas=3"])  # 16 % 6


def test_buckets_keep_order_and_size():
    """Pinpoints buckets that drop, reorder or mix dtypes of gradients."""
    tensors = [torch.zeros(10), torch.zeros(10), torch.zeros(100), torch.zeros(3, dtype=torch.float64), torch.zeros(5)]
    buckets = _buckets(tensors, limit=90)
    assert [[t.numel() for t in b] for b in buckets] == [[10, 10], [100], [3], [5]]
    assert [t for b in buckets for t in b] == tensors


def test_replica_seeds_differ_and_replica_zero_keeps_the_seed():
    assert replica_seed(7, 0) == 7
    assert len({replica_seed(7, r) for r in range(8)}) == 8


# --------------------------------------------------------------------------- data


def _dataset(n=24):
    x = torch.arange(n * 3 * 8 * 8, dtype=torch.float32).reshape(n, 3, 8, 8) / 100
    return TensorImageDataset(x, torch.arange(n) % 10)


@pytest.mark.parametrize("augment", [False, True])
def test_replica_shards_put_together_are_the_global_batch(augment):
    """Pinpoints replicas that see overlapping or different examples than one process (or other
    augmentation numbers), which would make results depend on the layout."""
    view = PadCropFlip((8, 8)) if augment else None
    whole = BatchLoader(_dataset(), batch_size=8, shuffle=True, drop_last=True, seed=3, view=view)
    shards = []
    for r in range(4):
        loader = BatchLoader(_dataset(), batch_size=8, shuffle=True, drop_last=True, seed=3, view=view)
        loader.shard(r, 4, split_batches=True)
        shards.append(list(loader))
    want = list(whole)
    assert all(len(s) == len(want) for s in shards)
    for i, (x, y) in enumerate(want):
        torch.testing.assert_close(torch.cat([s[i][0] for s in shards]), x, rtol=0, atol=0)
        assert torch.equal(torch.cat([s[i][1] for s in shards]), y)


def test_test_batches_are_dealt_out_whole():
    """Pinpoints an evaluation shard that loses or repeats test examples (the last batch is small)."""
    loaders = []
    for r in range(2):
        loader = BatchLoader(_dataset(22), batch_size=8, shuffle=False, drop_last=False, seed=0)
        loader.shard(r, 2, split_batches=False)
        loaders.append(loader)
    assert [len(loader) for loader in loaders] == [2, 1]
    ys = [y for loader in loaders for _, y in loader]
    assert sorted(torch.cat(ys).tolist()) == sorted((torch.arange(22) % 10).tolist())


# --------------------------------------------------------------------------- real ranks


def _merged(out_dir, rule, world_size):
    """Replica 0's stages merged, and every rank's state by (stage, replica)."""
    parts = [torch.load(out_dir / f"{rule}-rank{rank}.pt") for rank in range(world_size)]
    state = {}
    for part in parts:
        if part["replica"] == 0:
            state.update(part["state"])
    return state, parts


RULES_ON_MESH = {(2, 2): ["bp", "bp_fc_only", "fa", "kp", "dfa", "dkp", "drtp"], (1, 2): ["bp", "dfa", "dkp", "drtp"],
                 (2, 1): ["bp", "dkp"]}


@pytest.mark.multirank
@pytest.mark.parametrize("stages,replicas", list(RULES_ON_MESH), ids=lambda v: str(v))
def test_mesh_matches_single_process(tmp_path, stages, replicas):
    """Pinpoints gradient averaging, data sharding or per-replica pipelines changing the math:
    after a few steps on ``stages`` x ``replicas`` gloo ranks (M micro-batches per replica), the
    parameters and feedback equal the single-process run over the same global batches with
    M x replicas micro-batches (the same micro-batches, so BatchNorm sees the same statistics),
    every replica of a stage holds the same numbers, and the test metrics summed over the
    replicas equal the single process's."""
    rules, micro = RULES_ON_MESH[(stages, replicas)], 2
    spawn(train_layout, stages * replicas, str(tmp_path), rules, stages, replicas, micro, STEPS, timeout=400)
    for rule in rules:
        want = run_steps(small_config(rule, microbatches=micro * replicas), DistContext(), STEPS)
        got, parts = _merged(tmp_path, rule, stages * replicas)
        assert sorted(got) == sorted(want["state"]), rule
        for key, value in want["state"].items():
            if replicas > 1 and key.endswith(BN_RUNNING):
                continue  # running statistics: an average over replicas of per-replica averages
            torch.testing.assert_close(got[key], value, msg=lambda m: f"{rule} / {key}: {m}")
        for part in parts:  # replicas agree bit for bit, BN running statistics included
            twin = next(p for p in parts if p["stage"] == part["stage"] and p["replica"] == 0)
            for key, value in part["state"].items():
                assert torch.equal(value, twin["state"][key]), (rule, key, part["replica"])
        evals = [p["eval"] for p in parts if p["stage"] == stages - 1]
        assert all(e == evals[0] for e in evals), rule  # summed over replicas: the same on each
        assert evals[0][2] == want["eval"][2], rule  # every test example, once


@pytest.mark.multirank
def test_mesh_without_batchnorm_matches_exactly_with_any_micro_batching(tmp_path):
    """Pinpoints a difference in anything, evaluation included, once BatchNorm is off: then a
    2 x 2 mesh with M = 2 equals one process with M = 1 (no statistic depends on M)."""
    rules, extra = ["dkp", "bp"], ["model.batch_norm=false"]
    spawn(train_layout, 4, str(tmp_path), rules, 2, 2, 2, STEPS, extra, timeout=300)
    for rule in rules:
        want = run_steps(small_config(rule, microbatches=1, extra=extra), DistContext(), STEPS)
        got, parts = _merged(tmp_path, rule, 4)
        assert sorted(got) == sorted(want["state"])
        for key, value in want["state"].items():
            torch.testing.assert_close(got[key], value, msg=lambda m: f"{rule} / {key}: {m}")
        last = next(p for p in parts if p["stage"] == 1 and p["replica"] == 0)
        assert last["eval"][1:] == want["eval"][1:], rule
        assert last["eval"][0] == pytest.approx(want["eval"][0], rel=1e-5), rule


@pytest.mark.multirank
@pytest.mark.parametrize("dying_rank", [1, 2], ids=["stage0-replica1", "stage1-replica0"])
def test_a_dead_replica_stops_every_rank_with_a_clear_error(tmp_path, dying_rank):
    """Pinpoints ranks that hang (or die silently) when one replica crashes mid-training: its
    stage partner waits in the gradient average, its pipeline partner in a transfer."""
    spawn(replica_dies, 4, str(tmp_path), "dkp", dying_rank, timeout=150, expect_exit={dying_rank: 3})
    for rank in set(range(4)) - {dying_rank}:
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["type"] == "PeerFailure", (rank, record)
        assert "timeout_s" in record["message"], (rank, record)
        assert record["seconds"] < 60, (rank, record)


def test_layout_config_round_trip():
    cfg = layout_config("dkp", 2, 2, microbatches=2)
    assert (cfg.parallel.stages, cfg.parallel.replicas) == (2, 2)


@pytest.mark.multirank
@pytest.mark.skipif(torch.__version__ < (2, 5), reason="DeviceMesh.from_group with two groups needs torch >= 2.5")
def test_the_layout_is_a_device_mesh_over_the_runs_own_groups(tmp_path):
    """Pinpoints a DeviceMesh view whose dimensions, ranks or groups disagree with the layout."""
    spawn(describe_mesh, 4, str(tmp_path), timeout=120)
    for rank in range(4):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        layout = Layout(2, 2)
        assert (r["shape"], r["names"], r["grid"]) == ([2, 2], ["pp", "dp"], [[0, 1], [2, 3]])
        assert r["dp"] == layout.replica_ranks(r["stage"]) and r["pp"] == layout.pipeline(r["replica"])
        assert r["dp_sum"] == sum(layout.replica_ranks(r["stage"]))
