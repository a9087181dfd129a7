"""Alignment measurements (paper Fig. 2, gradient and feedback alignment) against hand computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from multirank import spawn
from workers import train_until_signal

import parallel_dkp.train as train_module
from parallel_dkp.analysis.alignment import AlignmentProbe, angle_deg, mean_row_angle_deg
from parallel_dkp.config import load_config
from parallel_dkp.parallel.distributed import DistContext

RUN = ["data.name=synthetic", "data.synthetic_size=64", "data.batch_size=16", "parallel.microbatches=2",
       "run.progress=false", "run.epochs=1", "optim.feedback.lr=0.01", "parallel.timeout_s=60"]
MLP = [*RUN, "model.name=mlp", "model.widths=[7, 5]", "data.synthetic_shape=[6]", "data.synthetic_classes=3"]


def test_angles_match_hand_computations():
    """Pinpoints a wrong angle formula: 45° between (1, 0) and (1, 1); 0° and 180° for (anti)parallel
    vectors; the Fig. 2 batch angle is the mean of the examples' angles (0° and 90° → 45°)."""
    assert angle_deg(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(45.0)
    assert angle_deg(torch.tensor([2.0, 4.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.0, abs=1e-6)
    assert angle_deg(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -2.0])) == pytest.approx(180.0)
    a = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    b = torch.tensor([[5.0, 0.0], [2.0, 0.0]])
    assert mean_row_angle_deg(a, b) == pytest.approx(45.0)
    # An example whose activations are all zero has no angle: it is left out of the mean.
    with_zero = mean_row_angle_deg(torch.cat([a, torch.zeros(1, 2)]), torch.cat([b, torch.ones(1, 2)]))
    assert with_zero == pytest.approx(45.0)


def _measure(rule: str, model: list[str], edit=None) -> list[dict]:
    job = train_module.build_job(load_config(None, [*model, f"rule.name={rule}"]), DistContext())
    if edit is not None:
        edit(job)
    x, y = next(iter(job.train_loader))
    job.stage.zero_grad(set_to_none=True)
    job.schedule.train_step(x, y)
    return AlignmentProbe(job).measure(x, y, step=1, epoch=1)


def test_bp_updates_are_at_zero_degrees_from_backprop():
    """Pinpoints a shadow backprop pass that is not BP (or compares other gradients): bp's own update
    must be at 0° from it in every block, with norm ratio 1, on a conv net with BN and M=2."""
    rows = _measure("bp", [*RUN, "model.name=conv2", "data.synthetic_shape=[1, 8, 8]"])
    grads = [r for r in rows if r["metric"] == "grad_angle"]
    assert [r["block"] for r in grads] == [0, 1, 2, 3]
    for row in grads:
        assert row["value"] == pytest.approx(0.0, abs=1e-3) and row["norm_ratio"] == pytest.approx(1.0, rel=1e-5)


def test_dkp_with_feedback_equal_to_the_output_weights_is_aligned():
    """Pinpoints a Fig. 2 angle or feedback angle computed on the wrong tensors: with the last hidden
    block's B set to the output layer's W (and a zero output bias), a_{L-1}·Bᵀ is exactly the logits
    (0°) and B mirrors W (0°, norm ratio 1); the other hidden blocks are far from 0°."""
    def mirror(job):
        out = job.stage.blocks[-1].block[0]
        with torch.no_grad():
            out.bias.zero_()
            job.stage.blocks[-2].feedback.weight.copy_(out.weight)

    rows = _measure("dkp", MLP, mirror)
    by = {(r["metric"], r["block"]): r for r in rows}
    assert by[("fig2_angle", 1)]["value"] == pytest.approx(0.0, abs=1e-3)
    assert by[("feedback_angle", 1)]["value"] == pytest.approx(0.0, abs=1e-3)
    assert by[("feedback_angle", 1)]["norm_ratio"] == pytest.approx(1.0)
    assert by[("fig2_angle", 0)]["value"] > 10
    assert {r["metric"] for r in rows} == {"fig2_angle", "grad_angle", "feedback_angle"}


def test_fig2_angle_is_the_mean_example_angle_of_a_times_b_against_the_logits():
    """Pinpoints a Fig. 2 angle that uses other activations, another B or another average: recompute
    it by hand from the block outputs and logits of the same batch, in training mode."""
    job = train_module.build_job(load_config(None, [*MLP, "rule.name=dfa", "parallel.microbatches=1"]), DistContext())
    x, y = next(iter(job.train_loader))
    job.stage.train()
    with torch.no_grad():
        a0 = job.stage.blocks[0].block(x)
        a1 = job.stage.blocks[1].block(a0)
        logits = job.stage.blocks[2].block(a1)
    job.stage.zero_grad(set_to_none=True)
    job.schedule.train_step(x, y)
    rows = AlignmentProbe(job).measure(x, y, step=1, epoch=1)
    fig2 = {r["block"]: r["value"] for r in rows if r["metric"] == "fig2_angle"}
    for j, a in ((0, a0), (1, a1)):
        estimate = a @ job.stage.blocks[j].feedback.weight.detach().T
        cos = torch.nn.functional.cosine_similarity(estimate.double(), logits.double(), dim=1)
        defined = (estimate.norm(dim=1) > 0) & (logits.norm(dim=1) > 0)  # the examples that have an angle
        expected = float(torch.rad2deg(torch.acos(cos[defined])).mean())
        assert fig2[j] == pytest.approx(expected, rel=1e-6)
    assert not math.isnan(sum(fig2.values()))


@pytest.mark.parametrize("rule", ["dkp", "kp", "drtp", "bp_fc_only"])
def test_measuring_does_not_change_training(rule, tmp_path):
    """Pinpoints a measurement that leaks into training (BN statistics moved by the shadow pass,
    gradients not restored): the parameters after a few steps with alignment measured at every
    step must equal those of the same run without measurements, bit for bit."""
    model = [*RUN, "model.name=conv2", "data.synthetic_shape=[1, 8, 8]", f"rule.name={rule}"]
    states = []
    for every in (0, 1):
        cfg = load_config(None, [*model, f"analysis.align_every={every}", f"run.out_dir={tmp_path / str(every)}"])
        train_module.train(cfg)
        job_state = torch.load(next((tmp_path / str(every) / "checkpoints").iterdir()) / "shard-00.pt",
                               weights_only=False)["model"]
        states.append(job_state)
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    rows = (tmp_path / "1" / "alignment.jsonl").read_text().splitlines()
    assert len({json.loads(r)["step"] for r in rows}) == 4  # 64 / 16 steps, every one measured


@pytest.mark.multirank
@pytest.mark.parametrize("rule", ["dkp", "kp"])
def test_two_ranks_measure_what_one_process_measures(tmp_path, rule):
    """Pinpoints alignment that changes when the network is split: the shadow BP pass across ranks,
    the logits sent to every rank, and DKP's output weight fetched from the next rank (partition
    [3, 1]: the output block alone) must give the single-process rows."""
    model = [*RUN, "model.name=conv2", "data.synthetic_shape=[1, 8, 8]", f"rule.name={rule}",
             "analysis.align_every=2"]
    spawn(train_until_signal, 2, str(tmp_path / "two"), [*model, "parallel.partition=[3, 1]"], None, None,
          timeout=180)
    train_module.train(load_config(None, [*model, f"run.out_dir={tmp_path / 'one'}"]))
    rows = {}
    for name in ("one", "two"):
        lines = (tmp_path / name / "alignment.jsonl").read_text().splitlines()
        rows[name] = {(r["step"], r["block"], r["metric"]): r for r in map(json.loads, lines)}
    assert rows["one"].keys() == rows["two"].keys() and rows["one"]
    if rule == "dkp":
        assert (2, 2, "feedback_angle") in rows["one"]  # the last hidden block against W_out
    for key, want in rows["one"].items():
        got = rows["two"][key]
        assert got["value"] == pytest.approx(want["value"], abs=1e-3), key
        if want["norm_ratio"] is not None:
            assert got["norm_ratio"] == pytest.approx(want["norm_ratio"], rel=1e-4), key
