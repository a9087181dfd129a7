"""``parallel-dkp bench``: the unlocking benchmark's JSON, its variants and its per-block costs.

Timings are never asserted: only that every number the issue asks for is there, finite and
consistent with the other numbers of the same file.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from parallel_dkp.bench import (
    Variant,
    _level,
    _merge,
    fit_link,
    machine_levels,
    parse_list,
    ratios_by_round,
    validate_cost_model,
)
from parallel_dkp.config import load_config
from parallel_dkp.models import block_output_shapes, build_blocks
from parallel_dkp.parallel import costmodel
from parallel_dkp.parallel.costs import measure_block_phases

TINY = ["--set", "data.name=synthetic", "--set", "data.synthetic_shape=[1, 8, 8]", "--set", "data.synthetic_size=64",
        "--set", "data.batch_size=16", "--set", "model.name=conv2"]
CHANNELS_LAST = ["--set", "run.channels_last=true"]


@pytest.mark.multirank
def test_unlocking_benchmark_writes_every_field(tmp_path):
    """Pinpoints a field of the issue missing from ``bench --ranks 1,2``'s JSON, or a ratio that is
    not the quotient of the step times it names."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "parallel_dkp", "bench", *TINY, *CHANNELS_LAST, "--ranks", "1,2",
         "--microbatches", "2,4", "--replicas", "2", "--steps", "1", "--warmup", "0", "--rounds", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["ranks"] == [1, 2] and r["microbatches"] == [2, 4] and r["threads_per_rank"] == 1
    assert set(r["single_device"]["step_s"]) == {"bp", "dfa", "dkp"}
    names = {"dkp_over_bp_single_device", "dfa_over_bp_single_device", "dkp_over_bp_gpipe", "dkp_over_bp_1f1b",
             "dkp_unlocking_speedup", "dkp_speedup_over_one_rank_all_cores"}
    assert names <= set(r["ratios"])
    assert set(r["ratios_by_microbatches"]) == {"2", "4"}
    assert r["ratios"] == r["ratios_by_microbatches"]["2"]
    pipe = r["worlds"]["pipeline:2x1"]["by_microbatches"]["4"]
    one = r["worlds"]["per_rank:1x1"]["by_microbatches"]["4"]
    step = {name: row["median_s"] for name, row in pipe["rules"].items()}
    assert set(step) == {"dkp", "dfa", "bp@gpipe", "bp@1f1b", "bp@1f1b:nchw", "dkp:local"}
    assert pipe["configs"]["dkp:local"]["parallel"]["messages"] is False
    assert pipe["configs"]["dkp"]["parallel"]["messages"] is True
    by4 = r["ratios_by_microbatches"]["4"]
    assert by4["dkp_over_bp_1f1b"] == pytest.approx(step["dkp"] / step["bp@1f1b"])
    # channels-last run: torch's 1F1B also in the default layout, and dkp against the faster of the two
    assert by4["dkp_over_fastest_bp_1f1b"] == pytest.approx(step["dkp"] / min(step["bp@1f1b"], step["bp@1f1b:nchw"]))
    assert pipe["configs"]["bp@1f1b:nchw"]["run"]["channels_last"] is False
    assert pipe["configs"]["bp@1f1b"]["run"]["channels_last"] is True
    # the one-rank baseline: rank 0 alone, stepped between the 2-rank world's steps
    alone = pipe["alone"]["rules"]
    assert set(alone) == {"dkp", "bp"} and len(alone["dkp"]["samples_s"]) == 1  # --steps 1, one round
    assert set(pipe["alone"]["phases"]["dkp"]) >= {"forward", "update", "step"}
    assert by4["dkp_unlocking_speedup"] == pytest.approx(alone["dkp"]["median_s"] / step["dkp"])
    assert by4["bp_1f1b_speedup"] == pytest.approx(alone["bp"]["median_s"] / step["bp@1f1b"])
    assert by4["dkp_unlocking_speedup_across_worlds"] == pytest.approx(one["rules"]["dkp"]["median_s"] / step["dkp"])
    assert by4["dkp_unlocking_speedup_by_round"] == [pytest.approx(by4["dkp_unlocking_speedup"])]  # one round
    # both ranks stepping the whole network at once: the ceiling of any 2-rank scheme at that time
    together = pipe["together"]["rules"]
    assert set(together) == {"dkp", "bp"} and len(together["bp"]["samples_s"]) == 1
    assert by4["dkp_parallel_ceiling"] == pytest.approx(2 * alone["dkp"]["median_s"] / together["dkp"]["median_s"])
    assert by4["bp_parallel_ceiling_by_round"] == [pytest.approx(by4["bp_parallel_ceiling"])]
    # every variant's step also followed at once by another, as training runs them (no barrier)
    streamed = {name: row["median_s"] for name, row in pipe["streamed"]["rules"].items()}
    assert set(streamed) == set(step) and len(pipe["streamed"]["rules"]["dkp"]["samples_s"]) == 1
    assert "streamed" not in one  # one rank: nothing to overlap
    for name in step:  # their phases per rank, timed inside each rank's part of the streamed step
        ranks = pipe["streamed"]["phases_per_rank"][name]
        assert len(ranks) == 2 and all({"forward", "update", "wait", "optim", "step"} <= set(p) for p in ranks)
        assert max(p["step"] for p in ranks) <= streamed[name]
    assert by4["dkp_unlocking_speedup_streamed"] == pytest.approx(alone["dkp"]["median_s"] / streamed["dkp"])
    assert by4["bp_1f1b_speedup_streamed"] == pytest.approx(alone["bp"]["median_s"] / streamed["bp@1f1b"])
    assert by4["dkp_over_bp_1f1b_streamed"] == pytest.approx(streamed["dkp"] / streamed["bp@1f1b"])
    assert by4["dkp_over_fastest_bp_1f1b_streamed"] == pytest.approx(
        streamed["dkp"] / min(streamed["bp@1f1b"], streamed["bp@1f1b:nchw"]))
    # the period against the machine's ideal (2 whole networks at once, over 2), with and without messages
    ideal = together["dkp"]["median_s"] / 2
    assert by4["dkp_period_over_ideal_streamed"] == pytest.approx(streamed["dkp"] / ideal)
    assert by4["dkp_local_period_over_ideal_streamed"] == pytest.approx(streamed["dkp:local"] / ideal)
    assert by4["dkp_period_over_local_streamed"] == pytest.approx(streamed["dkp"] / streamed["dkp:local"])
    # per rank: phases, idle fraction, memory
    for phases in pipe["phases_per_rank"]["dkp"]:
        assert {"forward", "update", "wait", "send", "idle_fraction"} <= set(phases)
    assert len(pipe["phases_per_rank"]["dkp"]) == 2
    assert len(r["worlds"]["pipeline:2x1"]["peak_rss_mb_per_rank"]) == 2
    assert r["worlds"]["single_device:1x" + str(r["single_device"]["threads"])]["threads_per_rank"] >= 1
    # the cost model: block costs per M, the link, a prediction for every measured configuration
    cm = r["cost_model"]
    assert set(cm["block_costs"]) == {"2", "4"} and len(cm["block_costs"]["4"]["forward"]) == 4
    assert cm["link"]["latency_s"] >= 0 and cm["link"]["bandwidth_Bps"] > 0
    assert cm["link"]["host_copies"] is True  # gloo on CPUs: the ranks' cores copy every message
    assert set(cm["step_overhead_s"]["4"]) >= {"dkp", "dfa", "bp"}
    assert all(v >= 0 for v in cm["step_overhead_s"]["4"].values())
    # torch's engine on one stage beside the plain loop: its own host time per micro-batch
    assert one["configs"]["bp@gpipe"]["parallel"]["engine_on_one_stage"] is True
    assert one["configs"]["bp"]["parallel"]["engine_on_one_stage"] is False
    for schedule in ("gpipe", "1f1b"):
        (engine,), (plain,) = one["rules"][f"bp@{schedule}"]["samples_s"], one["rules"]["bp"]["samples_s"]
        assert cm["engine_overhead_s"]["4"][schedule] == pytest.approx(max(0.0, (engine - plain) / 4))
    # stages x replicas: 1 x 2 always runs (2 cores); 2 x 2 where the machine has 4 cores
    measured = {k for k in r["mesh"]}
    assert "1x2" in measured and ("2x2" in measured) == ("mesh:2stages-2replicas-1threads" not in r["skipped_worlds"])
    dp = r["mesh"]["1x2"]["by_microbatches"]["4"]
    assert dp["batch_size"] == 2 * 16  # every replica on a full batch
    one_dkp = one["rules"]["dkp"]["median_s"]
    assert dp["dkp"]["throughput_over_one_rank"] == pytest.approx(2 * one_dkp / dp["dkp"]["step_s"])
    assert dp["dkp"]["examples_per_s"] == pytest.approx(32 / dp["dkp"]["step_s"])
    mesh_rows = [row for row in cm["validation"] if row["replicas"] == 2]
    assert {(row["ranks"], row["variant"]) for row in mesh_rows} >= {(1, "dkp"), (1, "bp")}
    # per M: 3 variants on 1 rank (not bp through the engine there: the calibration), 4 on 2
    # ranks, 2 on every stages x replicas world; those of several ranks twice, their steps
    # starting together and back to back
    assert len(cm["validation"]) == 2 * (3 + 2 * 4 + 2 * 2 * len(measured))
    assert not any("@" in row["variant"] for row in cm["validation"] if row["ranks"] * row["replicas"] == 1)
    streamed_rows = {(row["ranks"], row["replicas"], row["microbatches"], row["variant"]): row
                     for row in cm["validation"] if row["streamed"]}
    assert streamed_rows[2, 1, 4, "dkp"]["measured_s"] == pytest.approx(streamed["dkp"])
    assert not any(row["streamed"] for row in cm["validation"] if row["ranks"] * row["replicas"] == 1)
    assert cm["validation_error"] == max(row["relative_error"] for row in cm["validation"])
    assert cm["validation_error_from_isolated"] == max(row["relative_error_from_isolated"] for row in cm["validation"])
    # block costs at their in-step level: the one-rank phase timers' totals over M x the isolated sums
    factors, phases, costs = cm["in_step_factors"]["4"], one["phases_per_rank"], cm["block_costs"]["4"]
    assert set(factors) == {"dkp", "dfa"}
    assert set(factors["dkp"]) == {"forward", "backward", "update", "optim_bp", "optim_direct"}
    for rule in ("dkp", "dfa"):  # each direct rule's update at its own level
        assert factors[rule]["update"] * 4 * sum(costs["update"]) == pytest.approx(phases[rule][0]["update"])
    assert factors["dkp"]["forward"] * 4 * sum(costs["forward"]) == pytest.approx(phases["dkp"][0]["forward"])
    assert factors["dkp"]["backward"] * 4 * sum(costs["backward"]) == pytest.approx(phases["bp"][0]["update"])
    assert all(math.isfinite(row["predicted_s"]) and row["predicted_s"] > 0 for row in cm["validation"])
    # a world is predicted at the machine's speed while it ran, every rank busy, against the one-rank world
    by_row = {(row["ranks"], row["replicas"], row["microbatches"], row["variant"]): row for row in cm["validation"]}
    levels = {key: row["machine_level"] for key, row in by_row.items()}
    assert levels[2, 1, 4, "dkp"] == pytest.approx(together["dkp"]["median_s"] / one["rules"]["dkp"]["median_s"])
    assert levels[2, 1, 4, "bp@1f1b"] == pytest.approx(together["bp"]["median_s"] / one["rules"]["bp"]["median_s"])
    assert levels[2, 1, 4, "dfa"] == levels[2, 1, 4, "dkp"]  # not stepped alone: the other direct rule's
    assert levels[1, 1, 4, "dkp"] == 1.0  # the one-rank world is the calibration itself
    # torch's engine costs only the rows that ran through it: not the plain loop on one rank
    slower = json.loads(json.dumps(r["worlds"]))
    for schedule in ("gpipe", "1f1b"):
        row = slower["per_rank:1x1"]["by_microbatches"]["4"]["rules"][f"bp@{schedule}"]
        row["samples_s"] = [t + 1.0 for t in row["samples_s"]]
    again = {(row["ranks"], row["replicas"], row["microbatches"], row["variant"]): row["predicted_s"]
             for row in _validate(r, slower)["validation"]}
    assert again[1, 1, 4, "bp"] == pytest.approx(by_row[1, 1, 4, "bp"]["predicted_s"])
    assert again[2, 1, 4, "bp@gpipe"] > by_row[2, 1, 4, "bp@gpipe"]["predicted_s"] + 0.5
    assert again[2, 1, 4, "dkp"] == pytest.approx(by_row[2, 1, 4, "dkp"]["predicted_s"])
    assert set(cm["predictions_s"]["4"]["direct"]) == {"1", "2", "3", "4"}
    assert set(cm["ideal"]["4"]["2"]) == {"dkp_unlocking_speedup", "dkp_over_bp_1f1b"}


def _validate(result: dict, worlds: dict) -> dict:
    """The cost model's validation of ``result`` (a bench JSON) with its worlds replaced."""
    by_role, meshes = {}, {}
    for key, world in worlds.items():  # "pipeline:2x1" (ranks x threads), "mesh:2stages-2replicas-1threads"
        role, shape = key.split(":")
        if role == "mesh":
            stages, replicas = map(int, re.match(r"(\d+)stages-(\d+)replicas", shape).groups())
            meshes[stages, replicas] = world
        else:
            by_role[role, int(shape.split("x")[0])] = world
    return validate_cost_model(result, by_role, ranks=result["ranks"], microbatches=result["microbatches"],
                               meshes=meshes)


def test_rounds_pool_their_samples_and_keep_their_own_medians():
    """Pinpoints a merge that drops a round, or per-round ratios that pair different rounds."""
    def world(one: list[float], many: list[float]) -> dict:
        return {"by_microbatches": {"4": {"rules": {
            "dkp": {"median_s": sorted(one)[1], "samples_s": list(one)},
            "bp": {"median_s": sorted(many)[1], "samples_s": list(many)}}}}}

    merged: dict = {}
    _merge(merged, "w", world([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]))
    _merge(merged, "w", world([4.0, 5.0, 6.0], [1.0, 1.0, 1.0]))
    assert merged["w"]["rounds_merged"] == 2
    rules = merged["w"]["by_microbatches"]["4"]["rules"]
    assert rules["dkp"]["samples_s"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert rules["dkp"]["median_s"] == 3.5 and rules["dkp"]["round_medians_s"] == [2.0, 5.0]
    assert ratios_by_round(rules["dkp"], rules["bp"]) == [1.0, 5.0]


def test_rounds_fit_the_link_to_each_sizes_median_one_way_time():
    """Pinpoints a link taken from one round, where one busy moment of the machine sets the cost
    model's every message. Three rounds of a 1 µs + 1 GB/s link, one of them disturbed."""
    sizes = [1000, 100_000, 1_000_000]
    clean = [1e-6 + n / 1e9 for n in sizes]
    disturbed = [5e-6, 3e-4, 9e-3]  # a fit alone: 0 latency, about 110 MB/s

    def world(times: list[float]) -> dict:
        return {"by_microbatches": {}, "link": {**fit_link(sizes, times), "host_copies": True,
                                                "sizes_bytes": sizes, "one_way_s": list(times)}}

    merged: dict = {}
    for times in (disturbed, clean, [t * 1.01 for t in clean]):
        _merge(merged, "w", world(times))
    link = merged["w"]["link"]
    assert link["one_way_s_by_round"] == [disturbed, clean, [t * 1.01 for t in clean]]
    assert link["one_way_s"] == pytest.approx([t * 1.01 for t in clean])  # each size's median
    assert link["latency_s"] == pytest.approx(1.01e-6, rel=1e-3)
    assert link["bandwidth_Bps"] == pytest.approx(1e9 / 1.01, rel=1e-3)
    assert fit_link(sizes, clean) == {"latency_s": pytest.approx(1e-6), "bandwidth_Bps": pytest.approx(1e9)}


def test_rounds_pool_the_steps_of_rank_0_alone_and_together_too():
    """Pinpoints a merge that pools the world's variants but keeps only the first round of the
    one-rank steps interleaved with them."""
    def world(t: float) -> dict:
        return {"by_microbatches": {"4": {
            "rules": {"dkp": {"median_s": t, "samples_s": [t]}},
            "phases_per_rank": {"dkp": [{"forward": t, "update": 2 * t}, {"forward": 0.5 * t}]},
            "alone": {"rules": {"dkp": {"median_s": 2 * t, "samples_s": [2 * t]}}, "phases": {"dkp": {"step": t}}},
            "together": {"rules": {"dkp": {"median_s": 3 * t, "samples_s": [3 * t]}}},
            "streamed": {"rules": {"dkp": {"median_s": 0.5 * t, "samples_s": [0.5 * t]}},
                         "phases_per_rank": {"dkp": [{"wait": t}, {"wait": 2 * t}]}}}}}

    merged: dict = {}
    for t in (1.0, 3.0, 8.0):
        _merge(merged, "w", world(t))
    for t in (9.0, 7.0):  # two more rounds: what the first three left, and more
        _merge(merged, "w", world(t))
    res = merged["w"]["by_microbatches"]["4"]
    # phase timers: the mean of the rounds' medians (the cost model's levels come from them)
    assert res["phases_per_rank"]["dkp"] == [{"forward": 5.6, "update": 11.2}, {"forward": 2.8}]
    assert res["alone"]["phases"]["dkp"] == {"step": pytest.approx(5.6)}
    assert res["alone"]["rules"]["dkp"]["samples_s"] == [2.0, 6.0, 16.0, 18.0, 14.0]
    assert res["alone"]["rules"]["dkp"]["median_s"] == 14.0
    assert res["together"]["rules"]["dkp"]["round_medians_s"] == [3.0, 9.0, 24.0, 27.0, 21.0]
    assert res["streamed"]["rules"]["dkp"]["samples_s"] == [0.5, 1.5, 4.0, 4.5, 3.5]
    assert res["streamed"]["phases_per_rank"]["dkp"] == [{"wait": 5.6}, {"wait": 11.2}]
    assert ratios_by_round(res["alone"]["rules"]["dkp"], res["rules"]["dkp"]) == [2.0] * 5


def test_machine_levels_compare_the_ranks_beside_a_world_with_the_one_rank_world():
    world = {"alone": {"rules": {"dkp": {"median_s": 3.0}, "bp": {"median_s": 2.0}}}}
    one = {"rules": {"dkp": {"median_s": 2.0}, "bp": {"median_s": 2.0}, "dfa": {"median_s": 1.0}}}
    assert machine_levels({**world, "together": {"rules": {"dkp": {"median_s": 4.0}}}}, one) == {"dkp": 2.0}
    levels = machine_levels(world, one)
    assert levels == {"dkp": 1.5, "bp": 1.0}
    assert _level(levels, "dfa") == 1.5 and _level(levels, "kp") == 1.0  # same kind of signal
    assert _level(levels, "drtp") == 1.25  # no rule of its kind: the mean
    assert machine_levels({"rules": {}}, one) == {} and _level({}, "dkp") == 1.0


def test_unlocking_benchmark_refuses_more_ranks_than_blocks(tmp_path):
    """Pinpoints worlds launched (and failing one by one) for a rank count the model cannot run."""
    proc = subprocess.run(
        [sys.executable, "-m", "parallel_dkp", "bench", *TINY, "--ranks", "1,5", "--out", str(tmp_path / "x.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "conv2 has 4 blocks, so at most 4 pipeline stages" in " ".join(proc.stderr.split())
    assert not (tmp_path / "x.json").exists()


def test_variants_name_a_rule_and_a_pipeline_schedule():
    assert Variant.parse("bp@1f1b").overrides == ("rule.name=bp", "parallel.schedule=1f1b",
                                                  "parallel.engine_on_one_stage=true")
    nchw = Variant.parse("bp@1f1b:nchw")
    assert nchw.name == "bp@1f1b:nchw" and nchw.overrides[-1] == "run.channels_last=false"
    assert nchw.method("gpipe") == "1f1b" and Variant.parse("dkp:nchw").name == "dkp:nchw"
    assert Variant.parse("dkp").method("gpipe") == "direct"
    assert Variant.parse("drtp").method("gpipe") == "targets"
    assert Variant.parse("kp").method("1f1b") == "1f1b"
    local = Variant.parse("dkp:local")
    assert local.name == "dkp:local" and local.overrides == ("rule.name=dkp", "parallel.messages=false")
    assert not local.messages and Variant.parse("dkp").messages and local.method("gpipe") == "direct"
    for bad, message in [("dkp@1f1b", "backward-unlocked"), ("bp@zero", "gpipe or 1f1b"), ("sgd", "not a rule"),
                         ("bp@1f1b:nhwc", "nchw .* or local"), ("bp:local", "backward-unlocked")]:
        with pytest.raises(ValueError, match=message):
            Variant.parse(bad)
    assert parse_list("1,2,2,4", "--ranks") == [1, 2, 4]
    for bad in ("", "0,2", "two"):
        with pytest.raises(ValueError, match="whole numbers"):
            parse_list(bad, "--ranks")


def test_block_phases_cover_every_block():
    """Pinpoints per-block costs with a block missing, a negative or non-finite time, or output
    sizes that are not what the next stage receives."""
    torch.manual_seed(0)
    cfg_overrides = ["model.name=conv2", "data.name=synthetic", "data.synthetic_shape=[1, 8, 8]"]
    cfg = load_config(None, cfg_overrides)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    costs = measure_block_phases(cfg, x, y, num_classes=10, total=32, device=torch.device("cpu"), repeats=2)
    assert costs.num_blocks == 4
    for name in ("forward", "backward", "update", "optim_bp", "optim_direct"):
        values = getattr(costs, name)
        assert all(math.isfinite(v) and v > 0 for v in values), name
    shapes = block_output_shapes(build_blocks(cfg.model, input_shape=(1, 8, 8), num_classes=10, seed=0), (1, 8, 8))
    assert list(costs.out_bytes) == [8 * math.prod(s) * 4 for s in shapes]
    assert costs.error_bytes == 8 * 10 * 4
    # what replicas average: every trained weight (and BN statistic) once, and dkp's feedback
    dkp = build_blocks(cfg.model, input_shape=(1, 8, 8), num_classes=10, seed=0)
    weights = sum(p.numel() for p in dkp.parameters()) + sum(b.numel() for b in dkp.buffers() if b.is_floating_point())
    assert sum(costs.weight_bytes) == 4 * weights
    assert list(costs.feedback_bytes) == [10 * math.prod(s) * 4 for s in shapes[:-1]] + [0]
    assert list(costs.relayout) == [0.0] * 4  # the default layout: nothing to re-lay out
    channels_last = measure_block_phases(load_config(None, [*cfg_overrides, "run.channels_last=true"]), x, y,
                                         num_classes=10, total=32, device=torch.device("cpu"), repeats=2)
    # conv2's two conv blocks put out 4-D channels-last tensors; its FC blocks do not
    assert [v > 0 for v in channels_last.relayout] == [True, True, False, False]
    # the replay of one rank's step equals the sum of its parts
    one = costmodel.stage_costs(costs, [range(4)], "direct")[0]
    want = 2 * (one.forward + one.update_output + one.update_hidden) + one.optim
    assert costmodel.simulate([one], microbatches=2, method="direct") == pytest.approx(want)


def test_a_world_prints_its_alone_together_and_streamed_steps():
    """Pinpoints ``bench --alone`` under torchrun measuring the one-rank steps but showing nothing."""
    from rich.console import Console

    from parallel_dkp.bench import print_world

    rules = {"dkp": {"median_s": 0.05, "ratio_to_dkp": 1.0}}
    phases = {"dkp": [{"forward": 0.01, "update": 0.02, "idle_fraction": 0.1}] * 2}
    res = {"model": "vit", "data": "synthetic", "batch_size": 8, "world_size": 2, "partition": [[0, 3], [3, 6]],
           "steps": 2, "warmup": 1, "rules": rules, "phases_per_rank": phases,
           "alone": {"rules": {"dkp": {"median_s": 0.08}}}, "together": {"rules": {"dkp": {"median_s": 0.1}}},
           "streamed": {"rules": {"dkp": {"median_s": 0.045}},
                        "phases_per_rank": {"dkp": [{"wait": 0.0005}, {"wait": 0.004}]}}}
    console = Console(record=True, width=200)
    print_world({"machine": {"device_name": "cpu"}, "threads_per_rank": 1, "by_microbatches": {"4": res}}, console)
    text = console.export_text()
    assert "rank 0 alone 80.0 ms, all 2 ranks at once 100.0 ms (parallel ceiling 1.60 of 2)" in text
    assert ("dkp with steps back to back (no barrier between them, as in training): 45.0 ms per step "
            "(rank 0 waits 0.5, rank 1 waits 4.0)") in text
