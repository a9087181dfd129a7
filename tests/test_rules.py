"""Rule math on one process: every rule's updates against hand-derived formulas or autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CONV_INPUT,
    MLP_INPUT,
    TINY_CONV,
    TINY_MLP,
    TINY_MLP_BN,
    batch,
    clone,
    make_blocks,
    make_stage,
    one_backward,
    optimizers_for,
    sgd,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from parallel_dkp.rules import Feedback
from parallel_dkp.rules.feedback_layers import FeedbackConv2d, FeedbackLinear

DIRECT = ("dfa", "dkp", "drtp")
ALL_RULES = ("bp", "bp_fc_only", "fa", "kp", "dfa", "dkp", "drtp")


def _error(logits, y, n):
    return (torch.softmax(logits, 1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)) / n


# --------------------------------------------------------------------------- hand-derived, MLP


@pytest.mark.parametrize("rule", ["dfa", "dkp", "drtp", "fa", "kp"])
def test_mlp_updates_match_hand_derived_formulas(rule):
    """Pinpoints a wrong learning signal: δ_j = (s·B_j) ⊙ relu'(z_j) for direct rules,
    δ_j = (δ_{j+1}·B_{j+1}) ⊙ relu'(z_j) for fa/kp, ∇W = δ^T a, ∇B_j = e^T a_j (dkp), ∇B = ∇W (kp)."""
    stage = make_stage(rule, TINY_MLP, MLP_INPUT)
    x, y = batch(MLP_INPUT)
    n = len(y)
    one_backward(stage, x, y)

    bodies = [getattr(block, "block", block) for block in stage.blocks]  # inside DirectBlock wrappers
    lin = [bodies[0][1], bodies[1][0], bodies[2][0]]
    W = [layer.weight.detach() for layer in lin]
    b = [layer.bias.detach() for layer in lin]
    z1 = x @ W[0].T + b[0]
    a1 = z1.relu()
    z2 = a1 @ W[1].T + b[1]
    a2 = z2.relu()
    h = a2 @ W[2].T + b[2]
    e = _error(h, y, n)

    if rule in DIRECT:
        s = F.one_hot(y, 3).float() / n if rule == "drtp" else e
        d1 = (s @ stage.blocks[0].feedback.weight.detach()) * (z1 > 0)
        d2 = (s @ stage.blocks[1].feedback.weight.detach()) * (z2 > 0)
    else:
        d2 = (e @ lin[2].feedback.weight.detach()) * (z2 > 0)
        d1 = (d2 @ lin[1].feedback.weight.detach()) * (z1 > 0)
    expected = [(d1, x), (d2, a1), (e, a2)]
    for layer, (delta, inp) in zip(lin, expected):
        torch.testing.assert_close(layer.weight.grad, delta.T @ inp)
        torch.testing.assert_close(layer.bias.grad, delta.sum(0))

    if rule == "dkp":
        torch.testing.assert_close(stage.blocks[0].feedback.weight.grad, e.T @ a1)
        torch.testing.assert_close(stage.blocks[1].feedback.weight.grad, e.T @ a2)
    elif rule == "kp":
        for layer in lin:
            torch.testing.assert_close(layer.feedback.weight.grad, layer.weight.grad)
    else:
        assert all(m.weight.grad is None for m in stage.modules() if isinstance(m, Feedback))


def test_direct_feedback_shapes_and_output_block():
    """Pinpoints B_j of the wrong shape, or feedback injected at the logits (the output block
    must always receive the true error)."""
    stage = make_stage("dkp", TINY_CONV, CONV_INPUT)
    shapes = [None if b.feedback is None else tuple(b.feedback.weight.shape) for b in stage.blocks]
    assert shapes == [(3, 32 * 6 * 6), (3, 32 * 6 * 6), (3, 128), None]  # no B for the output block


# --------------------------------------------------------------------------- autograd references, BN + conv


class _StraightThrough(nn.Module):
    """Independent FA reference: the forward of ``layer`` with W, the input gradient through B."""

    def __init__(self, layer, feedback):
        super().__init__()
        self.layer, self.feedback = layer, feedback

    def forward(self, x):
        if isinstance(self.layer, nn.Conv2d):
            through_b = F.conv2d(x, self.feedback, None, self.layer.stride, self.layer.padding)
        else:
            through_b = F.linear(x, self.feedback)
        return self.layer(x.detach()) + through_b - through_b.detach()


def _straight_through_copy(stage_blocks, plain_blocks):
    ref = clone(plain_blocks)
    fb_layers = [m for m in stage_blocks.modules() if isinstance(m, (FeedbackLinear, FeedbackConv2d))]
    slots = [(p, name) for p in ref.modules() for name, c in p.named_children() if type(c) in (nn.Linear, nn.Conv2d)]
    assert len(fb_layers) == len(slots)
    for fb, (parent, name) in zip(fb_layers, slots):
        setattr(parent, name, _StraightThrough(getattr(parent, name), fb.feedback.weight.detach().clone()))
    return ref


@pytest.fixture
def float64():
    """The straight-through reference adds and subtracts ``x·B``; double precision keeps that
    rounding far below the tolerance, so only a real difference in the rule fails."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("model,shape", [(TINY_CONV, CONV_INPUT), (TINY_MLP_BN, MLP_INPUT)], ids=["conv", "mlp_bn"])
@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("microbatches", [1, 2])
def test_updates_match_autograd_reference(rule, model, shape, microbatches, float64):
    """Pinpoints a rule whose gradients differ from an independent autograd construction of the
    same rule (with BN, convolutions and micro-batches): bp = plain autograd; fa/kp = a
    straight-through network; direct rules = autograd inside each block from s·B_j."""
    plain = make_blocks(model, shape)
    stage = make_stage(rule, model, shape, blocks=clone(plain))
    x, y = batch(shape, n=8)
    one_backward(stage, x, y, microbatches=microbatches)
    n = len(y)

    ref = _straight_through_copy(stage.blocks, plain) if rule in ("fa", "kp") else clone(plain)
    if rule == "bp_fc_only":  # plain autograd with the convolutions and their BN frozen
        for m in ref.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                m.requires_grad_(False)
    ref_fb = {str(j): b.feedback.weight.detach() for j, b in enumerate(stage.blocks)
              if getattr(b, "feedback", None) is not None}
    fb_grads = {k: torch.zeros_like(v) for k, v in ref_fb.items()}
    for x_m, y_m in zip(x.chunk(microbatches), y.chunk(microbatches)):
        if rule in DIRECT:
            a, outs = x_m, []
            for block in ref:
                a = block(a.detach())
                outs.append(a)
            e = _error(outs[-1].detach(), y_m, n)
            s = F.one_hot(y_m, 3).to(x.dtype) / n if rule == "drtp" else e
            outs[-1].backward(e)
            for j, out in enumerate(outs[:-1]):
                out.backward((s @ ref_fb[str(j)]).view_as(out))
                fb_grads[str(j)] += e.T @ out.detach().flatten(1)
        else:
            logits = ref(x_m) if isinstance(ref, nn.Sequential) else _chain(ref, x_m)
            (F.cross_entropy(logits, y_m, reduction="sum") / n).backward()

    got = dict(_named_forward_grads(nn.ModuleList(getattr(b, "block", b) for b in stage.blocks)))
    want = dict(_named_forward_grads(ref))
    assert len(got) == len(want) > 0
    for (name, g), (ref_name, w) in zip(got.items(), want.items()):
        torch.testing.assert_close(g, w, msg=lambda m: f"{rule}: {name} vs {ref_name}: {m}")
    if rule == "dkp":
        for k, grad in fb_grads.items():
            torch.testing.assert_close(stage.blocks[int(k)].feedback.weight.grad, grad)


def _chain(blocks, x):
    for block in blocks:
        x = block(x)
    return x


def _named_forward_grads(blocks):
    for name, p in blocks.named_parameters():
        if ".feedback." in name:
            continue
        yield name, p.grad if p.grad is not None else torch.zeros_like(p)


# --------------------------------------------------------------------------- unlocking


class _ConvBackwardLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.input_grad_masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.input_grad_masks.append(bool(args[-1][0]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rule", ALL_RULES)
def test_direct_rules_never_compute_input_gradients(rule):
    """Pinpoints a direct rule that runs (part of) the BP chain: its hidden blocks' inputs must be
    cut from the graph, and no convolution backward may compute an input gradient. BP must.
    Also pinpoints a bp_fc_only whose frozen convolutions still run their backward (a full BP
    step's cost for nothing): its backward must stop at the first FC layer."""
    stage = make_stage(rule, TINY_CONV, CONV_INPUT)
    bodies = [getattr(block, "block", block) for block in stage.blocks]  # inside DirectBlock wrappers
    inputs = []
    hooks = [body.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for body in bodies]
    x, y = batch(CONV_INPUT)
    with _ConvBackwardLog() as log:
        one_backward(stage, x, y, microbatches=2)
    for h in hooks:
        h.remove()
    if rule == "bp_fc_only":
        assert log.input_grad_masks == []
        # Nothing below the first FC layer needs a gradient (the output block's input does).
        assert [inp.requires_grad for inp in inputs] == [False, False, False, True] * 2
        assert all(p.grad is None for body in bodies[:2] for p in body.parameters())
    else:
        assert len(log.input_grad_masks) == 4  # 2 conv layers x 2 micro-batches
    if rule in DIRECT:
        assert not any(inp.requires_grad for inp in inputs)
        assert not any(log.input_grad_masks)
    elif rule != "bp_fc_only":
        assert any(inp.requires_grad for inp in inputs[1:])
        assert any(log.input_grad_masks)  # conv1's input gradient feeds conv0
    assert bodies[-1][0].weight.grad is not None


# --------------------------------------------------------------------------- convergence (paper §2.4-2.5)


def test_kp_feedback_converges_geometrically_to_weights():
    """Pinpoints KP's B not receiving W's update: with equal SGD settings and weight decay λ,
    ||W_t - B_t|| = (1 - lr·λ)^t ||W_0 - B_0|| exactly (paper eq. 11)."""
    lr, wd, steps = 0.2, 0.5, 15
    stage = make_stage("kp", TINY_MLP_BN, MLP_INPUT)
    opt = optimizers_for(stage, forward=sgd(lr, wd), feedback=sgd(lr, wd))
    layers = [m for m in stage.modules() if isinstance(m, FeedbackLinear)]
    gap0 = [(layer.weight - layer.feedback.weight).norm().item() for layer in layers]
    for step in range(steps):
        x, y = batch(MLP_INPUT, n=16, seed=step)
        one_backward(stage, x, y)
        opt.step()
    for layer, g0 in zip(layers, gap0):
        gap = (layer.weight - layer.feedback.weight).norm().item()
        assert gap == pytest.approx(g0 * (1 - lr * wd) ** steps, rel=1e-4)
        assert gap < 0.25 * g0


def test_dkp_last_feedback_follows_output_weights():
    """Pinpoints a DKP feedback update that is not the output layer's weight gradient: with equal
    settings B_{L-1} - W_L shrinks by (1 - lr·λ) per step; with the paper's unequal learning
    rates (and momentum) the angle between B_{L-1} and W_L still closes."""
    lr, wd, steps = 0.1, 0.2, 15
    stage = make_stage("dkp", TINY_MLP_BN, MLP_INPUT)
    opt = optimizers_for(stage, forward=sgd(lr, wd), feedback=sgd(lr, wd))
    w_out, b_last = stage.blocks[-1].block[0].weight, stage.blocks[1].feedback.weight
    gap0 = (w_out - b_last).norm().item()
    for step in range(steps):
        x, y = batch(MLP_INPUT, n=16, seed=step)
        one_backward(stage, x, y)
        opt.step()
    assert (w_out - b_last).norm().item() == pytest.approx(gap0 * (1 - lr * wd) ** steps, rel=1e-4)

    stage = make_stage("dkp", TINY_MLP_BN, MLP_INPUT)
    opt = optimizers_for(stage, forward=sgd(0.5, 0.05, momentum=0.9), feedback=sgd(0.1, 0.05, momentum=0.9))
    w_out, b_last = stage.blocks[-1].block[0].weight, stage.blocks[1].feedback.weight

    def angle():
        cos = F.cosine_similarity(w_out.flatten(), b_last.flatten(), dim=0).item()
        return math.degrees(math.acos(max(-1.0, min(1.0, cos))))

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(MLP_INPUT[0], 3, generator=g)  # a learnable task, so the updates agree
    start = angle()
    for _ in range(300):
        x = torch.randn(32, *MLP_INPUT, generator=g)
        one_backward(stage, x, (x @ teacher).argmax(1))
        opt.step()
    end = angle()
    assert end < 0.5 * start, (start, end)


def test_bp_fc_only_leaves_convolutions_unchanged():
    """Pinpoints a 'BP (FC only)' baseline that trains its convolutions (or not its FC layers)."""
    stage = make_stage("bp_fc_only", TINY_CONV, CONV_INPUT)
    opt = optimizers_for(stage)
    before = {k: v.detach().clone() for k, v in stage.named_parameters()}
    for step in range(3):
        x, y = batch(CONV_INPUT, seed=step)
        one_backward(stage, x, y)
        opt.step()
    after = dict(stage.named_parameters())
    for name in ("blocks.0.0.weight", "blocks.1.0.weight", "blocks.0.1.weight", "blocks.1.1.bias"):
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    for name in ("blocks.2.2.weight", "blocks.3.0.weight"):
        assert not torch.equal(after[name], before[name])


def test_output_error_keeps_float64_precision():
    """Pinpoints the output error's softmax rounding float64 logits to float32 (the autograd
    references run in float64): e must equal autograd's gradient of the summed cross-entropy / N
    to float64 precision."""
    logits = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 30
    y = torch.tensor([0, 1, 2, 3, 0])
    leaf = logits.clone().requires_grad_(True)
    (F.cross_entropy(leaf, y, reduction="sum") / 5).backward()
    from parallel_dkp.rules import output_error

    error = output_error(logits, y, 5)
    assert error.dtype == torch.float64
    torch.testing.assert_close(error, leaf.grad, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("side,padding,flat", [(28, 1, 6272), (32, 0, 6272), (32, 1, 8192), (28, 0, 4608)])
def test_conv2_first_linear_layer_matches_table_3(side, padding, flat):
    """Pinpoints conv2's FC input size drifting from the paper's Table 3 (6272) on the datasets'
    own sizes: Fashion-MNIST 28x28 with padded convs, CIFAR-10 32x32 with unpadded ones."""
    from parallel_dkp.config import ModelConfig

    blocks = make_blocks(ModelConfig(name="conv2", conv_padding=padding), (1, side, side), num_classes=10)
    assert blocks[2][2].in_features == flat


@pytest.mark.parametrize("rule", ["fa", "dkp"])
def test_like_weight_feedback_has_the_forward_layers_scale(rule):
    """Pinpoints ``rule.feedback_init = like_weight`` giving B another spread than the forward
    layer it stands in for (U(±1/√fan_in), std 1/√(3·fan_in)); Kaiming's is √6 ≈ 2.45 times wider."""
    from parallel_dkp.config import ModelConfig
    from parallel_dkp.models import block_output_shapes
    from parallel_dkp.parallel.stage import Stage
    from parallel_dkp.rules import RULES, Feedback

    model, shape = ModelConfig(name="mlp", widths=(300, 300)), (400,)
    stds = {}
    for init in ("like_weight", "kaiming_uniform"):
        blocks = make_blocks(model, shape, num_classes=300)
        stage = Stage(list(blocks), indices=range(3), num_blocks=3, rule=RULES[rule](feedback_init=init),
                      out_shapes=block_output_shapes(blocks, shape), num_classes=300, seed=0)
        feedback = [m.weight for m in stage.modules() if isinstance(m, Feedback)]
        stds[init] = [(float(b.detach().std()), b.shape[1]) for b in feedback]
    for std, fan_in in stds["like_weight"]:
        assert std == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.05)
    for (wide, _), (narrow, _) in zip(stds["kaiming_uniform"], stds["like_weight"]):
        assert wide / narrow == pytest.approx(math.sqrt(6), rel=0.05)


@pytest.mark.parametrize("model_name,shape", [("alexnet_small", (3, 32, 32)), ("alexnet", (3, 224, 224))])
def test_alexnet_dropout_sits_before_both_hidden_fc_layers(model_name, shape):
    """Pinpoints ``model.dropout`` missing from AlexNet's FC blocks (or appearing elsewhere)."""
    from parallel_dkp.config import ModelConfig

    for p, expected in ((0.0, 0), (0.5, 2)):
        blocks = make_blocks(ModelConfig(name=model_name, dropout=p), shape, num_classes=10)
        found = [(i, m.p) for i, b in enumerate(blocks) for m in b.modules() if isinstance(m, nn.Dropout)]
        assert [i for i, _ in found] == ([5, 6] if expected else []) and all(q == p for _, q in found)
