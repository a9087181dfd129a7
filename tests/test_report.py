"""``parallel-dkp report`` (figures from saved runs) and the optional ``TensorBoardLogger``.

Fake run folders (metrics.jsonl, alignment.jsonl) are written into tmp_path; figures are checked
to exist and decode as PNG images, not pixel by pixel. Everything runs in this process
(``cli.main``) except one real command line; a few seconds in all.
"""

from __future__ import annotations

import builtins
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from parallel_dkp.analysis import report
from parallel_dkp.analysis.tensorboard import INSTALL_MESSAGE, TensorBoardLogger, scalar_tag
from parallel_dkp.cli import main

REPO = Path(__file__).resolve().parents[1]
METRICS = ("fig2_angle", "grad_angle", "feedback_angle")
BLOCKS = (0, 1, 2)
STEPS = (0, 10, 20, 30)
ALL_FIGURES = {"curves.png", *(f"alignment_{metric}.png" for metric in METRICS)}


def metrics_row(rule: str, epoch: int, seed: int) -> dict:
    """A metrics.jsonl row as train's ``_metrics_row`` writes it; accuracies differ by seed."""
    return {
        "epoch": epoch, "rule": rule, "model": "conv2", "data": "fashion_mnist",
        "train_loss": 2.0 / epoch + 0.1 * seed, "train_acc": 0.5 + 0.1 * epoch + 0.02 * seed,
        "test_loss": 2.1 / epoch, "test_acc": 0.45 + 0.1 * epoch - 0.02 * seed,
        "train_seconds": 1.5, "train_examples": 1000, "test_examples": 200, "world_size": 1,
    }


def write_run(folder: Path, rule: str, seed: int = 0, *, epochs: int = 3, alignment: bool = True) -> Path:
    """A run folder: ``epochs`` metrics rows and (optionally) alignment rows, STEPS x BLOCKS x METRICS."""
    folder.mkdir(parents=True)
    with (folder / "metrics.jsonl").open("w") as f:
        for epoch in range(1, epochs + 1):
            f.write(json.dumps(metrics_row(rule, epoch, seed)) + "\n")
    if alignment:
        with (folder / "alignment.jsonl").open("w") as f:
            for step in STEPS:
                for block in BLOCKS:
                    for metric in METRICS:
                        f.write(json.dumps({
                            "epoch": 1 + step // 20, "step": step, "rule": rule, "block": block, "metric": metric,
                            "value": 80.0 - step - 5 * block + 2 * seed,
                            "norm_ratio": 1.1 if metric == "feedback_angle" else None,
                        }) + "\n")
    return folder


@pytest.fixture
def trials(tmp_path) -> Path:
    """runs/trials/<rule>/seed<n>: dkp twice (the +- std band), dfa once, bp once without alignment."""
    root = tmp_path / "trials"
    write_run(root / "dkp" / "seed0", "dkp", 0)
    write_run(root / "dkp" / "seed1", "dkp", 1)
    write_run(root / "dfa" / "seed0", "dfa", 0)
    write_run(root / "bp" / "seed0", "bp", 0, alignment=False)
    return root


def assert_pngs(folder: Path, names: set[str]) -> None:
    """Every name is a PNG file in ``folder`` that PIL decodes, with a non-empty size."""
    for name in sorted(names):
        path = folder / name
        assert path.is_file(), f"{name} not written (folder has {sorted(p.name for p in folder.iterdir())})"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0, (name, image.size)


def run_report(capsys, *args: str) -> tuple[int, str, str]:
    """``parallel-dkp report ARGS`` in this process: (exit code, stdout, stderr with lines joined)."""
    code = main(["report", *args])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


def test_report_writes_curves_and_every_alignment_metric(capsys, trials):
    """Pinpoints the report command itself: a folder of runs (found recursively, two seeds of dkp
    averaged) gives curves.png and one alignment_<metric>.png per metric present, all decodable PNGs,
    written into the first RUN_DIR by default, and their paths printed on stdout."""
    code, out, err = run_report(capsys, str(trials))
    assert code == 0, err
    assert_pngs(trials, ALL_FIGURES)
    assert {Path(line).name for line in out.split()} == ALL_FIGURES
    assert all(Path(line).parent == trials for line in out.split())


def test_report_command_line_with_out_and_label_by_dir(tmp_path, trials):
    """Pinpoints the installed entry point (``python -m parallel_dkp report``): several RUN_DIRs,
    --out into a new folder, --label-by dir, exit 0 and the PNGs there."""
    out = tmp_path / "figures" / "new"
    result = subprocess.run(
        [sys.executable, "-m", "parallel_dkp", "report", str(trials / "dkp"), str(trials / "bp" / "seed0"),
         "--out", str(out), "--label-by", "dir"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert_pngs(out, ALL_FIGURES)
    assert sorted(Path(line).name for line in result.stdout.split()) == sorted(ALL_FIGURES)


def test_runs_of_one_rule_are_averaged_with_their_std(trials):
    """Pinpoints grouping and averaging (what the lines and bands show): by rule, the two dkp seeds
    are one line in the paper's order (serial bp first) whose value is their mean and band their
    sample std; by dir, every run is its own line."""
    runs = report.find_runs([trials])
    assert len(runs) == 4
    groups = report.group_runs(runs, "rule")
    assert [g.label for g in groups] == ["bp", "dfa", "dkp"]
    dkp = groups[-1]
    assert len(dkp.runs) == 2
    xs, means, stds, counts = report.mean_std([{e: r["test_acc"] for e, r in run.epochs.items()} for run in dkp.runs])
    assert xs == [1, 2, 3] and counts == [2, 2, 2]
    expected = [(metrics_row("dkp", e, 0)["test_acc"] + metrics_row("dkp", e, 1)["test_acc"]) / 2 for e in xs]
    assert means == pytest.approx(expected)
    assert stds == pytest.approx([0.02 / math.sqrt(2)] * 3)  # sample std of two values 0.02 apart
    angles = [run.alignment["fig2_angle"][1] for run in dkp.runs]  # block 1, step -> value
    assert report.mean_std(angles)[1] == pytest.approx([76.0 - step for step in STEPS])
    assert [g.label for g in report.group_runs(runs, "dir")] == [
        "trials/bp/seed0", "trials/dfa/seed0", "trials/dkp/seed0", "trials/dkp/seed1"]
    styles = report._styles(groups, "rule")
    assert styles["bp"]["linestyle"] == "--" and styles["dkp"]["linestyle"] == "-"  # as in the paper's Figs. 3-4


def test_runs_of_different_data_are_not_averaged(tmp_path):
    """Pinpoints the label when runs of one rule trained on different data: they must stay two lines
    (named with model and data), never one mean across datasets."""
    write_run(tmp_path / "a", "dkp")
    other = write_run(tmp_path / "b", "dkp")
    rows = [json.loads(line) | {"data": "cifar10"} for line in (other / "metrics.jsonl").read_text().splitlines()]
    (other / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    groups = report.group_runs(report.find_runs([tmp_path]), "rule")
    assert sorted(g.label for g in groups) == ["dkp (conv2, cifar10)", "dkp (conv2, fashion_mnist)"]


def test_run_without_alignment_gives_only_curves(capsys, tmp_path):
    """Pinpoints a run measured without alignment (the default): curves.png only, no alignment figure."""
    run = write_run(tmp_path / "run", "bp", alignment=False)
    code, out, err = run_report(capsys, str(run))
    assert code == 0, err
    assert_pngs(run, {"curves.png"})
    assert not list(run.glob("alignment_*.png"))
    assert out.split() == [str(run / "curves.png")]


def test_folder_without_metrics_is_a_clean_exit_2(capsys, tmp_path):
    """Pinpoints the error for a RUN_DIR that holds no run (nor any below it) or does not exist:
    exit 2 and a message naming the path, not a traceback; nothing written."""
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    code, out, err = run_report(capsys, str(empty))
    assert code == 2 and out == ""
    assert str(empty) in err and "metrics.jsonl" in err
    missing = tmp_path / "nope"
    code, _, err = run_report(capsys, str(missing))
    assert code == 2 and str(missing) in err
    assert not list(tmp_path.rglob("*.png"))


def test_malformed_lines_name_the_file_and_line(capsys, tmp_path):
    """Pinpoints reading: a corrupt line in the middle is exit 2 naming file:line; an incomplete
    last line (a live run still writing) is skipped with a warning and the report still drawn."""
    run = write_run(tmp_path / "run", "dkp")
    alignment = run / "alignment.jsonl"
    good = alignment.read_text()
    alignment.write_text(good + '{"step": 40, "blo')  # no newline: a write in progress
    code, _, err = run_report(capsys, str(run))
    assert code == 0, err
    assert "incomplete last line" in err
    alignment.write_text('{"step": 40, "blo\n' + good)
    code, _, err = run_report(capsys, str(run))
    assert code == 2 and f"{alignment}:1" in err


def test_missing_matplotlib_is_a_clean_error(capsys, monkeypatch, trials):
    """Pinpoints the optional dependency: with matplotlib not importable, report exits 2 with the
    install command of the plots extra (no traceback) and writes nothing."""
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, out, err = run_report(capsys, str(trials))
    assert code == 2 and out == ""
    assert "pip install 'parallel_dkp[plots]'" in err
    assert not list(trials.rglob("*.png"))


def test_tensorboard_tags():
    """Pinpoints the metrics.jsonl field -> TensorBoard tag mapping (train_loss -> train/loss)."""
    assert [scalar_tag(k) for k in ("train_loss", "train_acc", "test_loss", "test_acc", "train_seconds",
                                    "world_size")] == [
        "train/loss", "train/acc", "test/loss", "test/acc", "train/seconds", "world_size"]


def test_tensorboard_logger_without_tensorboard_says_how_to_install(monkeypatch, tmp_path):
    """Pinpoints the error of run.tensorboard = true without the tensorboard package: a ValueError
    with the install command (sys.modules[name] = None makes ``import name`` fail)."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ValueError) as info:
        TensorBoardLogger(tmp_path / "tb")
    assert INSTALL_MESSAGE in str(info.value)


def test_tensorboard_logger_writes_the_scalars(tmp_path):
    """Pinpoints TensorBoardLogger against real event files (skipped without tensorboard): every
    numeric metrics.jsonl field at step=epoch, alignment values at their global step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    rows = [metrics_row("dkp", epoch, 0) for epoch in (1, 2)]
    alignment = [{"epoch": 1, "step": step, "rule": "dkp", "block": block, "metric": "fig2_angle",
                  "value": 50.0 + step + block, "norm_ratio": None} for step in (10, 20) for block in (0, 1)]
    alignment.append({"epoch": 1, "step": 20, "rule": "dkp", "block": 1, "metric": "feedback_angle",
                      "value": 30.0, "norm_ratio": 1.25})
    with TensorBoardLogger(log_dir) as logger:
        for row in rows:
            logger.log_epoch(row)
        logger.log_alignment(alignment)
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/acc", "test/loss", "test/acc", "train/seconds", "train/examples",
                "test/examples", "world_size", "alignment/fig2_angle/block0", "alignment/fig2_angle/block1",
                "alignment/feedback_angle/block1", "alignment_norm_ratio/feedback_angle/block1"}
    assert tags == expected
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        scalars = events.Scalars(scalar_tag(key))
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([row[key] for row in rows])
    block1 = events.Scalars("alignment/fig2_angle/block1")
    assert [(s.step, s.value) for s in block1] == [(10, pytest.approx(61.0)), (20, pytest.approx(71.0))]
    assert events.Scalars("alignment_norm_ratio/feedback_angle/block1")[0].value == pytest.approx(1.25)


def test_training_with_run_tensorboard_logs_metrics_and_alignment(tmp_path):
    """Pinpoints ``run.tensorboard = true`` writing nothing (or not the epoch metrics and alignment
    angles that metrics.jsonl and alignment.jsonl hold)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from parallel_dkp.config import load_config
    from parallel_dkp.train import train

    train(load_config(None, [
        "rule.name=dkp", "data.name=synthetic", "data.synthetic_shape=[1, 8, 8]", "data.synthetic_size=64",
        "data.batch_size=16", "run.progress=false", "run.epochs=2", "analysis.align_every=2",
        "run.tensorboard=true", f"run.out_dir={tmp_path}"]))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "test/acc", "alignment/fig2_angle/block0", "alignment/grad_angle/block3"} <= tags
    assert [e.step for e in events.Scalars("test/acc")] == [1, 2]


def test_run_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    """Pinpoints a missing tensorboard package discovered after training started (or never)."""
    import importlib.util

    from parallel_dkp.config import load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'parallel_dkp\[tensorboard\]'"):
        load_config(None, ["run.tensorboard=true"])
