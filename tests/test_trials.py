"""``parallel-dkp trials`` and the paper's numbers (``parallel_dkp.analysis.trials`` / ``.paper``).

The table code runs in this process on hand-made metrics files; the command runs for real, as
subprocesses on tiny synthetic data (2 rules x 2 seeds, one epoch of 4 steps each). About 40 s.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel_dkp.analysis.paper import PAPER_RESULTS, RULE_ORDER, paper_result
from parallel_dkp.analysis.trials import (
    RunResult,
    csv_table,
    format_mean_std,
    markdown_table,
    mean_std,
    summarize,
    write_table,
)
from parallel_dkp.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "fashion_mnist_conv2.toml")
TINY = ["--set", "data.name=synthetic", "--set", "data.synthetic_shape=[1, 8, 8]", "--set", "data.synthetic_size=64",
        "--set", "data.batch_size=16", "--set", "run.epochs=1"]


def _write_run(run_dir: Path, rows: list[tuple[float, float]]) -> None:
    """A fake finished run: one metrics row per (test_acc, train_acc), epochs 1.."""
    run_dir.mkdir(parents=True)
    lines = [json.dumps({"epoch": i + 1, "test_acc": test, "train_acc": train}) for i, (test, train) in enumerate(rows)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- the table

def test_mean_std_from_known_inputs():
    """Pinpoints the statistics: the mean, the *sample* std (ddof=1, not the population std
    1.63), percent scaling of the fractions in metrics.jsonl, or the "–" for fewer than 2 seeds."""
    mean, std = mean_std([90.0, 92.0, 94.0])
    assert mean == pytest.approx(92.0) and std == pytest.approx(2.0)
    results = [RunResult("dkp", s, 1, test_acc=a, train_acc=b)
               for s, (a, b) in enumerate([(0.90, 0.97), (0.92, 0.98), (0.94, 0.99)])]
    results.append(RunResult("bp", 0, 1, test_acc=0.915, train_acc=1.0))
    rows = {row.rule: row for row in summarize(results, ["dkp", "bp", "fa"], "fashion_mnist")}
    dkp, bp, fa = rows["dkp"], rows["bp"], rows["fa"]
    assert (dkp.n, dkp.seeds) == (3, (0, 1, 2))
    assert format_mean_std(dkp.test_mean, dkp.test_std) == "92.00 ± 2.00"
    assert format_mean_std(dkp.train_mean, dkp.train_std) == "98.00 ± 1.00"
    assert format_mean_std(bp.test_mean, bp.test_std) == "91.50 ± –"
    assert fa.n == 0 and format_mean_std(fa.test_mean, fa.test_std) == "–"
    assert [row.rule for row in summarize(results, ["dkp", "bp", "fa"], "x")] == ["bp", "fa", "dkp"]  # paper order


def test_table_files_markdown_and_csv(tmp_path):
    """Pinpoints table.md / table.csv content: the final epoch (not the best or the first) of each
    run, seeds found on disk, the paper's number beside ours (by data.name), the paper's rule
    order, the epochs column, and "–" where the paper has no entry."""
    out = tmp_path / "trials"
    _write_run(out / "dkp" / "seed0", [(0.50, 0.60), (0.90, 0.97)])  # final epoch: 0.90, not 0.50
    _write_run(out / "dkp" / "seed1", [(0.10, 0.20), (0.92, 0.98)])
    _write_run(out / "dkp" / "seed2", [(0.99, 0.99), (0.94, 0.99)])  # final, not best
    _write_run(out / "bp" / "seed7", [(0.30, 0.40), (0.915, 1.0)])
    (out / "bp" / "seed8").mkdir()  # a run that never wrote a row: not counted
    (out / "dkp" / "notes").mkdir()  # not a seed folder
    write_table(out, ["dkp", "bp"], dataset="fashion_mnist", title="t")

    md = (out / "table.md").read_text().splitlines()
    body = [line for line in md if line.startswith("| ") and not line.startswith("| rule")]
    assert body == [
        "| bp | 1 | 91.50 ± – | 92.18 ± 0.13 | 100.00 ± – | 100.00 ± 0.00 | 2 |",
        "| dkp | 3 | 92.00 ± 2.00 | 91.66 ± 0.27 | 98.00 ± 1.00 | 99.89 ± 0.06 | 2 |",
    ]
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [r["rule"] for r in rows] == ["bp", "dkp"]
    dkp = rows[1]
    assert dkp["dataset"] == "fashion_mnist" and dkp["n"] == "3" and dkp["seeds"] == "0 1 2"
    assert float(dkp["test_acc_mean"]) == pytest.approx(92.0) and float(dkp["test_acc_std"]) == pytest.approx(2.0)
    assert float(dkp["train_acc_mean"]) == pytest.approx(98.0) and float(dkp["train_acc_std"]) == pytest.approx(1.0)
    assert (float(dkp["paper_test_acc_mean"]), float(dkp["paper_test_acc_std"])) == (91.66, 0.27)
    assert (float(dkp["paper_train_acc_mean"]), float(dkp["paper_train_acc_std"])) == (99.89, 0.06)
    assert dkp["epochs"] == "2"
    assert rows[0]["test_acc_std"] == ""  # one seed: no spread

    # A dataset the paper does not report: dashes in Markdown, empty cells in CSV.
    rows = summarize([RunResult("dkp", 0, 1, 0.5, 0.5), RunResult("dkp", 1, 3, 0.7, 0.5)], ["dkp"], "synthetic")
    md = markdown_table(rows, dataset="synthetic", title="t")
    assert "| dkp | 2 | 60.00 ± 14.14 | – | 50.00 ± 0.00 | – | 1–3 |" in md
    assert csv_table(rows, dataset="synthetic").splitlines()[1] == (
        "synthetic,dkp,2,0 1,60.0000,14.1421,50.0000,0.0000,,,,,1-3")


# ----------------------------------------------------------------------------- the paper's numbers

def _paper_text() -> str | None:
    for folder in (REPO / "shared" / "paper", REPO.parent / "shared" / "paper"):
        for path in sorted(folder.glob("*.txt")) if folder.is_dir() else []:
            text = path.read_text(errors="replace")
            if "Learning the connections" in text.replace("\n", " ") or "LEARNING THE CONNECTIONS" in text:
                return text
    return None


_PAIR = re.compile(r"(\d+(?:\.\d+)?)\\%\}?\s*\\pm\s*(\d+(?:\.\d+)?)")


def test_paper_numbers_spot_checks():
    """Pinpoints paper_result's lookup: dataset/rule/metric keys, the test/train aliases, and None
    for what the paper does not report (top-5, other datasets)."""
    assert paper_result("cifar10", "dkp", "test_acc") == (64.69, 0.72)
    assert paper_result("fashion_mnist", "bp", "train_acc") == (100.00, 0.00)
    assert paper_result("cifar100", "kp", "test") == (66.78, 0.47)
    assert paper_result("tiny_imagenet", "dfa", "test_acc") == (32.116, 0.66)  # printed with 3 decimals
    assert paper_result("tiny_imagenet", "drtp", "train") == (2.86, 0.26)
    assert paper_result("cifar100", "dkp", "test_top5") is None
    assert paper_result("synthetic", "dkp", "test_acc") is None
    assert paper_result("cifar10", "nope", "test_acc") is None
    assert set(PAPER_RESULTS) == {"fashion_mnist", "cifar10", "cifar100", "tiny_imagenet"}
    assert all(set(rules) == set(RULE_ORDER) for rules in PAPER_RESULTS.values())


def test_paper_numbers_match_the_paper_text():
    """Pinpoints a transcription error in paper.py: every "mean% ± spread" of Tables 1-2 in the
    paper's text, in print order, must equal paper.py's entries in the same order (test then
    train per row; the text's first Fashion-MNIST line holds two rows: both tests, then both trains)."""
    text = _paper_text()
    if text is None:
        pytest.skip("the paper's text (shared/paper/*.txt) is not on this machine")
    start1 = text.index("Dataset\tMethod")
    table1 = text[start1:text.index("Table 1:", start1)]
    start2 = text.index("Dataset\tMethod", text.index("Table 2:"))
    table2 = text[start2:text.index("Table 3", start2)]

    def expected(dataset: str, merged_first_two: bool) -> list[tuple[float, float]]:
        entries = PAPER_RESULTS[dataset]
        pairs = []
        rules = list(RULE_ORDER)
        if merged_first_two:
            a, b = rules[:2]
            pairs += [entries[a]["test_acc"], entries[b]["test_acc"], entries[a]["train_acc"], entries[b]["train_acc"]]
            rules = rules[2:]
        for rule in rules:
            pairs += [entries[rule]["test_acc"], entries[rule]["train_acc"]]
        return pairs

    def found(block: str) -> list[tuple[float, float]]:
        return [(float(m), float(s)) for m, s in _PAIR.findall(block)]

    fmnist, cifar10 = table1.split("\nCIFAR10")
    cifar100, tiny = table2.split("\nTinyImageNet200")
    assert "Fashion-MNIST" in fmnist and "CIFAR100" in cifar100
    assert found(fmnist) == expected("fashion_mnist", merged_first_two=True)
    assert found(cifar10) == expected("cifar10", merged_first_two=False)
    assert found(cifar100) == expected("cifar100", merged_first_two=False)
    assert found(tiny) == expected("tiny_imagenet", merged_first_two=False)
    # and the labels are in the order paper.RULE_ORDER claims
    labels = re.findall(r"(BP \(FC Only\)|BP \(Upperbound\)|KP|FA|DRTP|DFA|DKP)", cifar10)
    assert labels == ["BP (FC Only)", "BP (Upperbound)", "KP", "FA", "DRTP", "DFA", "DKP"]


# ----------------------------------------------------------------------------- the command, for real

def _trials(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "parallel_dkp", "trials", "--config", CONFIG, *TINY, *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and not p.name.startswith("table.")}


def test_trials_end_to_end_then_skips_finished_runs(tmp_path, capsys):
    """Pinpoints the runner: one train subprocess per rule x seed into DIR/<rule>/seed<S> (train.log,
    metrics.jsonl, checkpoint), --jobs 2, one log line per finished run, the table files at the
    end; then a second identical command must re-train nothing (no file of any run touched)."""
    out = tmp_path / "trials"
    first = _trials("--rules", "dkp,bp", "--seeds", "0,1", "--jobs", "2", "--out", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    for rule in ("bp", "dkp"):
        for seed in (0, 1):
            run = out / rule / f"seed{seed}"
            assert len((run / "metrics.jsonl").read_text().splitlines()) == 1, run
            assert "parallel-dkp rule=" + rule in (run / "train.log").read_text()
            assert list((run / "checkpoints").iterdir()), run
            assert re.search(rf"done {rule} seed{seed}: test \d+\.\d\d% train \d+\.\d\d% \(1 epochs, [\d.]+ s\)",
                             first.stderr), first.stderr
    assert "OMP_NUM_THREADS=" in first.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bp", "dkp", "table.csv", "table.md"]
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [(r["rule"], r["n"], r["seeds"], r["epochs"], r["dataset"]) for r in rows] == [
        ("bp", "2", "0 1", "1", "synthetic"), ("dkp", "2", "0 1", "1", "synthetic")]
    assert "| dkp | 2 |" in (out / "table.md").read_text()
    assert "dkp" in first.stdout and "test acc" in first.stdout  # the rich table

    # The same command again (in this process: nothing should start) re-trains nothing.
    before = _mtimes(out)
    assert main(["trials", "--config", CONFIG, *TINY, "--rules", "dkp,bp", "--seeds", "0,1", "--jobs", "2",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("already finished") == 4, err
    assert "0 of 4 run(s) to do" in err and "started" not in err
    assert _mtimes(out) == before  # metrics.jsonl, checkpoints, train.log: nothing re-trained

    # --table-only finds the same runs (every rule folder under DIR); --dry-run lists only a new seed.
    csv_before = (out / "table.csv").read_text()
    (out / "table.csv").unlink()
    assert main(["trials", "--config", CONFIG, *TINY, "--table-only", "--out", str(out)]) == 0
    assert (out / "table.csv").read_text() == csv_before
    capsys.readouterr()
    assert main(["trials", "--config", CONFIG, *TINY, "--rules", "bp", "--seeds", "0,5", "--out", str(out),
                 "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert dry.count("run: ") == 1 and "run.seed=5" in dry and "seed5" in dry, dry
    assert not (out / "bp" / "seed5").exists()
    # Raising run.epochs makes every run half-finished: relaunched (train resumes it), not skipped.
    assert main(["trials", "--config", CONFIG, *TINY, "--set", "run.epochs=2", "--rules", "dkp,bp", "--seeds", "0,1",
                 "--out", str(out), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert dry.count("resume (1/2 epochs done): ") == 4 and "run.epochs=2" in dry, dry
    assert _mtimes(out) == before


def test_trials_failed_run_is_reported_and_others_still_run(tmp_path):
    """Pinpoints failure handling: a run that crashes (here its metrics.jsonl is a folder) is named
    with its train.log path and makes the command exit 1, while the other run still finishes and
    the table is written with it."""
    out = tmp_path / "trials"
    (out / "dkp" / "seed0" / "metrics.jsonl").mkdir(parents=True)
    result = _trials("--rules", "dkp", "--seeds", "0,1", "--jobs", "2", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    text = " ".join(result.stderr.split())
    assert "FAILED dkp seed0" in text and str(out / "dkp" / "seed0" / "train.log") in text
    last_line = (out / "dkp" / "seed0" / "train.log").read_text().strip().splitlines()[-1]
    assert not last_line.startswith("===") and " ".join(last_line.split()) in text  # the error, quoted
    assert "done dkp seed1" in text
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [(r["rule"], r["n"], r["seeds"]) for r in rows] == [("dkp", "1", "1")]


def test_trials_ctrl_c_stops_children(tmp_path):
    """Pinpoints Ctrl-C handling: SIGINT to the trials command must stop its running train
    child (it checkpoints on SIGTERM, so the same command resumes it), exit 130 without hanging,
    and write no table."""
    out = tmp_path / "trials"
    # So many epochs that the run cannot finish before the signal, however fast the machine.
    longer = ["--set", "data.synthetic_size=512", "--set", "run.epochs=100000", "--rules", "dkp", "--seeds", "0",
              "--out", str(out)]
    command = [sys.executable, "-m", "parallel_dkp", "trials", "--config", CONFIG, *TINY, *longer]
    # Ctrl-C's SIGINT as in a terminal: a test run started in the background by a script inherits
    # SIGINT ignored (POSIX), and Python then raises no KeyboardInterrupt.
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = out / "dkp" / "seed0" / "train.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "epoch 1:" not in (log.read_text() if log.is_file() else ""):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # pragma: no cover - the failure this test is for
        process.kill()
        raise
    assert process.returncode == 130, stderr
    assert "stopping 1 run(s)" in stderr
    assert "SIGTERM: stopped at epoch" in log.read_text()
    done = len((out / "dkp" / "seed0" / "metrics.jsonl").read_text().splitlines())
    assert 1 <= done < 100000
    assert not (out / "table.md").exists()


def test_trials_bad_arguments_exit_2(capsys, tmp_path):
    """Pinpoints argument checking before anything runs: an unknown rule, a non-integer seed,
    --jobs 0 and --table-only on a folder without trials all exit 2 with a message."""
    base = ["trials", "--config", CONFIG, *TINY, "--out", str(tmp_path / "none")]
    assert main([*base, "--rules", "dkp,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main([*base, "--seeds", "0,x"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main([*base, "--jobs", "0"]) == 2
    assert main([*base, "--table-only"]) == 2
    assert "does not exist" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "none").exists()
