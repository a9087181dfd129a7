"""``vit`` and ``convdeep``, the networks of equal blocks: their layout (input block, equal blocks,
head), every rule's math, FA/KP's feedback twins, direct rules' cut inputs, 2-rank runs against one
process, and the block count."""

from __future__ import annotations

import json

import pytest
import test_rules
import torch
from helpers import batch, make_stage, one_backward
from multirank import spawn
from test_parallel import _merge
from torch import nn
from workers import balanced_config, run_steps, train_balanced_models

from parallel_dkp.cli import main
from parallel_dkp.config import ModelConfig, load_config
from parallel_dkp.models import blocks as blocks_module
from parallel_dkp.models import build_blocks, num_blocks
from parallel_dkp.parallel.distributed import DistContext
from parallel_dkp.plan import make_plan
from parallel_dkp.rules import DirectBlock
from parallel_dkp.rules.feedback_layers import FeedbackConv2d, FeedbackLinear

TINY_VIT = ModelConfig(name="vit", dim=8, heads=2, patch=2, depth=2)
TINY_CONVDEEP = ModelConfig(name="convdeep", width=4, depth=2)
TINY_INPUT = (1, 4, 4)
MODELS = pytest.mark.parametrize("model", [TINY_VIT, TINY_CONVDEEP], ids=["vit", "convdeep"])
ALL_RULES = test_rules.ALL_RULES
DIRECT = test_rules.DIRECT


@pytest.fixture
def float64():
    """As in test_rules: the straight-through FA reference needs double precision."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@MODELS
@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("microbatches", [1, 2])
def test_updates_match_autograd_reference(rule, model, microbatches, float64):
    """Pinpoints a rule whose gradients on attention, LayerNorm, GELU, residuals, position
    embeddings or a conv stack differ from the independent autograd construction of
    ``test_rules.test_updates_match_autograd_reference`` (the same check, on these networks)."""
    test_rules.test_updates_match_autograd_reference(rule, model, TINY_INPUT, microbatches, None)


@MODELS
def test_input_layer_is_its_own_block_before_identical_blocks(model):
    """Pinpoints the input layer (vit's patch embedding, convdeep's stem) folded into the first equal
    block again, which makes block 0 cost more than the others and unbalances every partition; or
    hidden blocks 1..depth that are not identical (parameter shapes)."""
    names = [spec.name for spec in blocks_module.block_specs(model, input_shape=TINY_INPUT, num_classes=3)]
    equal = "attn" if model.name == "vit" else "conv"
    first = "embed" if model.name == "vit" else "stem"
    assert names == [first, *(f"{equal}{i}" for i in range(1, model.depth + 1)), "out"]
    blocks = build_blocks(model, input_shape=TINY_INPUT, num_classes=3, seed=0)
    if model.name == "vit":
        assert type(blocks[0]) is blocks_module._PatchEmbedding
        assert all(type(b) is blocks_module._TransformerBlock for b in blocks[1:-1])
    else:  # the stem: one linear conv C -> width (BN and ReLU would make it cost half a block)
        assert [type(m) for m in blocks[0]] == [nn.Conv2d]
        assert blocks[0][0].in_channels == TINY_INPUT[0] and blocks[0][0].out_channels == model.width
    shapes = [[tuple(p.shape) for p in b.parameters()] for b in blocks]
    assert all(s == shapes[1] for s in shapes[1:-1]), shapes
    assert shapes[0] != shapes[1]


def _expected_twins(model: ModelConfig) -> dict[type, int]:
    if model.name == "vit":  # patch conv; qkv, proj and the MLP's two Linears per block; the head
        return {FeedbackConv2d: 1, FeedbackLinear: 4 * model.depth + 1}
    return {FeedbackConv2d: model.depth + 1, FeedbackLinear: 1}  # stem + one conv per block; the head


@MODELS
@pytest.mark.parametrize("rule", ["fa", "kp"])
def test_fa_kp_swap_every_layer_for_a_feedback_twin(rule, model):
    """Pinpoints a Linear/Conv2d that FA/KP left as a plain layer (it would backpropagate with W):
    inside attention (q/k/v and output projections), the MLP, the patch embedding (block 0) and every conv."""
    stage = make_stage(rule, model, TINY_INPUT)
    plain = [name for name, m in stage.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    assert plain == []
    counts = {kind: sum(type(m) is kind for m in stage.modules()) for kind in (FeedbackConv2d, FeedbackLinear)}
    assert counts == _expected_twins(model)
    for m in stage.modules():
        if isinstance(m, (FeedbackLinear, FeedbackConv2d)):
            assert m.feedback.weight.shape == m.weight.shape
            assert m.feedback.learned == (rule == "kp")
    if model.name == "vit":
        for block in stage.blocks[1:-1]:
            layers = [block.attn.qkv, block.attn.proj, block.mlp[0], block.mlp[2]]
            assert all(type(layer) is FeedbackLinear for layer in layers)
        assert type(stage.blocks[0].proj) is FeedbackConv2d


@MODELS
@pytest.mark.parametrize("rule", ALL_RULES)
def test_direct_rules_cut_every_block_input(rule, model):
    """Pinpoints a direct rule whose backward reaches another block: no block input may require
    grad during the local updates, and every hidden block, the input block (patch embedding, stem)
    included, has its own B_j of [K, numel(output)]. Also pinpoints a conv that computes an input
    gradient nobody needs: under a direct rule none does (the stem's input is the image, every other
    block's input is cut), under bp/fa/kp every conv but the stem and the patch embedding does."""
    stage = make_stage(rule, model, TINY_INPUT)
    bodies = [getattr(block, "block", block) for block in stage.blocks]
    inputs = []
    hooks = [body.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for body in bodies]
    x, y = batch(TINY_INPUT)
    with test_rules._ConvBackwardLog() as log:
        one_backward(stage, x, y, microbatches=2)
    for h in hooks:
        h.remove()
    assert len(inputs) == 2 * len(bodies)
    if rule in DIRECT:
        assert all(isinstance(block, DirectBlock) for block in stage.blocks)
        assert not any(inp.requires_grad for inp in inputs)
        tokens = (TINY_INPUT[1] // model.patch) * (TINY_INPUT[2] // model.patch)
        numel = tokens * model.dim if model.name == "vit" else model.width * TINY_INPUT[1] * TINY_INPUT[2]
        shapes = [None if b.feedback is None else tuple(b.feedback.weight.shape) for b in stage.blocks]
        assert shapes == [(3, numel)] * (model.depth + 1) + [None]
    elif rule != "bp_fc_only":
        assert all(inp.requires_grad for inp in inputs[1:len(bodies)])
    num_convs = model.depth + 1 if model.name == "convdeep" else 1  # per micro-batch
    chained = model.depth if model.name == "convdeep" else 0  # bp/fa/kp: every conv after the input layer
    input_grads = {"bp_fc_only": 0, **dict.fromkeys(DIRECT, 0)}.get(rule, chained)
    if rule != "bp_fc_only":  # its frozen convs run no backward at all
        assert len(log.input_grad_masks) == 2 * num_convs, log.input_grad_masks
    assert sum(log.input_grad_masks) == 2 * input_grads, log.input_grad_masks


def test_bp_fc_only_freezes_only_the_patch_embedding_of_vit():
    """Pinpoints bp_fc_only on vit freezing more than its one convolution (block 0's patch
    projection; the position embedding beside it still learns), or training it."""
    stage = make_stage("bp_fc_only", TINY_VIT, TINY_INPUT)
    frozen = sorted(name for name, p in stage.named_parameters() if not p.requires_grad)
    assert frozen == ["blocks.0.proj.bias", "blocks.0.proj.weight"]


# --------------------------------------------------------------------------- two ranks


PARALLEL_RULES = ["dkp", "dfa", "bp", "kp"]
STEPS = 3


@pytest.mark.multirank
def test_two_ranks_match_single_process(tmp_path):
    """Pinpoints a runtime that changes the math of vit or convdeep when the blocks are split
    [2, 2] over two gloo ranks (the input block and the first equal block on rank 0; token-shaped
    activations through the transport, LayerNorm, attention): parameters, buffers, feedback and
    test metrics must equal one process."""
    models = ["vit", "convdeep"]
    spawn(train_balanced_models, 2, str(tmp_path), models, PARALLEL_RULES, (2, 2), 2, STEPS, timeout=300)
    for model in models:
        for rule in PARALLEL_RULES:
            want = run_steps(balanced_config(model, rule, microbatches=2), DistContext(), STEPS)
            got_state, got_eval, got_partition = _merge(tmp_path, f"{model}-{rule}", 2)
            assert got_partition == [[0, 1], [2, 3]]
            assert sorted(got_state) == sorted(want["state"]), (model, rule)
            for key, value in want["state"].items():
                torch.testing.assert_close(got_state[key], value, msg=lambda m: f"{model}/{rule}/{key}: {m}")
            assert got_eval[1:] == want["eval"][1:], (model, rule)
            assert got_eval[0] == pytest.approx(want["eval"][0], rel=1e-5), (model, rule)


# --------------------------------------------------------------------------- block count, config


@pytest.mark.parametrize("name", ["vit", "convdeep"])
@pytest.mark.parametrize("depth", [1, 4, 6])
def test_num_blocks_and_plan_report_depth_plus_two(capsys, name, depth):
    """Pinpoints a block count other than depth + 2 (input block, depth equal blocks, head;
    ``num_blocks``, ``parallel-dkp plan``), or one that depends on the input (vit's default patch 7
    does not divide plan's 32x32 dummy)."""
    cfg = ModelConfig(name=name, depth=depth)
    assert num_blocks(cfg) == depth + 2
    assert len(blocks_module.block_specs(cfg, input_shape=(1, 28, 28), num_classes=10)) == depth + 2
    assert main(["plan", "--set", f"model.name={name}", "--set", f"model.depth={depth}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"model": name, "num_blocks": depth + 2, "max_stages": depth + 2}


def test_plan_builds_no_vit_or_convdeep_block(monkeypatch):
    """Pinpoints `plan` allocating layers of the balanced networks: it must only count specs."""
    def refuse(*args, **kwargs):
        raise AssertionError("plan built a block")

    for helper in ("_conv_block", "_PatchEmbedding", "_TransformerBlock"):
        monkeypatch.setattr(blocks_module, helper, refuse)
    for name in ("vit", "convdeep"):
        assert make_plan(load_config(None, [f"model.name={name}"])).max_stages == 6  # depth 4 + 2


@pytest.mark.parametrize("override, words", [
    ("model.dim=10", ["model.dim = 10", "model.heads = 4"]),
    ("model.heads=0", ["model.heads = 0", ">= 1"]),
    ("model.patch=0", ["model.patch = 0"]),
    ("model.depth=0", ["model.depth = 0"]),
    ("model.width=0", ["model.width = 0"]),
])
def test_bad_sizes_are_config_errors(override, words):
    """Pinpoints a vit/convdeep size the config accepts although no network can be built from it."""
    with pytest.raises(ValueError) as err:
        load_config(None, ["model.name=vit", override])
    assert all(word in str(err.value) for word in words), str(err.value)


def test_patch_that_does_not_divide_the_image_names_the_keys():
    """Pinpoints vit building on images its patches do not tile (or failing without the fix)."""
    with pytest.raises(ValueError, match=r"model\.patch = 7.*data\.image_size"):
        build_blocks(ModelConfig(name="vit"), input_shape=(3, 32, 32), num_classes=10, seed=0)
    blocks = build_blocks(ModelConfig(name="vit"), input_shape=(1, 28, 28), num_classes=10, seed=0)
    assert blocks[0](torch.zeros(2, 1, 28, 28)).shape == (2, 16, 64)


@MODELS
def test_block_outputs_are_contiguous(model):
    """Pinpoints a block handing on a transposed (non-contiguous) activation: it is slower for the next
    block, and torch.distributed.pipelining rejects its strides between stages (bp/fa/kp on 2 ranks)."""
    x = torch.randn(2, *TINY_INPUT)
    for block in build_blocks(model, input_shape=TINY_INPUT, num_classes=3, seed=0):
        x = block(x)
        assert x.is_contiguous(), type(block).__name__


def test_vit_blocks_end_with_a_layernorm_unless_batch_norm_is_off():
    """Pinpoints vit's hidden blocks losing the output LayerNorm that keeps DFA/DKP from diverging
    (``model.batch_norm``, on by default), or keeping it when it is turned off."""
    for batch_norm, kind in ((True, nn.LayerNorm), (False, nn.Identity)):
        model = ModelConfig(name="vit", dim=8, heads=2, patch=2, depth=2, batch_norm=batch_norm)
        blocks = build_blocks(model, input_shape=TINY_INPUT, num_classes=3, seed=0)
        assert [type(b.norm_out) for b in blocks[1:-1]] == [kind, kind]
