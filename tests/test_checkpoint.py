"""Checkpoints: exact resume after a stop, on one process and two ranks, and across partitions."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from multirank import free_port, spawn
from workers import train_until_signal

from parallel_dkp import checkpoint
from parallel_dkp.config import load_config
from parallel_dkp.train import evaluate_checkpoint, train

RUN = [
    "rule.name=dkp", "model.name=conv2", "data.name=synthetic", "data.synthetic_shape=[1, 8, 8]",
    "data.synthetic_size=96", "data.batch_size=16", "parallel.microbatches=2", "run.progress=false",
    "run.epochs=3", "run.checkpoint_every=4", "optim.feedback.lr=0.01", "parallel.timeout_s=60",
    "optim.feedback.scheduler=step",  # the schedulers' state must survive too
]


def _final_state(out_dir: Path) -> dict[str, torch.Tensor]:
    """Every block's tensors from the newest checkpoint, whatever partition wrote it."""
    newest = checkpoint.latest(out_dir)
    state = {}
    for name in checkpoint.read_manifest(newest)["shards"]:
        state.update(torch.load(newest / name, weights_only=False)["model"])
    return state


def _metrics(out_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("train_seconds")  # wall time is the one thing allowed to differ
        for key in ("world_size", "stages", "replicas"):  # and the layout
            row.pop(key)
    return rows


def _assert_same_run(got: Path, want: Path, *, exact: bool = True) -> None:
    """Same metrics and final tensors; bit for bit when both ran on one layout (``exact``), to
    float tolerance across layouts (ranks sum micro-batch terms in another order)."""
    got_rows, want_rows = _metrics(got), _metrics(want)
    if exact:
        assert got_rows == want_rows
    else:
        assert [r.keys() for r in got_rows] == [r.keys() for r in want_rows]
        for g, w in zip(got_rows, want_rows):
            assert g == pytest.approx(w, rel=1e-5)
    got_state, want_state = _final_state(got), _final_state(want)
    assert sorted(got_state) == sorted(want_state)
    tolerance = {"rtol": 0, "atol": 0} if exact else {}
    for key, value in want_state.items():
        torch.testing.assert_close(got_state[key], value, **tolerance, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    train(load_config(None, [*RUN, f"run.out_dir={out}"]))
    return out


def test_sigterm_then_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    """Pinpoints a resume that is not exact: stopped by a real SIGTERM mid-epoch (it arrives
    after step 7 of 18; the flag is agreed on during step 8, so the run stops after step 8,
    between two periodic checkpoints), then resumed, a run must end with bit-identical
    parameters, BN statistics, feedback, and the same metrics.jsonl as the uninterrupted run."""
    train_until_signal(0, 1, str(tmp_path), RUN, signal_rank=0, signal_at=7)
    record = json.loads((tmp_path / "rank0.json").read_text())
    assert record["ended"] == "interrupted" and record["signal"] == "SIGTERM" and record["code"] == 143
    assert "epoch 2, step 2 " in record["message"] and "--resume" in record["message"]
    assert checkpoint.read_manifest(checkpoint.latest(tmp_path))["global_step"] == 8
    train_until_signal(0, 1, str(tmp_path), RUN, signal_rank=None, signal_at=None)
    assert json.loads((tmp_path / "rank0.json").read_text())["ended"] == "finished"
    _assert_same_run(tmp_path, uninterrupted)


@pytest.mark.multirank
def test_two_ranks_stop_together_and_resume_on_one_process(tmp_path, uninterrupted):
    """Pinpoints ranks that disagree on where to stop, shards that do not load into another
    partition, or a 2-rank resume that is not exact: a SIGTERM reaches rank 0 only; both ranks
    must stop after the same step and write one complete checkpoint; resuming that 2-rank
    checkpoint on 2 ranks, and separately on a single process, must end like the uninterrupted
    single-process run."""
    spawn(train_until_signal, 2, str(tmp_path), [*RUN, "parallel.partition=[2, 2]"], 0, 5, timeout=240)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["ended"] for r in records] == ["interrupted", "interrupted"], records
    manifest = checkpoint.read_manifest(checkpoint.latest(tmp_path))
    assert manifest["world_size"] == 2 and manifest["partition"] == [[0, 2], [2, 4]]
    stopped_at = manifest["global_step"]
    assert stopped_at >= 5

    on_one = tmp_path / "on_one_process"  # a copy of the stopped run, resumed on 1 process
    shutil.copytree(tmp_path / "checkpoints", on_one / "checkpoints")
    shutil.copy(tmp_path / "metrics.jsonl", on_one / "metrics.jsonl")
    train_until_signal(0, 1, str(on_one), RUN, signal_rank=None, signal_at=None)
    _assert_same_run(on_one, uninterrupted, exact=False)

    spawn(train_until_signal, 2, str(tmp_path), [*RUN, "parallel.partition=[2, 2]"], None, None, timeout=240)
    _assert_same_run(tmp_path, uninterrupted, exact=False)

    # Trained on 2 ranks, evaluated on 1: the test metrics of the run's last epoch.
    evaluated = evaluate_checkpoint(load_config(None, [*RUN, f"run.out_dir={tmp_path}"]))
    last = _metrics(tmp_path)[-1]
    assert evaluated["test_examples"] == last["test_examples"]
    assert evaluated["test_acc"] == pytest.approx(last["test_acc"])
    assert evaluated["test_loss"] == pytest.approx(last["test_loss"], rel=1e-5)


def test_a_checkpoint_of_another_config_is_not_resumed(tmp_path, uninterrupted):
    """Pinpoints two different runs pointed at one folder silently mixing: the second must fail
    before training, naming the differing key and the ways out."""
    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    with pytest.raises(ValueError, match=r"optim\.forward\.lr.*--no-resume"):
        train(load_config(None, [*RUN, f"run.out_dir={tmp_path}", "optim.forward.lr=0.1"]))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(load_config(None, [*RUN, f"run.out_dir={tmp_path / 'empty'}"]), resume=True)


def test_keeps_the_newest_checkpoints_and_ignores_incomplete_ones(tmp_path, uninterrupted):
    """Pinpoints unbounded checkpoint growth, or an incomplete checkpoint (no manifest, as after
    a crash mid-write) being resumed from."""
    complete = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert len(complete) == 2  # run.keep_checkpoints = 2
    assert complete[-1] == "step-00000018"  # the final model: epoch 3's end
    (uninterrupted / "checkpoints" / "step-00000099").mkdir()
    try:
        assert checkpoint.latest(uninterrupted).name == "step-00000018"
    finally:
        (uninterrupted / "checkpoints" / "step-00000099").rmdir()


def _torchrun(*args, env=None, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
                               # what the launchers set: see launch/torchrun.sh (pytorch#135712)
                               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})


@pytest.mark.multirank
def test_killed_rank_restarts_and_resumes_from_the_last_checkpoint(tmp_path, uninterrupted):
    """Pinpoints a SIGKILLed rank costing the run: under ``torchrun --max-restarts=1`` the job
    restarts, resumes from the last complete checkpoint, and ends as the uninterrupted run."""
    sets = [arg for item in [*RUN, "parallel.partition=[2, 2]", f"run.out_dir={tmp_path / 'run'}"]
            for arg in ("--set", item)]
    marker = tmp_path / "killed.txt"
    proc = _torchrun("--max-restarts", "1", str(Path(__file__).parent / "fault_worker.py"), "train", *sets,
                     env={"FAULT_RANK": "1", "FAULT_STEP": "10", "FAULT_MARKER": str(marker)})
    assert marker.is_file(), "the fault was never injected"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step-00000008" in proc.stderr, proc.stderr[-3000:]
    _assert_same_run(tmp_path / "run", uninterrupted, exact=False)


@pytest.mark.multirank
def test_sigterm_to_torchrun_stops_cleanly_with_the_resume_command(tmp_path):
    """Pinpoints a pre-emption that loses the run or dumps tracebacks: SIGTERM to torchrun (what
    slurm sends) must end every rank at a step boundary with a checkpoint, one line naming where
    it stopped and how to resume, a non-zero exit and no traceback."""
    out = tmp_path / "run"
    sets = [arg for item in [*RUN, "data.synthetic_size=4000", "run.epochs=1", f"run.out_dir={out}"]
            for arg in ("--set", item)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "parallel_dkp", "train",
           *sets]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while checkpoint.latest(out) is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)  # the run is under way once its first periodic checkpoint exists
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    # torchrun's own agent prints a SignalException traceback when it is sent SIGTERM (torch's
    # behaviour, outside our processes); none may come from a rank.
    assert "parallel_dkp/" not in stderr and "PeerFailure" not in stderr, stderr[-3000:]
    assert stderr.count("Resume with:") == 1, stderr[-3000:]
    manifest = checkpoint.read_manifest(checkpoint.latest(out))
    assert 0 < manifest["global_step"] < 250 and manifest["position"]["step"] == manifest["global_step"]


def test_eval_command_reports_a_saved_model(tmp_path, uninterrupted):
    """Pinpoints ``parallel-dkp eval`` failing on a finished run's folder, or disagreeing with the
    test metrics that run logged for its last epoch; a folder without a checkpoint is a clean error."""
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "parallel_dkp", "eval", *[a for item in RUN for a in ("--set", item)],
         "--set", f"run.out_dir={uninterrupted}", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result, last = json.loads(out.read_text()), _metrics(uninterrupted)[-1]
    assert (result["test_acc"], result["test_loss"]) == (last["test_acc"], last["test_loss"])
    missing = subprocess.run(
        [sys.executable, "-m", "parallel_dkp", "eval", "--set", f"run.out_dir={tmp_path / 'none'}",
         "--set", "data.name=synthetic"], capture_output=True, text=True, timeout=120,
    )
    assert missing.returncode == 2 and "no complete checkpoint" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.multirank
def test_trained_on_four_ranks_evaluated_on_one(tmp_path):
    """Pinpoints shards that only load into the partition that wrote them: conv2 trained on 4
    ranks (one block each) must evaluate on a single process to the test metrics the 4-rank run
    logged for its last epoch."""
    four = [*RUN, "run.epochs=1", "parallel.partition=[1, 1, 1, 1]", "parallel.microbatches=4"]
    spawn(train_until_signal, 4, str(tmp_path), four, None, None, timeout=240)
    assert checkpoint.read_manifest(checkpoint.latest(tmp_path))["world_size"] == 4
    on_one = [item for item in four if not item.startswith("parallel.partition")]
    evaluated = evaluate_checkpoint(load_config(None, [*on_one, f"run.out_dir={tmp_path}"]))
    last = _metrics(tmp_path)[-1]
    assert evaluated["test_examples"] == last["test_examples"]
    assert evaluated["test_acc"] == pytest.approx(last["test_acc"])
    assert evaluated["test_loss"] == pytest.approx(last["test_loss"], rel=1e-5)


def test_a_checkpoint_from_before_a_new_option_still_resumes():
    """Pinpoints a new config key making every older run un-resumable: a saved config that lacks a
    key the code has since gained compares as that key's default."""
    from parallel_dkp.config import to_dict

    cfg = load_config(None, RUN)
    saved = to_dict(cfg)
    del saved["model"]["conv_padding"], saved["analysis"]
    assert checkpoint.config_differences(saved, cfg) == []
    changed = load_config(None, [*RUN, "model.conv_padding=0"])
    assert checkpoint.config_differences(saved, changed) == ["model.conv_padding: 1 -> 0"]


@pytest.mark.multirank
def test_mesh_checkpoints_resume_exactly_and_load_into_any_layout(tmp_path):
    """Pinpoints mesh checkpoints that lose a replica's state, write a shard per rank, or do not
    load into another layout: a 2 x 2 run (stages x replicas) stopped by a SIGTERM that reaches
    one replica writes one shard per stage; resumed on 2 x 2 it ends bit for bit like the
    uninterrupted 2 x 2 run; resumed on one process (with the same micro-batches) it ends with
    the same parameters; and one process evaluates the final checkpoint as the mesh did."""
    mesh = [*RUN, "parallel.partition=[2, 2]", "parallel.replicas=2"]
    want = tmp_path / "uninterrupted"
    spawn(train_until_signal, 4, str(want), mesh, None, None, timeout=240)

    got = tmp_path / "stopped"
    spawn(train_until_signal, 4, str(got), mesh, 1, 5, timeout=240)
    records = [json.loads((got / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r["ended"] for r in records] == ["interrupted"] * 4, records
    newest = checkpoint.latest(got)
    manifest = checkpoint.read_manifest(newest)
    assert (manifest["stages"], manifest["replicas"], manifest["partition"]) == (2, 2, [[0, 2], [2, 4]])
    assert sorted(p.name for p in newest.glob("shard-*")) == manifest["shards"] == ["shard-00.pt", "shard-01.pt"]

    on_one = tmp_path / "on_one_process"
    shutil.copytree(got / "checkpoints", on_one / "checkpoints")
    shutil.copy(got / "metrics.jsonl", on_one / "metrics.jsonl")
    train_until_signal(0, 1, str(on_one), [*RUN, "parallel.microbatches=4"], signal_rank=None, signal_at=None)
    one_state, want_state = _final_state(on_one), _final_state(want)
    for key, value in want_state.items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):  # per replica, averaged
            torch.testing.assert_close(one_state[key], value, msg=lambda m: f"{key}: {m}")

    spawn(train_until_signal, 4, str(got), mesh, None, None, timeout=240)
    _assert_same_run(got, want)

    evaluated = evaluate_checkpoint(load_config(None, [*RUN, f"run.out_dir={want}"]))
    last = _metrics(want)[-1]
    assert evaluated["test_examples"] == last["test_examples"]
    assert evaluated["test_acc"] == pytest.approx(last["test_acc"])
    assert evaluated["test_loss"] == pytest.approx(last["test_loss"], rel=1e-5)
