"""``run.channels_last``: the same training in another memory layout, and the direct rules'
products taken in storage order."""

from __future__ import annotations

import pytest
import torch
from multirank import spawn
from test_parallel import _merge
from workers import BALANCED_MODELS, run_steps, small_config, train_rules

from parallel_dkp.parallel.distributed import DistContext
from parallel_dkp.rules.base import Feedback
from parallel_dkp.rules.direct import _ChannelsLast, _storage_order
from parallel_dkp.train import build_job

RULES = ["bp", "bp_fc_only", "fa", "kp", "dfa", "dkp", "drtp"]


@pytest.mark.parametrize("rule", RULES)
def test_channels_last_trains_like_the_default_layout(rule):
    """Pinpoints a layout that changes the math: three steps with channels-last weights and
    activations end where the default layout does, up to float rounding, for every rule."""
    want = run_steps(small_config(rule), DistContext(), 3)
    got = run_steps(small_config(rule, extra=["run.channels_last=true"]), DistContext(), 3)
    for key, value in want["state"].items():
        torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")
    assert got["eval"][1:] == want["eval"][1:]


def test_channels_last_reaches_the_direct_update():
    """Pinpoints the option not taking effect: the conv blocks' outputs that the direct rules
    project their signal onto are stored channels-last."""
    job = build_job(small_config("dkp", extra=["run.channels_last=true"]), DistContext())
    x, _ = next(iter(job.train_loader))
    _, hidden = job.stage.rule.forward(job.stage.blocks, job.schedule._to_device(x))
    kinds = [type(_storage_order(out)) for _, out in hidden]
    assert kinds[:2] == [_ChannelsLast, _ChannelsLast], kinds


def test_storage_order_products_equal_the_logical_ones():
    """Pinpoints a permutation error in ``e·B_j`` or ``eᵀa_j`` on channels-last activations (both
    must equal the products on the same tensors in the default layout), or B's kept copy in
    storage order outliving a change of B."""
    torch.manual_seed(0)
    a = torch.randn(3, 4, 5, 6)
    e = torch.randn(3, 7)
    feedback = Feedback((7, 4 * 5 * 6), learned=True, init="kaiming_uniform", seed=0, device=torch.device("cpu"))
    b = feedback.weight
    stored = _storage_order(a.contiguous(memory_format=torch.channels_last))
    assert isinstance(stored, _ChannelsLast)
    grad = stored.unflatten(e @ stored.columns(feedback))
    assert grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(grad, (e @ b.detach()).view_as(a))
    assert stored.columns(feedback) is stored.columns(feedback)  # kept while B is unchanged
    with torch.no_grad():
        b.mul_(-2.0)  # what an optimizer step does: in place
    torch.testing.assert_close(stored.unflatten(e @ stored.columns(feedback)), (e @ b.detach()).view_as(a))
    flat = stored.flatten(a.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(stored.to_logical(e.T @ flat), e.T @ a.flatten(1))
    total = torch.ones(7, 4 * 5 * 6)
    stored.add_logical_(total, e.T @ flat)
    torch.testing.assert_close(total, 1 + e.T @ a.flatten(1))


@pytest.mark.multirank
def test_channels_last_across_two_ranks_matches_one_process(tmp_path):
    """Pinpoints activations or input gradients that cross ranks in the wrong layout (gloo sends
    contiguous tensors only; the pipeline engine sizes its buffers from inferred strides): two
    ranks equal one process, both channels-last, with a conv on each side of the boundary."""
    rules, extra = ["bp", "dkp"], ["run.channels_last=true", *BALANCED_MODELS["convdeep"]]
    spawn(train_rules, 2, str(tmp_path), rules, (2, 2), 2, 3, "1f1b", extra, timeout=300)
    for rule in rules:
        want = run_steps(small_config(rule, extra=extra), DistContext(), 3)
        got, _, _ = _merge(tmp_path, rule, 2)
        for key, value in want["state"].items():
            torch.testing.assert_close(got[key], value, msg=lambda m: f"{rule} / {key}: {m}")


def test_torch_engine_stages_lay_out_what_arrives_as_their_blocks_run():
    """Pinpoints a channels-last stage under torch's engine that feeds its blocks the wire's
    default layout (slower conv kernels), or sends channels-last tensors (the engine's buffers
    are sized from default strides): what arrives (input, output gradient) is channels-last,
    what leaves (output, input gradient) is contiguous."""
    from parallel_dkp.parallel.schedules import _DefaultLayout

    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["input"] = x.is_contiguous(memory_format=torch.channels_last)
            out = x * 2.0
            out.register_hook(lambda g: seen.__setitem__("output_grad", g.is_contiguous(
                memory_format=torch.channels_last)))
            return out

    wire = torch.randn(2, 3, 4, 5, requires_grad=True)  # as received: the default layout
    out = _DefaultLayout(Probe(), channels_last=True)(wire)
    assert seen["input"] and out.is_contiguous()
    out.backward(torch.ones(2, 3, 4, 5))  # the gradient as received
    assert seen["output_grad"] and wire.grad.is_contiguous()
    torch.testing.assert_close(wire.grad, torch.full((2, 3, 4, 5), 2.0))
    assert _DefaultLayout(Probe())(wire).is_contiguous() and not seen["input"]  # the default layout throughout
