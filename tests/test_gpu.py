"""CUDA/NCCL paths. Skipped (with the reason) on machines without a GPU, never faked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from multirank import free_port
from workers import run_steps, small_config

from parallel_dkp.parallel.distributed import DistContext

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("rule", ["bp", "kp", "dkp", "drtp"])
def test_cuda_single_process_matches_cpu(rule):
    """Pinpoints a rule whose CUDA run differs from its CPU run beyond float tolerance."""
    cpu = run_steps(small_config(rule, extra=["run.device=cpu"]), DistContext(), 3)
    gpu = run_steps(small_config(rule, extra=["run.device=cuda"]), DistContext(device=torch.device("cuda", 0)), 3)
    for key, value in cpu["state"].items():
        torch.testing.assert_close(gpu["state"][key].cpu(), value, rtol=1e-3, atol=1e-4,
                                   msg=lambda m: f"{rule} / {key}: {m}")


@pytest.mark.multirank
def test_nccl_torchrun_trains(tmp_path):
    """Pinpoints the NCCL path failing: torchrun with one rank per GPU (1 or 2) trains and logs once."""
    nproc = min(2, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "parallel_dkp", "train",
           "--config", "configs/smoke.toml", "--set", "run.device=cuda", "--set", f"run.out_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["world_size"] == nproc
