"""Real ranks on gloo: every rule across 2 and 3 processes equals the single-process run."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.distributed as dist
from multirank import spawn
from workers import die_after_one_step, engine_on_rank_0_alone, run_steps, small_config, train_rules

from parallel_dkp.parallel.distributed import DistContext, distributed

RULES = ["bp", "bp_fc_only", "fa", "kp", "dfa", "dkp", "drtp"]
STEPS = 3

pytestmark = pytest.mark.multirank


def _merge(out_dir, rule, world_size):
    state, evals, partition = {}, [], None
    for rank in range(world_size):
        part = torch.load(out_dir / f"{rule}-rank{rank}.pt")
        overlap = set(state) & set(part["state"])
        assert not overlap, f"two ranks own {sorted(overlap)[:3]}"
        state.update(part["state"])
        evals.append(part["eval"])
        partition = part["partition"]
    return state, evals[-1], partition


@pytest.mark.parametrize("world_size,partition,microbatches", [(2, (), 2), (3, (1, 1, 2), 4)],
                         ids=["2ranks-auto", "3ranks"])
def test_multirank_matches_single_process(tmp_path, world_size, partition, microbatches):
    """Pinpoints a runtime that changes the math when the network is split: for every rule the
    parameters, BN statistics, feedback matrices and test metrics after a few steps on
    ``world_size`` gloo ranks must equal the single-process run with the same seed and M."""
    spawn(train_rules, world_size, str(tmp_path), RULES, partition, microbatches, STEPS, timeout=300)
    for rule in RULES:
        want = run_steps(small_config(rule, microbatches=microbatches), DistContext(), STEPS)
        got_state, got_eval, got_partition = _merge(tmp_path, rule, world_size)
        assert len(got_partition) == world_size
        assert sorted(got_state) == sorted(want["state"]), rule
        for key, value in want["state"].items():
            torch.testing.assert_close(got_state[key], value, msg=lambda m: f"{rule} / {key}: {m}")
        assert got_eval[1:] == want["eval"][1:], rule
        assert got_eval[0] == pytest.approx(want["eval"][0], rel=1e-5), rule
        direct_feedback = [k for k in want["state"] if re.fullmatch(r"blocks\.\d+\.feedback\.weight", k)]
        assert bool(direct_feedback) == (rule in ("dfa", "dkp", "drtp")), rule


@pytest.mark.parametrize("error_messages", ["broadcast", "sends"])
def test_the_output_error_by_broadcast_or_by_sends_matches_single_process(tmp_path, error_messages):
    """Pinpoints an error exchange that delivers the wrong micro-batch's error, or none, to a
    stage: 3 ranks, M = 4, the direct rules with each way of sending it."""
    rules = ["dfa", "dkp"]
    spawn(train_rules, 3, str(tmp_path), rules, (1, 1, 2), 4, STEPS, "gpipe",
          [f"parallel.error_messages={error_messages}"], timeout=300)
    for rule in rules:
        want = run_steps(small_config(rule, microbatches=4), DistContext(), STEPS)
        got_state, _, _ = _merge(tmp_path, rule, 3)
        for key, value in want["state"].items():
            torch.testing.assert_close(got_state[key], value, msg=lambda m: f"{rule} / {key}: {m}")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_torch_engine_on_one_stage_matches_the_plain_loop(tmp_path, schedule):
    """Pinpoints ``parallel.engine_on_one_stage`` (how ``bench`` measures torch's engine's own
    cost) training other math than the plain loop, leaving the world of one it makes behind, or
    (inside a launched world, rank 0 alone) needing the other ranks to join its group."""
    want = run_steps(small_config("bp", microbatches=4), DistContext(), STEPS)
    cfg = small_config("bp", microbatches=4,
                       extra=[f"parallel.schedule={schedule}", "parallel.engine_on_one_stage=true"])
    with distributed(cfg.parallel, cfg.run) as ctx:
        got = run_steps(cfg, ctx, STEPS)
        assert dist.is_initialized() and dist.get_world_size() == 1  # the engine needs a group: its own
    assert not dist.is_initialized()
    spawn(engine_on_rank_0_alone, 2, str(tmp_path), schedule, STEPS, timeout=120)
    alone = torch.load(tmp_path / "alone.pt")
    for run in (got, alone):
        for key, value in want["state"].items():
            torch.testing.assert_close(run["state"][key], value, msg=lambda m: f"{key}: {m}")  # noqa: B023
        assert run["eval"] == pytest.approx(want["eval"])


@pytest.mark.skipif(torch.__version__ < (2, 5),
                    reason="torch < 2.5: 1F1B on gloo deadlocks; the runtime refuses it with a clear error")
def test_1f1b_schedule_matches_single_process(tmp_path):
    """Pinpoints the 1F1B backward pipeline (serial rules) diverging from the single-process run."""
    serial = ["bp", "kp"]
    spawn(train_rules, 2, str(tmp_path), serial, (2, 2), 4, STEPS, "1f1b", timeout=300)
    for rule in serial:
        want = run_steps(small_config(rule, microbatches=4), DistContext(), STEPS)
        got_state, _, _ = _merge(tmp_path, rule, 2)
        for key, value in want["state"].items():
            torch.testing.assert_close(got_state[key], value, msg=lambda m: f"{rule} / {key}: {m}")


@pytest.mark.parametrize("rule", ["dkp", "bp"])
def test_dead_peer_fails_fast_with_a_clear_error(tmp_path, rule):
    """Pinpoints a rank that hangs (or dies silently) when a peer crashes mid-training."""
    spawn(die_after_one_step, 2, str(tmp_path), rule, timeout=120, expect_exit={0: 3})
    record = json.loads((tmp_path / "rank1.json").read_text())
    assert record["type"] == "PeerFailure", record
    assert "rank" in record["message"] and "timeout_s" in record["message"], record
    assert record["seconds"] < 60, record
