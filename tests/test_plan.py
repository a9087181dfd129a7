"""``parallel-dkp plan``: the model's blocks, the most pipeline stages, and the stages x replicas
layout of a world size, from the config alone.

Everything runs in this process (``cli.main``) except one real command line; a few seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_dkp.cli import main
from parallel_dkp.config import ModelConfig, load_config
from parallel_dkp.models import blocks as blocks_module
from parallel_dkp.models import num_blocks
from parallel_dkp.plan import make_plan

REPO = Path(__file__).resolve().parents[1]


def plan(capsys, *args: str) -> tuple[int, str, str]:
    """``parallel-dkp plan ARGS`` in this process: (exit code, stdout, stderr with lines joined)."""
    code = main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())  # rich wraps long messages at 80 columns


@pytest.mark.parametrize("config, expected", [
    ("configs/cifar10_conv2.toml", 4),
    ("configs/default.toml", 4),
    ("configs/cifar100_alexnet.toml", 8),
    ("configs/tiny_imagenet_alexnet.toml", 8),
    ("configs/alexnet_small_cifar100.toml", 8),
])
def test_plan_max_stages_of_shipped_configs(capsys, config, expected):
    """Pinpoints a wrong block count for a shipped config (conv2 has 4 blocks, alexnet and
    alexnet_small 8), or a layout of twice that many ranks other than all stages x 2 replicas.
    The datasets of these configs are not on this machine: plan must not need them."""
    code, out, err = plan(capsys, "--config", config, "--json")
    assert code == 0, err
    assert json.loads(out)["max_stages"] == expected
    code, out, err = plan(capsys, "--config", config, "--world-size", str(2 * expected))
    assert code == 0, err
    assert out == f"{expected} 2\n", out


@pytest.mark.parametrize("widths", [[64], [256, 256, 256], [32, 32, 32, 32, 32, 32]])
def test_plan_mlp_has_one_block_per_width_plus_output(capsys, widths):
    """Pinpoints the mlp block count not following model.widths (len(widths) hidden blocks + output)."""
    code, out, err = plan(capsys, "--set", "model.name=mlp", "--set", f"model.widths={widths}",
                          "--set", "data.name=synthetic", "--set", "data.synthetic_shape=[20]", "--json")
    assert code == 0, err
    assert json.loads(out) == {"model": "mlp", "num_blocks": len(widths) + 1, "max_stages": len(widths) + 1}


def test_plan_lists_the_blocks_in_order(capsys):
    """Pinpoints the human-readable plan losing the block names, their order or the rank limit."""
    code, out, err = plan(capsys, "--config", "configs/cifar10_conv2.toml")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "model conv2: 4 blocks", out
    assert lines[1:5] == ["  block 0: conv0", "  block 1: conv1", "  block 2: fc2", "  block 3: out"], out
    assert "at most 4" in lines[5], out


def test_plan_config_typo_is_a_clean_error():
    """Pinpoints a config typo in `plan` giving a traceback, exit code other than 2, or anything on
    stdout (launchers read stdout as the rank count); the real command line, as launchers run it."""
    proc = subprocess.run([sys.executable, "-m", "parallel_dkp", "plan", "--world-size", "2", "--set",
                           "model.nmae=conv2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    err = " ".join(proc.stderr.split())
    assert "config error" in err and "did you mean 'model.name'" in err and "Traceback" not in err, proc.stderr


def test_plan_takes_train_options_and_honours_partition(capsys):
    """Pinpoints `plan` rejecting a train option the launchers pass on (--resume), ignoring an
    explicit parallel.partition (stages = its length), or accepting one that does not add up
    to the model's blocks (that must be a config error naming the fix, exit 2)."""
    code, out, err = plan(capsys, "--resume", "--set", "parallel.partition=[1, 3]", "--world-size", "2")
    assert (code, out) == (0, "2 1\n"), err
    code, out, err = plan(capsys, "--set", "parallel.partition=[1, 1]", "--world-size", "2")
    assert code == 2 and out == "", out
    assert "config error" in err and "must add up to 4" in err, err


@pytest.mark.parametrize("name, real_shape", [
    ("conv2", (1, 28, 28)), ("conv2", (3, 16, 16)), ("mlp", (784,)), ("alexnet_small", (3, 64, 64)),
    ("alexnet", (3, 224, 224)),
])
def test_num_blocks_does_not_depend_on_the_input(name, real_shape):
    """Pinpoints num_blocks disagreeing with the blocks a real input shape gives (it uses a dummy
    input, which is only right while the block count is independent of the data)."""
    cfg = ModelConfig(name=name)
    real = blocks_module.block_specs(cfg, input_shape=real_shape, num_classes=7)
    assert num_blocks(cfg) == len(real)


def test_plan_builds_no_block(monkeypatch):
    """Pinpoints `plan` building (allocating) layers: it must only count the lazy block specs."""
    def refuse(*args, **kwargs):
        raise AssertionError("plan built a block")

    for helper in ("_conv_block", "_fc_block", "_output_block"):
        monkeypatch.setattr(blocks_module, helper, refuse)
    assert make_plan(load_config(REPO / "configs" / "tiny_imagenet_alexnet.toml")).max_stages == 8
