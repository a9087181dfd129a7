"""``parallel-dkp trials``: every rule x seed of one experiment as its own run, then one table.

Each (rule, seed) pair is one ``python -m parallel_dkp train`` subprocess, a single-process run
into ``DIR/<rule>/seed<seed>`` (its stderr in ``train.log`` there). ``--jobs N`` runs at most N at
once, each with ``OMP_NUM_THREADS = max(1, cores // N)``. A run whose ``metrics.jsonl`` already
has ``run.epochs`` rows is skipped; a half-finished one is launched again and ``train`` resumes it
from its checkpoint, so an interrupted ``trials`` command is continued by running it again.
A failed run is reported with its log and makes the command exit 1; the others still run.
Ctrl-C (or SIGTERM) stops every running child (they checkpoint and exit) and exits 130.

At the end, and alone with ``--table-only``: per rule, the mean ± sample standard deviation over
the seeds found of the final epoch's test and train accuracy, beside the paper's Tables 1-2
(``parallel_dkp.analysis.paper``, matched by ``data.name``), printed and written to
``DIR/table.md`` and ``DIR/table.csv``.

    parallel-dkp trials --config configs/fashion_mnist_conv2.toml --rules bp,dfa,dkp --seeds 0,1,2 --jobs 2
    parallel-dkp trials --config configs/fashion_mnist_conv2.toml --table-only
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from parallel_dkp.analysis.paper import DATASET_TABLE, RULE_ORDER, paper_result
from parallel_dkp.config import Config, load_config

DASH = "–"
"""Shown where a number does not exist (a spread of fewer than two seeds, a missing paper entry)."""

TERMINATE_GRACE_S = 60.0
"""After Ctrl-C, how long children get to checkpoint and exit on SIGTERM before they are killed."""

_LAUNCHER_ENV = (
    "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
)
"""Removed from each child's environment: every trial is a plain single-process run."""

_SEED_DIR = re.compile(r"^seed(-?\d+)$")


# ----------------------------------------------------------------------------- reading runs

def read_metrics(path: str | Path) -> list[dict]:
    """The rows of one ``metrics.jsonl``, one per epoch (the last row of an epoch wins), by epoch.

    Missing file: ``[]``. A line that is not a JSON object with an ``epoch`` (a write cut short)
    is ignored.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows[row["epoch"]] = row
    return [rows[epoch] for epoch in sorted(rows)]


def seed_dirs(rule_dir: Path) -> dict[int, Path]:
    """``seed<S>`` folders of one rule's directory, by seed."""
    if not rule_dir.is_dir():
        return {}
    found = {}
    for child in rule_dir.iterdir():
        match = _SEED_DIR.match(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class RunResult:
    """The final epoch of one finished (or partly finished) run."""

    rule: str
    seed: int
    epochs: int
    """Epochs with a metrics row (the final one is the highest)."""
    test_acc: float
    """Fraction in [0, 1], as in metrics.jsonl."""
    train_acc: float


def final_result(rule: str, seed: int, run_dir: Path) -> RunResult | None:
    """The last metrics row of ``run_dir``; ``None`` when it has none."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        return None
    last = rows[-1]
    return RunResult(rule, seed, epochs=len(rows), test_acc=float(last["test_acc"]),
                     train_acc=float(last["train_acc"]))


# ----------------------------------------------------------------------------- the table

def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1); ``None`` for the mean of nothing and for the
    spread of fewer than two values."""
    if not values:
        return None, None
    if len(values) < 2:
        return statistics.fmean(values), None
    return statistics.fmean(values), statistics.stdev(values)


def format_mean_std(mean: float | None, std: float | None, digits: int = 2) -> str:
    """``92.00 ± 2.00``; ``92.00 ± –`` without a spread; ``–`` without a mean."""
    if mean is None:
        return DASH
    spread = DASH if std is None else f"{std:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread}"


def _format_paper(value: tuple[float, float] | None) -> str:
    if value is None:
        return DASH
    mean, spread = value
    # As printed: two decimals, except the one entry the paper prints with three (32.116).
    text = f"{mean:.2f}" if round(mean, 2) == mean else repr(mean)
    return f"{text} ± {spread:.2f}"


@dataclass(frozen=True)
class RuleRow:
    """One line of the table: one rule over its seeds, accuracies in percent."""

    rule: str
    seeds: tuple[int, ...]
    test_mean: float | None
    test_std: float | None
    train_mean: float | None
    train_std: float | None
    epochs: tuple[int, ...]
    """Epochs run, per seed (the table shows their range)."""
    paper_test: tuple[float, float] | None = None
    paper_train: tuple[float, float] | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def epochs_text(self) -> str:
        if not self.epochs:
            return DASH
        low, high = min(self.epochs), max(self.epochs)
        return str(low) if low == high else f"{low}–{high}"


def rule_order(rules) -> list[str]:
    """``rules`` in the paper's order (bp_fc_only, bp, kp, fa, drtp, dfa, dkp); others after, as given."""
    rules = list(dict.fromkeys(rules))
    return [r for r in RULE_ORDER if r in rules] + [r for r in rules if r not in RULE_ORDER]


def summarize(results: list[RunResult], rules, dataset: str) -> list[RuleRow]:
    """One :class:`RuleRow` per rule of ``rules`` (paper order), from the runs in ``results``."""
    rows = []
    for rule in rule_order(rules):
        mine = sorted((r for r in results if r.rule == rule), key=lambda r: r.seed)
        test_mean, test_std = mean_std([100.0 * r.test_acc for r in mine])
        train_mean, train_std = mean_std([100.0 * r.train_acc for r in mine])
        rows.append(RuleRow(
            rule=rule, seeds=tuple(r.seed for r in mine), test_mean=test_mean, test_std=test_std,
            train_mean=train_mean, train_std=train_std, epochs=tuple(r.epochs for r in mine),
            paper_test=paper_result(dataset, rule, "test_acc"), paper_train=paper_result(dataset, rule, "train_acc"),
        ))
    return rows


def collect(out_dir: Path, rules) -> list[RunResult]:
    """Every run with at least one metrics row under ``out_dir/<rule>/seed<S>``, for ``rules``."""
    results = []
    for rule in rules:
        for seed, run_dir in seed_dirs(out_dir / rule).items():
            result = final_result(rule, seed, run_dir)
            if result is not None:
                results.append(result)
    return results


def rules_found(out_dir: Path) -> list[str]:
    """Rule folders under ``out_dir`` that hold at least one ``seed<S>`` folder."""
    if not out_dir.is_dir():
        return []
    return [d.name for d in sorted(out_dir.iterdir()) if d.is_dir() and seed_dirs(d)]


HEADERS = ("rule", "n", "test acc (%)", "paper test (%)", "train acc (%)", "paper train (%)", "epochs")


def _cells(row: RuleRow) -> list[str]:
    return [row.rule, str(row.n), format_mean_std(row.test_mean, row.test_std), _format_paper(row.paper_test),
            format_mean_std(row.train_mean, row.train_std), _format_paper(row.paper_train), row.epochs_text]


def _paper_note(dataset: str) -> str:
    table = DATASET_TABLE.get(dataset)
    if table is None:
        return f"The paper reports no {dataset} results ({DASH})."
    network = "2-conv network, 50 epochs" if table == 1 else "AlexNet + BN, 90 epochs"
    return f"Paper: Table {table} ({network}), mean ± spread over 10 trials, as printed."


def table_notes(dataset: str) -> list[str]:
    return [
        "Mean ± sample standard deviation (ddof=1) over the seeds found (n) of the final epoch's accuracy; "
        f"{DASH} when n < 2. train acc is metrics.jsonl's train_acc (the running accuracy over the final "
        "training epoch).",
        _paper_note(dataset),
    ]


def markdown_table(rows: list[RuleRow], *, dataset: str, title: str) -> str:
    """The table as Markdown: a heading, one row per rule, and what the numbers are."""
    lines = [f"# {title}", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    lines += [""] + table_notes(dataset)
    return "\n".join(lines) + "\n"


CSV_FIELDS = (
    "dataset", "rule", "n", "seeds", "test_acc_mean", "test_acc_std", "train_acc_mean", "train_acc_std",
    "paper_test_acc_mean", "paper_test_acc_std", "paper_train_acc_mean", "paper_train_acc_std", "epochs",
)


def csv_table(rows: list[RuleRow], *, dataset: str) -> str:
    """The table as CSV (accuracies in percent, 4 decimals; empty where there is no number)."""

    def number(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    def paper(value: tuple[float, float] | None, index: int) -> str:
        return "" if value is None else repr(value[index])

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for row in rows:
        writer.writerow([
            dataset, row.rule, row.n, " ".join(map(str, row.seeds)),
            number(row.test_mean), number(row.test_std), number(row.train_mean), number(row.train_std),
            paper(row.paper_test, 0), paper(row.paper_test, 1), paper(row.paper_train, 0), paper(row.paper_train, 1),
            row.epochs_text.replace("–", "-") if row.epochs else "",
        ])
    return buffer.getvalue()


def rich_table(rows: list[RuleRow], *, dataset: str, title: str) -> Table:
    table = Table(title=title, caption="\n".join(table_notes(dataset)))
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(escape(c) for c in _cells(row)))
    return table


def write_table(out_dir: Path, rules, *, dataset: str, title: str, console: Console | None = None) -> list[RuleRow]:
    """Summarize the runs under ``out_dir``; print the table; write ``table.md`` and ``table.csv`` there."""
    rows = summarize(collect(out_dir, rules), rules, dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(markdown_table(rows, dataset=dataset, title=title))
    (out_dir / "table.csv").write_text(csv_table(rows, dataset=dataset))
    (console or Console(soft_wrap=True)).print(rich_table(rows, dataset=dataset, title=title))
    return rows


# ----------------------------------------------------------------------------- running trials

@dataclass(frozen=True)
class Trial:
    """One (rule, seed) run of the experiment."""

    rule: str
    seed: int
    run_dir: Path
    epochs: int
    """``run.epochs`` of this rule's config after every override: the rows a finished run has."""
    command: tuple[str, ...] = field(compare=False)

    @property
    def name(self) -> str:
        return f"{self.rule} seed{self.seed}"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "train.log"

    def epochs_done(self) -> int:
        return len(read_metrics(self.run_dir / "metrics.jsonl"))

    def finished(self) -> bool:
        return self.epochs_done() >= self.epochs


def _toml_string(text: str) -> str:
    """``text`` as a TOML string value, so a path is never read as a number or boolean by --set."""
    return json.dumps(text, ensure_ascii=False)


def train_command(config: str, overrides, rule: str, seed: int, run_dir: Path) -> tuple[str, ...]:
    """The ``python -m parallel_dkp train`` command line of one trial."""
    command = [sys.executable, "-m", "parallel_dkp", "train", "--config", config]
    for item in [*overrides, f"rule.name={rule}", f"run.seed={seed}", f"run.out_dir={_toml_string(str(run_dir))}",
                 "run.progress=false"]:
        command += ["--set", item]
    return tuple(command)


def plan_trials(config: str, overrides, rules, seeds, out_dir: Path) -> list[Trial]:
    """Every rule x seed, rules in the given order; ValueError when a rule's config is invalid."""
    trials = []
    for rule in rules:
        run_dir = out_dir / rule / "seed0"
        cfg = load_config(config, [*overrides, f"rule.name={rule}", "run.seed=0",
                                   f"run.out_dir={_toml_string(str(run_dir))}"])
        for seed in seeds:
            run_dir = out_dir / rule / f"seed{seed}"
            trials.append(Trial(rule, seed, run_dir, cfg.run.epochs,
                                command=train_command(config, overrides, rule, seed, run_dir)))
    return trials


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def child_env(jobs: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    env["OMP_NUM_THREADS"] = str(max(1, cores() // max(1, jobs)))
    return env


class _Stop(Exception):
    """Ctrl-C or SIGTERM to the trials command."""


@dataclass
class _Running:
    trial: Trial
    process: subprocess.Popen
    started: float
    log: object


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def run_trials_now(trials: list[Trial], *, jobs: int, console: Console) -> tuple[list[Trial], bool]:
    """Run ``trials`` (none finished) with at most ``jobs`` at once. Returns (failed, interrupted)."""
    env = child_env(jobs)
    queue, running, failed = list(trials), [], []
    total, done = len(trials), 0

    def launch(trial: Trial) -> None:
        trial.run_dir.mkdir(parents=True, exist_ok=True)
        log = trial.log_path.open("a")
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} OMP_NUM_THREADS={env['OMP_NUM_THREADS']} "
                  f"{shlex.join(trial.command)}\n")
        log.flush()
        # A session of its own: a terminal's Ctrl-C reaches this process only, which stops the children.
        process = subprocess.Popen(trial.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
        running.append(_Running(trial, process, time.monotonic(), log))
        state = f"resuming ({trial.epochs_done()}/{trial.epochs} epochs done)" if trial.epochs_done() else "started"
        console.print(f"{escape(trial.name)}: {state} -> {escape(str(trial.log_path))}")

    def finish(item: _Running, code: int) -> None:
        nonlocal done
        item.log.close()
        running.remove(item)
        done += 1
        seconds = time.monotonic() - item.started
        trial = item.trial
        result = final_result(trial.rule, trial.seed, trial.run_dir)
        if code == 0 and trial.finished() and result is not None:
            console.print(f"[{done}/{total}] [green]done[/] {escape(trial.name)}: test {result.test_acc:.2%} "
                          f"train {result.train_acc:.2%} ({result.epochs} epochs, {seconds:.1f} s)")
            return
        failed.append(trial)
        why = f"exit code {code}" if code != 0 else f"exit code 0 but {trial.epochs_done()}/{trial.epochs} epochs"
        console.print(f"[{done}/{total}] [bold red]FAILED[/] {escape(trial.name)} ({why}, {seconds:.1f} s): "
                      f"see {escape(str(trial.log_path))}; last line: {escape(_last_line(trial.log_path))}")

    def on_term(signum, frame):
        raise _Stop

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        while queue or running:
            while queue and len(running) < jobs:
                launch(queue.pop(0))
            time.sleep(0.1)
            for item in list(running):
                code = item.process.poll()
                if code is not None:
                    finish(item, code)
        return failed, False
    except (KeyboardInterrupt, _Stop):
        _stop_children(running, console)
        return failed, True
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _stop_children(running: list[_Running], console: Console) -> None:
    """SIGTERM every child (train checkpoints and exits); SIGKILL what is left after the grace
    period or on a second Ctrl-C."""
    if not running:
        return
    console.print(f"[bold yellow]stopping[/] {len(running)} run(s): "
                  f"{escape(', '.join(item.trial.name for item in running))} (Ctrl-C again to kill them)")
    for item in running:
        if item.process.poll() is None:
            item.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + TERMINATE_GRACE_S
    try:
        while any(item.process.poll() is None for item in running) and time.monotonic() < deadline:
            time.sleep(0.1)
    except (KeyboardInterrupt, _Stop):
        pass
    for item in running:
        if item.process.poll() is None:
            item.process.kill()
        item.process.wait()
        item.log.close()
    console.print("relaunch the same trials command to resume them from their checkpoints")


# ----------------------------------------------------------------------------- the command

def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def parse_seeds(text: str) -> list[int]:
    try:
        return list(dict.fromkeys(int(part) for part in _split(text)))
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give comma-separated integers, e.g. --seeds 0,1,2") from None


def default_out_dir(config: str) -> Path:
    return Path("runs") / "trials" / Path(config).stem


def add_subparser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``parallel-dkp trials`` to ``sub``."""
    trials = sub.add_parser(
        "trials",
        help="run every rule x seed of one experiment (one train process each), then tabulate against the paper",
        description="Runs `python -m parallel_dkp train` once per rule and seed, into DIR/<rule>/seed<S> (its log "
                    "in train.log there), at most --jobs at once; skips runs that already have run.epochs metrics "
                    "rows and resumes half-finished ones. Then writes the mean ± std per rule beside the paper's "
                    "Tables 1-2 to the terminal, DIR/table.md and DIR/table.csv. Relaunch the same command after "
                    "Ctrl-C or a failure to continue.",
    )
    trials.add_argument("--config", "-c", required=True, help="the experiment's TOML file (see configs/)")
    trials.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value in every run (repeatable), as for train")
    trials.add_argument("--rules", default=None,
                        help=f"comma-separated rules (default: all seven, {','.join(RULE_ORDER)}; with "
                             "--table-only: the rules found in DIR)")
    trials.add_argument("--seeds", default="0,1,2", help="comma-separated run.seed values (default 0,1,2)")
    trials.add_argument("--jobs", "-j", type=int, default=1,
                        help="runs at once (default 1); each gets OMP_NUM_THREADS = max(1, cores // jobs)")
    trials.add_argument("--out", help="DIR for the runs and the table (default runs/trials/<config stem>)")
    mode = trials.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print what would run or be skipped; run nothing")
    mode.add_argument("--table-only", action="store_true", help="only tabulate the runs already in DIR")
    return trials


def run_trials(args: argparse.Namespace, cfg: Config, console: Console) -> int:
    """``parallel-dkp trials``: 0 when every run finished, 1 when one failed, 2 on bad arguments,
    130 after Ctrl-C."""
    out_dir = Path(args.out) if args.out else default_out_dir(args.config)
    dataset = cfg.data.name
    title = f"{Path(args.config).name} on {dataset}: {out_dir}"
    stdout = Console(soft_wrap=True)
    try:
        rules = _split(args.rules)
        seeds = parse_seeds(args.seeds)
        if args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs}: at least 1")
        if args.table_only:
            if not out_dir.is_dir():
                raise FileNotFoundError(f"{out_dir} does not exist: no trials to tabulate (run without --table-only, "
                                        "or point --out at the trials' folder)")
            write_table(out_dir, rule_order(rules or rules_found(out_dir)), dataset=dataset, title=title,
                        console=stdout)
            console.print(f"wrote {escape(str(out_dir / 'table.md'))} and {escape(str(out_dir / 'table.csv'))}")
            return 0
        rules = rules or list(RULE_ORDER)
        if not seeds:
            raise ValueError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
        trials = plan_trials(args.config, args.overrides, rules, seeds, out_dir)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}")
        return 2

    todo = [t for t in trials if not t.finished()]
    for trial in trials:
        if trial.finished():
            result = final_result(trial.rule, trial.seed, trial.run_dir)
            console.print(f"{escape(trial.name)}: already finished ({result.epochs} epochs, test "
                          f"{result.test_acc:.2%}), skipped")
    threads = max(1, cores() // args.jobs)
    console.print(f"{len(todo)} of {len(trials)} run(s) to do, {args.jobs} at once, OMP_NUM_THREADS={threads}, "
                  f"in {escape(str(out_dir))}")
    if args.dry_run:
        for trial in todo:
            done = trial.epochs_done()
            state = f"resume ({done}/{trial.epochs} epochs done)" if done else "run"
            print(f"{state}: {shlex.join(trial.command)} >>{shlex.quote(str(trial.log_path))} 2>&1")
        return 0

    failed, interrupted = run_trials_now(todo, jobs=args.jobs, console=console)
    if interrupted:
        return 130
    write_table(out_dir, rule_order(rules), dataset=dataset, title=title, console=stdout)
    console.print(f"wrote {escape(str(out_dir / 'table.md'))} and {escape(str(out_dir / 'table.csv'))}")
    if failed:
        console.print(f"[bold red]{len(failed)} run(s) failed:[/] " + "; ".join(
            f"{escape(t.name)} ({escape(str(t.log_path))})" for t in failed))
        return 1
    return 0

