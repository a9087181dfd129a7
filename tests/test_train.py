"""The trainer in one process: real learning on Fashion-MNIST and what a run leaves on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parallel_dkp.config import load_config
from parallel_dkp.train import train

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(),
                    reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
def test_dkp_learns_real_fashion_mnist(tmp_path):
    """Pinpoints a DKP that does not learn: conv2 on 4096 real training images for one epoch
    must clearly beat chance (10%) on 2000 held-out test images."""
    cfg = load_config(None, [
        "rule.name=dkp", "model.name=conv2", "data.name=fashion_mnist", "data.train_limit=4096",
        "data.test_limit=2000", "data.batch_size=128", "run.epochs=1", "run.progress=false",
        f"run.out_dir={tmp_path}",
    ])
    history = train(cfg)
    assert len(history) == 1
    assert history[0]["test_examples"] == 2000
    assert history[0]["test_acc"] > 0.6, history


def test_run_directory_holds_resolved_config_and_metrics(tmp_path):
    """Pinpoints a run whose outputs cannot reproduce it: the resolved config must load back to
    the same Config, and metrics.jsonl must hold one row per epoch with the documented keys."""
    cfg = load_config(None, ["data.name=synthetic", "data.synthetic_shape=[1, 8, 8]", "data.synthetic_size=64",
                             "data.batch_size=16", "run.epochs=2", "run.progress=false", f"run.out_dir={tmp_path}"])
    history = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == history
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("epoch", "rule", "train_loss", "train_acc", "test_loss", "test_acc", "train_seconds"):
        assert key in rows[0]
    assert rows[0]["train_examples"] == 64 and rows[0]["train_seconds"] > 0
    assert load_config(tmp_path / "config.toml") == cfg
