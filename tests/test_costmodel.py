"""The step-time cost model (parallel/costmodel.py) against hand-derived closed forms."""

from __future__ import annotations

import itertools

import pytest

from parallel_dkp.parallel.costmodel import (
    BlockCosts,
    Link,
    StageCosts,
    allreduce_seconds,
    ideal_direct_speedup,
    predict,
    simulate,
    stage_costs,
    update_lag,
)

F, B, U = 1.0, 2.0, 1.5


def balanced(num_stages: int, *, send_bytes: float = 0.0) -> list[StageCosts]:
    """Per-stage F, B, U; the last stage's U is its output update."""
    last = num_stages - 1
    return [StageCosts(forward=F, backward=B, update_hidden=U if s < last else 0.0,
                       update_output=U if s == last else 0.0, optim=0.0,
                       send_bytes=0.0 if s == last else send_bytes) for s in range(num_stages)]


@pytest.mark.parametrize("ranks,microbatches", list(itertools.product([1, 2, 3, 4, 8], [1, 2, 4, 8, 13])))
def test_balanced_pipelines_without_communication_give_the_closed_forms(ranks, microbatches):
    """Pinpoints a replay that orders a schedule's ops wrongly: with equal stages and free links,
    GPipe and 1F1B take (M+N-1)(F+B) and the direct schedule M(F+U)+(N-1)F."""
    stages, M, N = balanced(ranks), microbatches, ranks
    assert simulate(stages, microbatches=M, method="gpipe") == pytest.approx((M + N - 1) * (F + B))
    assert simulate(stages, microbatches=M, method="1f1b") == pytest.approx((M + N - 1) * (F + B))
    assert simulate(stages, microbatches=M, method="direct") == pytest.approx(M * (F + U) + (N - 1) * F)
    # DRTP updates right after each forward: the same span as the direct schedule
    assert simulate(stages, microbatches=M, method="targets") == pytest.approx(M * (F + U) + (N - 1) * F)


def test_speedup_formula_matches_the_replay():
    """Pinpoints the closed-form ideal drifting from the replay it summarises."""
    for n, m in [(2, 4), (4, 8), (8, 3)]:
        one = simulate(balanced(1), microbatches=m, method="direct") * n  # one rank does n stages' work
        one_rank = [StageCosts(n * F, n * B, 0.0, n * U, 0.0, 0.0)]
        assert simulate(one_rank, microbatches=m, method="direct") == pytest.approx(one)
        want = one / simulate(balanced(n), microbatches=m, method="direct")
        assert ideal_direct_speedup(F, U, ranks=n, microbatches=m) == pytest.approx(want)
    # the numbers: conv blocks U = F -> 1.78 at N = 2, M = 4
    assert ideal_direct_speedup(1.0, 1.0, ranks=2, microbatches=4) == pytest.approx(16 / 9)


def test_each_message_costs_latency_plus_bytes_over_bandwidth():
    """Pinpoints links ignored or counted twice: one rank boundary, one micro-batch: GPipe sends
    the activation forward and its gradient back, each on the critical path."""
    link = Link(latency_s=0.25, bandwidth_Bps=100.0)
    stages = balanced(2, send_bytes=50.0)  # 0.25 + 0.5 s a message
    assert simulate(stages, microbatches=1, method="gpipe", link=link) == pytest.approx(2 * (F + B) + 2 * 0.75)
    # direct: the activation forward, then the error back (bytes 10 -> 0.35 s) before stage 0's update
    got = simulate(stages, microbatches=1, method="direct", link=link, error_bytes=10.0)
    assert got == pytest.approx(F + 0.75 + F + 0.35 + U)


def test_a_receive_posted_ahead_overlaps_and_host_copies_cost_compute():
    """Pinpoints the direct schedule's pre-posted receive not modelled (its transfer would wait
    for the receiver), or CPU links whose copies take no compute. Stage 1 is the slow one
    (F = 3); a message is 0.25 s + 50 B / 100 B/s, copies 0.5 s at each end on a host link.

    Free of copies: act1 arrives at 2.75 while stage 1 computes F0 until 4.75, so it runs F1 at
    once, and the error of m = 1 reaches stage 0 at 7.75 + 0.25. With host copies stage 0 pays
    0.5 s per send (act1 leaves at 2.5), and stage 1 pays 0.5 s for act1, copied in while it
    computed: 0.5 s later."""
    stages = [StageCosts(1.0, 0.0, 0.0, 0.0, 0.0, 50.0), StageCosts(3.0, 0.0, 0.0, 0.0, 0.0, 0.0)]
    free = Link(latency_s=0.25, bandwidth_Bps=100.0)
    assert simulate(stages, microbatches=2, method="direct", link=free) == pytest.approx(8.0)
    host = Link(latency_s=0.25, bandwidth_Bps=100.0, host_copies=True)
    assert simulate(stages, microbatches=2, method="direct", link=host) == pytest.approx(8.5)
    assert free.copy_seconds(50.0) == 0.0 and host.copy_seconds(50.0) == 0.5


def test_step_overhead_delays_every_rank_once():
    stages = balanced(2)
    base = simulate(stages, microbatches=4, method="direct")
    assert simulate(stages, microbatches=4, method="direct", step_overhead=0.3) == pytest.approx(base + 0.3)


def test_the_slowest_stage_sets_the_pace():
    """Pinpoints an unbalanced partition predicted like a balanced one: the costliest stage
    bounds every schedule from below by M times its own work."""
    slow = [StageCosts(1.0, 2.0, 1.0, 0.0, 0.0, 0.0), StageCosts(3.0, 6.0, 0.0, 3.0, 0.0, 0.0)]
    for m in (1, 4, 16):
        assert simulate(slow, microbatches=m, method="direct") >= m * 6.0
        assert simulate(slow, microbatches=m, method="gpipe") >= m * 9.0
        assert simulate(slow, microbatches=m, method="1f1b") >= m * 9.0


@pytest.mark.parametrize("ranks,microbatches", [(2, 2), (2, 4), (2, 13), (3, 4), (4, 8), (8, 3)])
def test_steps_back_to_back_hide_the_direct_fill_and_not_the_engines_bubble(ranks, microbatches):
    """Pinpoints a replay of consecutive steps that shares messages between steps or lets a stage
    start its next step early. Balanced stages of hidden blocks (the output layer's own update
    is negligible, as in vit and convdeep), free links. The second of two steps back to back costs
    the direct schedule M(F+U) on 2 ranks: its first stage starts step 2 while the last one still
    updates step 1 (deeper pipelines gain less by their second step); GPipe and 1F1B pay their
    whole (M+N-1)(F+B), their first stage finishing last."""
    stages, M, N = [StageCosts(F, B, U, 0.0, 0.0, 0.0)] * ranks, microbatches, ranks
    streamed = simulate(stages, microbatches=M, method="direct", streamed=True)
    if N == 2:
        assert streamed == pytest.approx(M * (F + U))
    assert M * (F + U) <= streamed < simulate(stages, microbatches=M, method="direct") == M * (F + U) + (N - 1) * F
    for method in ("gpipe", "1f1b"):
        assert simulate(stages, microbatches=M, method=method, streamed=True) == pytest.approx((M + N - 1) * (F + B))


def test_back_to_back_steps_still_wait_for_the_slowest_stage():
    """Pinpoints a period shorter than the slowest stage's own work: with stage 1 the slower, the
    step costs its M (F1 + U1), and the optimizer step joins every step."""
    stages = [StageCosts(1.0, 0.0, 1.6, 0.0, 0.25, 0.0), StageCosts(1.0, 0.0, 2.0, 0.0, 0.25, 0.0)]
    assert simulate(stages, microbatches=4, method="direct", streamed=True) == pytest.approx(4 * 3.0 + 0.25)


def test_direct_update_lag_looks_past_the_later_stages():
    assert [update_lag(s, 4) for s in range(4)] == [3, 2, 1, 1]
    assert update_lag(0, 1) == 1


def test_predict_balances_blocks_and_sums_them_per_stage():
    """Pinpoints block costs assigned to the wrong stage or the optimizer counted per micro-batch."""
    costs = BlockCosts(forward=[1, 1, 1, 1], backward=[2, 2, 2, 2], update=[1, 1, 1, 1], optim_bp=[0.5] * 4,
                       optim_direct=[0.25] * 4, out_bytes=[0, 0, 0, 0])
    stages = stage_costs(costs, [range(0, 2), range(2, 4)], "direct")
    assert stages[0] == StageCosts(2, 4, 2, 0, 0.5, 0)
    assert stages[1] == StageCosts(2, 4, 1, 1, 0.5, 0)
    # bp on 2 balanced ranks, M = 4: (M+N-1)(F+B) + the stage's optimizer step once
    assert predict(costs, ranks=2, microbatches=4, method="gpipe") == pytest.approx(5 * 6 + 1.0)
    assert predict(costs, ranks=4, microbatches=1, method="1f1b") == pytest.approx(4 * 3 + 0.5)


def test_block_costs_reject_ragged_lists_and_repeat_the_middle_block():
    with pytest.raises(ValueError, match="one entry per block"):
        BlockCosts([1, 2], [1], [1, 2], [1, 2], [1, 2], [1, 2])
    costs = BlockCosts([5, 1, 1, 9], [5, 2, 2, 9], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [3, 2, 2, 0], 4.0)
    deep = costs.repeated(6)
    assert list(deep.forward) == [5, 1, 1, 1, 1, 9]
    assert deep.error_bytes == 4.0
    assert BlockCosts.from_dict(deep.as_dict()) == deep


def test_scaling_a_phase_scales_the_replayed_step_by_the_same_factor():
    """Block costs taken to their in-step level: with balanced stages and a free link the direct
    schedule's step M(F+U) + (N-1)F scales term by term."""
    costs = BlockCosts([1, 1, 1, 1], [2, 2, 2, 2], [1.5, 1.5, 1.5, 1.5], [0] * 4, [0] * 4, [8, 8, 8, 0], 4.0)
    scaled = costs.scaled({"forward": 1.2, "update": 1.1})
    assert list(scaled.forward) == pytest.approx([1.2] * 4) and list(scaled.backward) == [2] * 4
    assert scaled.out_bytes == costs.out_bytes and scaled.error_bytes == 4.0
    n, m = 2, 4
    expected = m * (2 * 1.2 + 2 * 1.5 * 1.1) + (n - 1) * 2 * 1.2
    assert predict(scaled, ranks=n, microbatches=m, method="direct") == pytest.approx(expected)
    with pytest.raises(ValueError, match="no such phase"):
        costs.scaled({"out_bytes": 2.0})


def test_replicas_add_a_ring_all_reduce_before_the_optimizer_step():
    """Pinpoints an all-reduce cost that is not the ring's 2(R-1) transfers of n/R bytes, or one
    added where there is a single replica."""
    link = Link(latency_s=0.01, bandwidth_Bps=1e3)
    assert allreduce_seconds(600.0, 3, link) == pytest.approx(4 * (0.01 + 200.0 / 1e3))
    assert allreduce_seconds(600.0, 1, link) == 0.0
    one = [StageCosts(forward=F, backward=B, update_hidden=0.0, update_output=U, optim=0.5, send_bytes=0.0,
                      reduce_bytes=600.0)]
    for method, per_mb in (("direct", F + U), ("gpipe", F + B)):
        alone = simulate(one, microbatches=4, method=method)
        assert alone == pytest.approx(4 * per_mb + 0.5)
        assert simulate(one, microbatches=4, method=method, replicas=3, reduce_link=link) == pytest.approx(
            alone + allreduce_seconds(600.0, 3, link))


def test_a_stage_that_finishes_early_hides_its_all_reduce():
    """Pinpoints reductions modelled as one barrier after the whole pipeline: under GPipe with
    F = B = 1, N = 2, M = 2 the last stage is done at 5 and the first at 6, so a 1 s reduction on
    the last stage is hidden, a 2 s one shows by 1 s, and 1 s on the first stage shows in full."""
    def two(reduce0: float, reduce1: float) -> list[StageCosts]:
        return [StageCosts(forward=1.0, backward=1.0, update_hidden=0.0, update_output=0.0, optim=0.0,
                           send_bytes=0.0, reduce_bytes=r) for r in (reduce0, reduce1)]

    link = Link(latency_s=0.0, bandwidth_Bps=1.0)  # R = 2: 2 transfers of n/2 bytes, n seconds
    assert simulate(two(0, 0), microbatches=2, method="gpipe", replicas=2, reduce_link=link) == pytest.approx(6.0)
    assert simulate(two(0, 1), microbatches=2, method="gpipe", replicas=2, reduce_link=link) == pytest.approx(6.0)
    assert simulate(two(0, 2), microbatches=2, method="gpipe", replicas=2, reduce_link=link) == pytest.approx(7.0)
    assert simulate(two(1, 0), microbatches=2, method="gpipe", replicas=2, reduce_link=link) == pytest.approx(7.0)


def test_direct_rules_average_their_learned_feedback_and_backprop_does_not():
    costs = BlockCosts(forward=[1, 1], backward=[1, 1], update=[1, 1], optim_bp=[0, 0], optim_direct=[0, 0],
                       out_bytes=[8, 0], weight_bytes=[100, 10], feedback_bytes=[40, 0])
    assert [s.reduce_bytes for s in stage_costs(costs, [range(1), range(1, 2)], "direct")] == [140, 10]
    assert [s.reduce_bytes for s in stage_costs(costs, [range(1), range(1, 2)], "1f1b")] == [100, 10]
    assert BlockCosts.from_dict(costs.as_dict()) == costs
    legacy = {k: v for k, v in costs.as_dict().items() if k not in ("weight_bytes", "feedback_bytes")}
    assert list(BlockCosts.from_dict(legacy).weight_bytes) == [0.0, 0.0]  # files written before replicas


def test_torch_engine_stages_pay_a_relayout_on_both_sides_of_each_boundary():
    """Pinpoints a re-layout charged to our direct schedule (its transport sends channels-last
    storage as is), to a stage edge with no neighbour, or only once per boundary crossing."""
    r = 0.25  # seconds to re-lay one block's output out
    costs = BlockCosts([1] * 4, [2] * 4, [1.5] * 4, [0] * 4, [0] * 4, [8, 8, 8, 0], relayout=[r, r, r, 0.0])
    first, last = stage_costs(costs, [range(2), range(2, 4)], "gpipe")
    # the output sent and its gradient received on stage 0; the input received and its gradient sent on stage 1
    assert (first.forward, first.backward) == (2 + r, 4 + r)
    assert (last.forward, last.backward) == (2 + r, 4 + r)
    assert stage_costs(costs, [range(2), range(2, 4)], "direct")[0].forward == 2
    assert stage_costs(costs, [range(4)], "1f1b")[0].forward == 4  # one stage: nothing crosses
    # GPipe's closed form (M+N-1)(F+B) with each stage's F and B grown by r
    n, m = 2, 4
    expected = (m + n - 1) * (2 + r + 4 + r)
    assert predict(costs, ranks=n, microbatches=m, method="gpipe") == pytest.approx(expected)
    assert costs.scaled({"relayout": 2.0}).relayout == [2 * r, 2 * r, 2 * r, 0.0]
    assert list(BlockCosts([1], [1], [1], [0], [0], [0]).relayout) == [0.0]  # not measured: none


def test_torch_engine_overhead_is_paid_per_micro_batch_by_every_stage_whatever_its_blocks():
    """Pinpoints the engine's host time charged once per step, scaled with a stage's blocks, or
    charged to our direct schedule: o per micro-batch and stage, half with each forward and half
    with each backward, so GPipe's closed form becomes (M+N-1)(F+B+o)."""
    o = 0.5
    costs = BlockCosts([1] * 4, [2] * 4, [1.5] * 4, [0] * 4, [0] * 4, [8, 8, 8, 0])
    for partition in ([range(2), range(2, 4)], [range(1), range(1, 4)]):
        for stage, plain in zip(stage_costs(costs, partition, "1f1b", o), stage_costs(costs, partition, "1f1b")):
            assert (stage.forward, stage.backward) == (plain.forward + o / 2, plain.backward + o / 2)
    assert stage_costs(costs, [range(4)], "direct", o) == stage_costs(costs, [range(4)], "direct")
    for n, m in [(1, 4), (2, 4), (4, 8)]:
        for method in ("gpipe", "1f1b"):
            got = predict(costs, ranks=n, microbatches=m, method=method, engine_overhead=o)
            assert got == pytest.approx((m + n - 1) * (3 * 4 / n + o))
        assert predict(costs, ranks=n, microbatches=m, method="direct", engine_overhead=o) == pytest.approx(
            predict(costs, ranks=n, microbatches=m, method="direct"))
