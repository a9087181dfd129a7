"""The one-shot GPU check script (benchmarks/gpu_check.sh), run here as its CPU dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RULES = ["bp", "bp_fc_only", "fa", "kp", "dfa", "dkp", "drtp"]
BENCH_RULES = ["bp", "bp_fc_only", "dfa", "dkp"]


@pytest.mark.timeout(300)
def test_gpu_check_dry_run(tmp_path):
    """Pinpoints that the GPU check script has rotted: its CPU dry run (DRY_RUN=1, the same steps with tiny
    sizes) must pass every step and leave device.json, compare.json, three bench JSONs and two memory JSONs
    naming every rule, so that the one short run on a lent GPU machine does not waste its time on a broken
    script. The failing step's log is under <tmp_path>/logs/ and its tail is in the assertion message."""
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    summary_path = tmp_path / "summary.txt"
    summary = summary_path.read_text() if summary_path.exists() else "(no summary.txt)"
    logs = "\n".join(f"--- {log.name}:\n{log.read_text()[-1500:]}" for log in sorted((tmp_path / "logs").glob("*.log"))
                     if " FAIL " in summary and f"{log.stem} FAIL" in summary)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{summary}\n{logs}\n{proc.stderr[-2000:]}"

    rows = {line.split()[0]: line.split()[1] for line in summary.splitlines() if line and not line.startswith("#")}
    steps = ["device", "pytest_gpu", "compare", "bench_conv2_b32", "bench_conv2_b64", "bench_alexnet_small_b8",
             "unlocking_convdeep", "unlocking_vit", "memory_conv2_b64", "memory_alexnet_small_b8"]
    assert list(rows) == steps, summary
    assert all(status == "PASS" for status in rows.values()), summary
    assert "mode dry-run" in summary and "# RESULT: PASS" in summary

    def load(name: str) -> dict:
        path = tmp_path / name
        assert path.exists(), f"{name} missing; files: {sorted(p.name for p in tmp_path.iterdir())}"
        return json.loads(path.read_text())

    device = load("device.json")
    assert device["dry_run"] is True and "torch" in device and "device_name" in device
    assert (tmp_path / "device.txt").read_text().strip()

    compare = load("compare.json")
    assert compare["ok"] and list(compare["rules"]) == RULES
    assert all(row["ok"] and row["max_abs_diff"] == 0.0 for row in compare["rules"].values())  # CPU vs CPU

    for name, batch in [("bench_conv2_b32.json", 32), ("bench_conv2_b64.json", 64), ("bench_alexnet_small_b8.json", 8)]:
        bench = load(name)["by_microbatches"]["1"]
        assert list(bench["rules"]) == BENCH_RULES, name
        assert bench["batch_size"] == batch and bench["data"] == "synthetic", name
        assert all(row["median_s"] > 0 for row in bench["rules"].values()), name
    assert load("bench_alexnet_small_b8.json")["by_microbatches"]["1"]["model"] == "alexnet_small"

    for model in ("convdeep", "vit"):
        unlocking = load(f"unlocking_{model}.json")
        assert unlocking["model"] == model and set(unlocking["single_device"]["step_s"]) == {"bp", "dfa", "dkp"}
        costs = unlocking["cost_model"]["block_costs"]["4"]
        assert len(costs["forward"]) == 4 and all(v > 0 for v in costs["update"]), model  # depth 2 + 2 blocks

    for name, model in [("memory_conv2_b64.json", "conv2"), ("memory_alexnet_small_b8.json", "alexnet_small")]:
        memory = load(name)
        assert memory["ok"] and memory["model"] == model and list(memory["rules"]) == RULES, name
        assert all(row["peak_allocated_mib"] == "n/a" for row in memory["rules"].values()), name
