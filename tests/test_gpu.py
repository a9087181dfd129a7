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


@pytest.mark.parametrize("rule", ["bp", "dkp", "drtp"])
def test_cuda_training_step_never_synchronises(rule):
    """Pinpoints a host synchronisation inside a CUDA training step: CUDA's own sync debug mode
    raises on any call that makes the host wait (``.item()``, ``nonzero``, a synchronising copy)."""
    from parallel_dkp.train import build_job, train_step

    cuda = torch.device("cuda", 0)
    job = build_job(small_config(rule, extra=["run.device=cuda"]), DistContext(device=cuda))
    batches = list(job.train_loader)[:3]  # pageable host memory, as the loader gives it
    train_step(job, *batches[0])  # warm-up: lazy initialisations may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches[1:]:
            train_step(job, x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_phase_timer_uses_events():
    """Pinpoints phase timing on CUDA that is missing or wrong: with ``run.profile`` the timer
    records CUDA events and reports positive medians after the steps complete."""
    from parallel_dkp.parallel.timing import CudaEventTimer
    from parallel_dkp.train import build_job, train_step

    cuda = torch.device("cuda", 0)
    job = build_job(small_config("dkp", extra=["run.device=cuda", "run.profile=true"]), DistContext(device=cuda))
    assert isinstance(job.timer, CudaEventTimer)
    for x, y in list(job.train_loader)[:4]:
        job.timer.start_step()
        train_step(job, x, y)
        job.timer.end_step()
    summary = job.timer.summary(skip=1)
    assert summary["step"] > 0 and summary["forward"] > 0 and summary["update"] > 0
