"""``parallel-dkp report``: figures of saved runs, without retraining.

    parallel-dkp report runs/default                        # one run, figures into runs/default
    parallel-dkp report runs/trials --out figures           # every run below runs/trials, averaged per rule
    parallel-dkp report runs/dfa runs/dkp --label-by dir    # one line per run, named by its folder

A run folder is what ``train`` writes into ``run.out_dir``: ``metrics.jsonl`` (one JSON object per
epoch: ``epoch, rule, model, data, train_loss, train_acc, test_loss, test_acc, ...``) and, when
alignment was measured, ``alignment.jsonl`` (one JSON object per measurement: ``epoch, step`` (global
step), ``rule, block`` (global block index), ``metric, value`` (degrees), ``norm_ratio``). A RUN_DIR
without ``metrics.jsonl`` is searched recursively for run folders (``runs/trials/dkp/seed0``, ...).

Figures (PNG, into ``--out``, default the first RUN_DIR):

* ``curves.png``: training loss, training accuracy and test accuracy per epoch (the paper's Figs. 3-4);
  as there, serial rules (bp, bp_fc_only, fa, kp) are dashed and backward-unlocked ones (dfa, dkp,
  drtp) solid.
* ``alignment_<metric>.png`` for each metric present: the angle over global steps, one panel per block,
  one shared y axis (the paper's Fig. 2 is ``fig2_angle`` of dfa and dkp).

Runs with the same label are averaged, with a shaded band of +- one standard deviation over runs
(the legend gives their number). ``--label-by rule`` (default) labels a run by its rule (and by model
and data when the runs do not all share them), so seeds of one rule are averaged; ``--label-by dir``
gives every run its own line. matplotlib is imported lazily, only here, and drawn through the Agg
canvas directly (no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console
from rich.markup import escape

METRICS_FILE = "metrics.jsonl"
ALIGNMENT_FILE = "alignment.jsonl"
INSTALL_HINT = "pip install 'parallel_dkp[plots]'"

# Presentation only (importing parallel_dkp.rules would import torch): the paper's order, and its
# line styles - dashed for rules whose backward pass is serial, solid for backward-unlocked ones.
# A rule not listed here is drawn solid, after these.
RULE_ORDER = ("bp", "bp_fc_only", "fa", "kp", "dfa", "dkp", "drtp")
SERIAL_RULES = frozenset({"bp", "bp_fc_only", "fa", "kp"})

CURVE_PANELS = (  # (metrics.jsonl key, panel title, scale to plotted unit)
    ("train_loss", "training loss \u2193", 1.0),
    ("train_acc", "training accuracy (%) \u2191", 100.0),
    ("test_acc", "test accuracy (%) \u2191", 100.0),
)
METRIC_TITLES = {  # the measurements of parallel_dkp.analysis.alignment; others get their name as title
    "fig2_angle": "fig2_angle: angle between a_j\u00b7B_j\u1d40 and the logits h_k (the paper's Fig. 2)",
    "grad_angle": "grad_angle: angle between each block's update and the true backprop gradient",
    "feedback_angle": "feedback_angle: angle between a learned feedback matrix B and the forward W it mirrors",
}
ALIGNMENT_KEYS = ("step", "block", "metric", "value")


@dataclass
class Run:
    """One run folder, read."""

    path: Path
    name: str
    """The folder relative to the parent of the RUN_DIR it was found under (``--label-by dir``)."""
    epochs: dict[int, dict] = field(default_factory=dict)
    """metrics.jsonl rows by epoch (a repeated epoch: the last row wins)."""
    alignment: dict[str, dict[int, dict[int, float]]] = field(default_factory=dict)
    """metric -> block -> step -> value in degrees (a repeated measurement: the last row wins)."""
    rule: str = "?"
    model: str = "?"
    data: str = "?"


# ----------------------------------------------------------------------------------------------- reading


def _read_jsonl(path: Path, console: Console | None) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; ValueError naming ``path:line`` for a bad one.

    A last line without its newline that does not parse is a write in progress (a live run) and is
    skipped with a warning.
    """
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                if console is not None:
                    console.print(f"[yellow]warning:[/] {escape(str(path))}:{number}: incomplete last line "
                                  "skipped (is the run still writing?)")
                continue
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); every line must be one JSON object") \
                from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _number(value) -> float:
    """A finite float, or NaN for anything else (missing, null, a string, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


def _integer(row: dict, key: str, where: str) -> int:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{where}: {key!r} must be an integer, got {value!r}")
    return int(value)


def read_run(path: Path, name: str, console: Console | None = None) -> Run:
    """Read one run folder (``metrics.jsonl`` required, ``alignment.jsonl`` optional)."""
    run = Run(path=path, name=name)
    metrics = path / METRICS_FILE
    for number, row in _read_jsonl(metrics, console):
        if "epoch" not in row:
            raise ValueError(f"{metrics}:{number}: no 'epoch' key; is this a parallel-dkp metrics.jsonl?")
        run.epochs[_integer(row, "epoch", f"{metrics}:{number}")] = row
    alignment = path / ALIGNMENT_FILE
    alignment_rows = _read_jsonl(alignment, console) if alignment.is_file() else []
    for number, row in alignment_rows:
        where = f"{alignment}:{number}"
        missing = [key for key in ALIGNMENT_KEYS if key not in row]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(map(repr, missing))}; an alignment row has "
                             f"{', '.join(ALIGNMENT_KEYS)}")
        blocks = run.alignment.setdefault(str(row["metric"]), {})
        blocks.setdefault(_integer(row, "block", where), {})[_integer(row, "step", where)] = _number(row["value"])
    first = run.epochs[min(run.epochs)] if run.epochs else (alignment_rows[0][1] if alignment_rows else {})
    run.rule = str(first.get("rule", "?"))
    run.model = str(first.get("model", "?"))
    run.data = str(first.get("data", "?"))
    return run


def find_runs(paths: list[str | Path], console: Console | None = None) -> list[Run]:
    """Every run folder named by or found below ``paths``, read, in argument then path order.

    FileNotFoundError naming the path for one that does not exist or holds no run; ValueError for
    a malformed file. A run with no rows yet (nothing to draw) is skipped with a warning.
    """
    runs: list[Run] = []
    seen: set[Path] = set()
    for arg in paths:
        root = Path(arg)
        if root.is_file() and root.name == METRICS_FILE:
            root = root.parent
        if not root.is_dir():
            raise FileNotFoundError(f"{arg}: no such folder; give run folders (run.out_dir of a training run, "
                                    f"holding {METRICS_FILE}) or folders of runs")
        if (root / METRICS_FILE).is_file():
            found = [root]
        else:
            found = sorted(metrics.parent for metrics in root.rglob(METRICS_FILE) if metrics.is_file())
        if not found:
            raise FileNotFoundError(f"{arg}: no {METRICS_FILE} in this folder nor in any folder below it; a run "
                                    f"folder is the run.out_dir of a training run, where train writes {METRICS_FILE}")
        base = root.resolve().parent
        for folder in found:
            resolved = folder.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            run = read_run(folder, resolved.relative_to(base).as_posix(), console)
            if not run.epochs and not run.alignment:
                if console is not None:
                    console.print(f"[yellow]warning:[/] {escape(str(folder))}: no epoch finished and no alignment "
                                  "measured yet, skipped")
                continue
            runs.append(run)
    if not runs:
        raise ValueError(f"nothing to draw: every run under {', '.join(map(str, paths))} is still empty")
    return runs


# ---------------------------------------------------------------------------------------------- grouping


@dataclass
class Group:
    """The runs drawn as one line (their mean, and +- std when there are several)."""

    label: str
    rule: str
    runs: list[Run]


def group_runs(runs: list[Run], label_by: str = "rule") -> list[Group]:
    """Runs grouped into lines, in the paper's rule order (``rule``) or argument order (``dir``)."""
    labels: list[str]
    if label_by == "rule":
        combos = {(run.model, run.data) for run in runs if run.epochs}
        labels = [run.rule if len(combos) <= 1 else f"{run.rule} ({run.model}, {run.data})" for run in runs]
    elif label_by == "dir":
        names = [run.name for run in runs]
        labels = [run.name if names.count(run.name) == 1 else str(run.path) for run in runs]
    else:
        raise ValueError(f"--label-by must be 'rule' or 'dir', got {label_by!r}")
    groups: dict[str, Group] = {}
    for label, run in zip(labels, runs):
        groups.setdefault(label, Group(label, run.rule, [])).runs.append(run)
    ordered = list(groups.values())
    if label_by == "rule":
        rank = {rule: i for i, rule in enumerate(RULE_ORDER)}
        ordered.sort(key=lambda g: (rank.get(g.rule, len(rank)), g.label))
    return ordered


def mean_std(series: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[int]]:
    """Per x (union of all series, sorted): mean and sample std of the finite values, and their count
    (std 0 where only one series has a value). x where no series has a finite value is dropped."""
    xs, means, stds, counts = [], [], [], []
    for x in sorted(set().union(*series)) if series else []:
        values = [s[x] for s in series if x in s and math.isfinite(s[x])]
        if not values:
            continue
        xs.append(x)
        means.append(statistics.fmean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        counts.append(len(values))
    return xs, means, stds, counts


# ----------------------------------------------------------------------------------------------- drawing


class PlotsUnavailable(ImportError):
    """matplotlib is not installed (``report`` needs it; training does not)."""


def _matplotlib() -> SimpleNamespace:
    """The few matplotlib pieces used; PlotsUnavailable, with the install command, without it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as err:
        raise PlotsUnavailable(f"report needs matplotlib, which is not importable ({err}): {INSTALL_HINT}") \
            from err

    return SimpleNamespace(Figure=Figure, FigureCanvasAgg=FigureCanvasAgg, MaxNLocator=MaxNLocator)


def _styles(groups: list[Group], label_by: str) -> dict[str, dict]:
    """Colour and line style per label: by rule a fixed colour per rule (the same in every figure of
    every report), by dir one colour per line; dashed for serial rules, as in the paper."""
    palette = [f"C{i}" for i in range(10)]
    styles = {}
    for i, group in enumerate(groups):
        if label_by == "rule" and group.rule in RULE_ORDER:
            colour = palette[RULE_ORDER.index(group.rule)]
        else:
            colour = palette[(len(RULE_ORDER) + i if label_by == "rule" else i) % len(palette)]
        styles[group.label] = {"color": colour, "linestyle": "--" if group.rule in SERIAL_RULES else "-"}
    return styles


def _legend_label(group: Group, runs: int) -> str:
    """The group's label, with the number of runs averaged in this figure when there are several."""
    return f"{group.label} (mean \u00b1 std of {runs} runs)" if runs > 1 else group.label


def _draw(ax, xs, means, stds, counts, style, label) -> None:
    marker = "o" if len(xs) <= 20 else None  # a single epoch or step stays visible
    ax.plot(xs, means, label=label, marker=marker, markersize=3, linewidth=1.5, **style)
    if max(counts, default=1) > 1:
        low = [m - s for m, s in zip(means, stds)]
        high = [m + s for m, s in zip(means, stds)]
        ax.fill_between(xs, low, high, color=style["color"], alpha=0.2, linewidth=0)


def _save(mpl, fig, path: Path) -> Path:
    mpl.FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def _subtitle(groups: list[Group]) -> str:
    combos = sorted({(run.model, run.data) for g in groups for run in g.runs if run.epochs})
    return ", ".join(f"{model} on {data}" for model, data in combos)


def plot_curves(mpl, groups: list[Group], styles: dict[str, dict], path: Path) -> Path | None:
    """``curves.png``: one panel per CURVE_PANELS entry, one line per group; None without epochs."""
    if not any(run.epochs for g in groups for run in g.runs):
        return None
    fig = mpl.Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, len(CURVE_PANELS))
    for ax, (key, title, scale) in zip(axes, CURVE_PANELS):
        for group in groups:
            label = _legend_label(group, sum(1 for run in group.runs if run.epochs))
            series = [{e: _number(row.get(key)) * scale for e, row in run.epochs.items()} for run in group.runs]
            xs, means, stds, counts = mean_std([s for s in series if s])
            if xs:
                _draw(ax, xs, means, stds, counts, styles[group.label], label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(mpl.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize="small")
    subtitle = _subtitle(groups)
    fig.suptitle(f"training curves{': ' + subtitle if subtitle else ''}")
    return _save(mpl, fig, path)


def plot_alignment(mpl, groups: list[Group], styles: dict[str, dict], metric: str, path: Path) -> Path:
    """``alignment_<metric>.png``: one panel per block (shared y axis), one line per group."""
    blocks = sorted({block for g in groups for run in g.runs for block in run.alignment.get(metric, {})})
    ncols = min(len(blocks), 4)
    nrows = math.ceil(len(blocks) / ncols)
    fig = mpl.Figure(figsize=(4.2 * ncols, 3.4 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax, block in zip(axes, blocks):
        for group in groups:
            label = _legend_label(group, sum(1 for run in group.runs if metric in run.alignment))
            series = [run.alignment.get(metric, {}).get(block, {}) for run in group.runs]
            xs, means, stds, counts = mean_std([s for s in series if s])
            if xs:
                _draw(ax, xs, means, stds, counts, styles[group.label], label)
        ax.set_title(f"block {block}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[::ncols]:
        ax.set_ylabel("angle (degrees)")
    for ax in axes[len(blocks):]:
        ax.set_visible(False)
    handles: dict[str, object] = {}  # every group once, even one measured on some blocks only
    for ax in axes[:len(blocks)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    axes[0].legend(list(handles.values()), list(handles), fontsize="small")
    fig.suptitle(METRIC_TITLES.get(metric, f"{metric} per block (degrees)"))
    return _save(mpl, fig, path)


def _file_part(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric) or "metric"


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None, *, label_by: str = "rule",
                 console: Console | None = None) -> list[Path]:
    """Read the runs under ``run_dirs`` and write the figures into ``out_dir`` (default: the first
    of ``run_dirs``); returns the paths written. PlotsUnavailable without matplotlib."""
    runs = find_runs(run_dirs, console)
    groups = group_runs(runs, label_by)
    mpl = _matplotlib()
    out = Path(out_dir) if out_dir is not None else Path(run_dirs[0])
    if out.is_file() and out.name == METRICS_FILE:
        out = out.parent
    out.mkdir(parents=True, exist_ok=True)
    styles = _styles(groups, label_by)
    written = []
    curves = plot_curves(mpl, groups, styles, out / "curves.png")
    if curves is not None:
        written.append(curves)
    metrics = sorted({metric for run in runs for metric in run.alignment})
    for metric in metrics:
        written.append(plot_alignment(mpl, groups, styles, metric, out / f"alignment_{_file_part(metric)}.png"))
    return written


# ---------------------------------------------------------------------------------------------- command


def add_subparser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``parallel-dkp report`` to ``sub``."""
    report = sub.add_parser(
        "report",
        help="PNG figures (training curves, alignment angles) of saved runs, without retraining",
        description="Reads metrics.jsonl (and alignment.jsonl when present) of each run and writes "
                    "curves.png (training loss, training accuracy, test accuracy per epoch; the paper's "
                    "Figs. 3-4) and alignment_<metric>.png (angle per block over steps; the paper's Fig. 2 is "
                    "fig2_angle). A RUN_DIR without metrics.jsonl is searched for runs below it; runs with "
                    f"the same label are averaged with a +- std band. Needs matplotlib: {INSTALL_HINT}.",
    )
    report.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="a run folder (run.out_dir, holding metrics.jsonl) or a folder of runs")
    report.add_argument("--out", "-o", help="folder for the PNGs (default: the first RUN_DIR)")
    report.add_argument("--label-by", choices=("rule", "dir"), default="rule",
                        help="rule: one line per rule, its runs (seeds) averaged (default); "
                             "dir: one line per run folder")
    return report


def run_report(args: argparse.Namespace, console: Console) -> int:
    """Write the figures ``args`` asks for and print their paths; 2 with the message on a bad input
    or without matplotlib."""
    try:
        written = write_report(args.runs, args.out, label_by=args.label_by, console=console)
    except PlotsUnavailable as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}")
        return 2
    except (ValueError, OSError) as err:
        console.print(f"[bold red]report error:[/] {escape(str(err))}")
        return 2
    for path in written:
        print(path)
    return 0
