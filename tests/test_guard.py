"""The divergence guard: a non-finite update stops (or is skipped by) every rank together."""

from __future__ import annotations

import json

import pytest
import torch
from multirank import spawn
from workers import poison_one_gradient

from parallel_dkp import checkpoint
from parallel_dkp.config import load_config
from parallel_dkp.guard import NonFiniteError
from parallel_dkp.train import train

RUN = [
    "model.name=conv2", "data.name=synthetic", "data.synthetic_shape=[1, 8, 8]", "data.synthetic_size=96",
    "data.batch_size=16", "parallel.microbatches=2", "run.progress=false", "run.epochs=2", "parallel.timeout_s=60",
]


def _finite(out_dir) -> bool:
    newest = checkpoint.latest(out_dir)
    tensors = []
    for name in checkpoint.read_manifest(newest)["shards"]:
        tensors += [t for t in torch.load(newest / name, weights_only=False)["model"].values() if t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_a_diverging_run_stops_before_saving_a_bad_checkpoint(tmp_path):
    """Pinpoints a divergence that is trained through, or saved: BP without BN at lr 1e12 must stop
    with the first bad step, the rule and the last good checkpoint named, and that checkpoint
    (one is written every step) must hold only finite numbers."""
    cfg = load_config(None, [*RUN, "rule.name=bp", "model.batch_norm=false", "optim.forward.lr=1e12",
                             "run.checkpoint_every=1", "run.log_every=1", f"run.out_dir={tmp_path}"])
    with pytest.raises(NonFiniteError, match=r"at step \d+, .*rule bp; the last good checkpoint is .*step-0+\d+"):
        train(cfg)
    assert _finite(tmp_path)


@pytest.mark.multirank
@pytest.mark.parametrize("bad_rank", [0, 1])
def test_nan_on_one_rank_stops_every_rank_with_the_block_named(tmp_path, bad_rank):
    """Pinpoints a NaN seen by one rank only, so that the others fail later with a peer error (or
    keep training): a NaN gradient in rank ``bad_rank``'s stage at step 3 must stop both ranks
    at the same read point with a message naming step 3, the block and the rule."""
    spawn(poison_one_gradient, 2, str(tmp_path), [*RUN, "rule.name=dkp", "parallel.partition=[2, 2]",
                                                  "run.log_every=2"], bad_rank, 3, timeout=180)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["ended"] for r in records] == ["nonfinite", "nonfinite"], records
    block = 2 * bad_rank  # the first parameter of the stage belongs to its first block
    assert records[0]["message"] == records[1]["message"]
    assert f"at step 3, block(s) {block} got non-finite gradients under rule dkp" in records[0]["message"]


@pytest.mark.multirank
def test_skip_batch_drops_the_bad_step_on_every_rank(tmp_path):
    """Pinpoints ``run.on_nonfinite = skip_batch`` applying a NaN update, or ranks that disagree on
    which step to drop: the run must finish with finite parameters and the dropped step's
    examples left out of the epoch's training count."""
    spawn(poison_one_gradient, 2, str(tmp_path), [*RUN, "rule.name=dkp", "parallel.partition=[2, 2]",
                                                  "run.on_nonfinite=skip_batch"], 1, 4, timeout=180)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["ended"] for r in records] == ["finished", "finished"], records
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_examples"] for r in rows] == [96 - 16, 96]
    assert _finite(tmp_path)


def test_the_guard_flags_exactly_the_blocks_whose_gradients_are_not_finite():
    """Pinpoints the per-block flags going astray when all the norms come from one call: with a
    block that has no parameters, a parameter without a gradient and a frozen one, a NaN in one
    block and an inf in another (after the missing gradient) must flag those two blocks and no
    other, at the step they happen; a later step with another bad block keeps the first's findings."""
    from types import SimpleNamespace

    from torch import nn

    from parallel_dkp.guard import NonFiniteGuard
    from parallel_dkp.parallel.distributed import DistContext
    from parallel_dkp.parallel.metrics import StepMetrics

    blocks = nn.ModuleList([nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
                            nn.Linear(2, 2)])
    blocks[3].bias.requires_grad_(False)
    stage = SimpleNamespace(blocks=blocks, parameters=blocks.parameters, indices=[10, 11, 12, 13])
    guard = NonFiniteGuard(stage, DistContext(), mode="stop", timeout_s=5, rule="dkp")
    guard.start_at(0)

    def step(bad: dict[tuple[int, int], float]) -> None:
        for p in blocks.parameters():
            p.grad = torch.ones_like(p) if p.requires_grad else None
        blocks[2][1].bias.grad = None  # no gradient this step
        for (block, which), value in bad.items():
            list(blocks[block].parameters())[which].grad[0] = value
        guard.observe(StepMetrics())

    step({})
    assert guard.report() is None
    step({(0, 1): float("nan"), (3, 0): float("inf")})  # block 0's bias, block 3's weight
    step({(2, 2): float("nan")})
    assert guard.report() == {"rank": 0, "step": 2, "blocks": [10, 13], "loss": False}
