"""The command line end to end: torchrun with 2 ranks, and the errors a user can cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from multirank import free_port

SMOKE = ["--set", "data.name=synthetic", "--set", "data.synthetic_shape=[1, 8, 8]", "--set", "data.synthetic_size=128",
         "--set", "data.batch_size=16", "--set", "run.progress=false"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "parallel_dkp", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _torchrun(nproc, *args, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           "-m", "parallel_dkp", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.mark.multirank
@pytest.mark.parametrize("rule", ["dkp", "kp"])
def test_torchrun_two_ranks_writes_metrics_once(tmp_path, rule):
    """Pinpoints a multi-rank run that fails, or where more than one rank logs and writes metrics;
    per-rank phase timings are written only when ``run.profile`` asks for them."""
    out = tmp_path / "run"
    profile = rule == "dkp"
    proc = _torchrun(2, "train", *SMOKE, "--set", f"rule.name={rule}", "--set", "run.epochs=2",
                     "--set", "run.max_steps=3", "--set", "parallel.microbatches=2", "--set", f"run.out_dir={out}",
                     "--set", f"run.profile={str(profile).lower()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"epoch", "rule", "train_loss", "train_acc", "test_loss", "test_acc", "train_seconds"} <= set(rows[0])
    assert rows[0]["rule"] == rule and rows[0]["world_size"] == 2
    assert rows[0]["train_examples"] == 3 * 16
    assert proc.stderr.count("epoch 1: train loss") == 1
    assert (out / "config.toml").is_file()
    assert (out / "phases.json").is_file() == profile
    if profile:
        phases = json.loads((out / "phases.json").read_text())
        assert [r["rank"] for r in phases["ranks"]] == [0, 1]
        assert all(r["step"] > 0 and r["forward"] > 0 for r in phases["ranks"])


@pytest.mark.multirank
def test_torchrun_four_ranks_as_two_stages_of_two_replicas(tmp_path):
    """Pinpoints a stages x replicas run that fails end to end, logs twice, counts an example
    twice (or only one replica's), or leaves a checkpoint with a shard per rank instead of per
    stage: 4 ranks, parallel.replicas=2, the whole command line under torchrun."""
    out = tmp_path / "run"
    proc = _torchrun(4, "train", *SMOKE, "--set", "parallel.replicas=2", "--set", "parallel.microbatches=2",
                     "--set", "run.epochs=1", "--set", "run.max_steps=3", "--set", "run.profile=true",
                     "--set", f"run.out_dir={out}", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 stage(s) x 2 replica(s))" in proc.stderr
    assert proc.stderr.count("epoch 1: train loss") == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and (rows[0]["stages"], rows[0]["replicas"], rows[0]["world_size"]) == (2, 2, 4)
    assert rows[0]["train_examples"] == 3 * 16  # 3 global batches of 16, 8 per replica
    assert rows[0]["test_examples"] == 128 // 4  # synthetic test split, every example once
    shards = sorted(p.name for p in (out / "checkpoints").glob("step-*/shard-*.pt"))
    assert shards == ["shard-00.pt", "shard-01.pt"]
    phases = json.loads((out / "phases.json").read_text())["ranks"]
    assert sorted((r["stage"], r["replica"]) for r in phases) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["reduce"] >= 0 for r in phases)


@pytest.mark.multirank
def test_torchrun_bad_partition_fails_before_training(tmp_path):
    """Pinpoints a partition that does not fit the model being discovered late (or never)."""
    proc = _torchrun(2, "train", *SMOKE, "--set", "parallel.partition=[1, 2]", "--set", f"run.out_dir={tmp_path}")
    assert proc.returncode != 0
    assert "sums to 3 but the model has 4 blocks" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.multirank
def test_torchrun_more_stages_than_blocks_fails_before_training(tmp_path):
    """Pinpoints a layout that does not fit the model being discovered late (or hanging)."""
    proc = _torchrun(3, "train", *SMOKE, "--set", "model.name=mlp", "--set", "model.widths=[8]",
                     "--set", "parallel.stages=3", "--set", f"run.out_dir={tmp_path}")
    assert proc.returncode != 0
    assert "3 pipeline stages but the model has only 2 blocks" in " ".join(proc.stderr.split())
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--set", "rune.epochs=2"], "unknown config key 'rune'"),
        (["--set", "run.epocs=2"], "did you mean 'run.epochs'"),
        (["--set", "rule.name=dpk"], "did you mean 'dkp'"),
        (["--set", "data.batch_size=10", "--set", "parallel.microbatches=3"], "multiple of"),
        (["--config", "nope.toml"], "does not exist"),
    ],
)
def test_config_mistakes_give_clear_errors(args, needle):
    """Pinpoints a config typo that is silently ignored or reported without the remedy."""
    proc = _cli("train", *args)
    assert proc.returncode == 2
    assert needle in " ".join(proc.stderr.split())


def test_missing_dataset_names_the_path_and_remedy(tmp_path):
    """Pinpoints a missing dataset that crashes with a traceback instead of saying what to do."""
    proc = _cli("train", "--set", "data.name=cifar10", "--set", f"data.root={tmp_path / 'nowhere'}")
    assert proc.returncode == 2
    text = " ".join(proc.stderr.split())
    assert "nowhere" in text and "data.root" in text


def test_diverging_run_stops_with_nan_advice(tmp_path):
    """Pinpoints NaN/inf losses that are trained through (or crash) instead of stopping with advice."""
    proc = _cli("train", *SMOKE, "--set", "rule.name=bp", "--set", "model.batch_norm=false",
                "--set", "optim.forward.lr=1e12", "--set", f"run.out_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "lower optim.forward.lr" in " ".join(proc.stderr.split())


def test_single_process_cli_trains(tmp_path):
    """Pinpoints the plain `parallel-dkp train` path (no torchrun) failing to produce metrics."""
    proc = _cli("train", *SMOKE, "--set", "run.max_steps=2", "--set", f"run.out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
