"""Optional TensorBoard logging of what ``train`` writes to ``metrics.jsonl`` and ``alignment.jsonl``.

    logger = TensorBoardLogger(out_dir / "tensorboard")   # ValueError without the tensorboard package
    logger.log_epoch(row)            # a metrics.jsonl row: train/loss, train/acc, test/loss, ... at step=epoch
    logger.log_alignment(rows)       # alignment.jsonl rows: alignment/<metric>/block<j> at their global step
    logger.close()

Tags: a field ``train_<x>`` or ``test_<x>`` becomes ``train/<x>`` or ``test/<x>`` (``train/loss``,
``train/acc``, ``train/seconds``, ``train/examples``, ``test/loss``, ...); any other numeric field keeps
its name (``world_size``); ``epoch`` is the step, strings (``rule``, ``model``, ``data``) and booleans
are not scalars. An alignment row's ``value`` goes to ``alignment/<metric>/block<j>`` and its
``norm_ratio``, when not null, to ``alignment_norm_ratio/<metric>/block<j>``.

One logger per run, on the rank that writes ``metrics.jsonl`` (the last rank): TensorBoard reads
every event file under a log dir, so several ranks writing the same tags would interleave.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

INSTALL_MESSAGE = "run.tensorboard = true needs the tensorboard package: pip install 'parallel_dkp[tensorboard]'"
SCALAR_PREFIXES = ("train", "test")


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl field: ``train_loss`` -> ``train/loss``, others unchanged."""
    prefix, _, rest = key.partition("_")
    return f"{prefix}/{rest}" if prefix in SCALAR_PREFIXES and rest else key


def _scalar(value) -> float | None:
    """``value`` as a float when it is a number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class TensorBoardLogger:
    """Scalars of a run in TensorBoard event files under ``log_dir`` (``tensorboard --logdir DIR``)."""

    def __init__(self, log_dir: Path) -> None:
        try:
            importlib.import_module("tensorboard")  # torch's SummaryWriter needs it, and says so less clearly
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError(f"{INSTALL_MESSAGE} ({err})") from err
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    @property
    def writer(self):
        """The underlying ``SummaryWriter``; ValueError once closed."""
        if self._writer is None:
            raise ValueError(f"TensorBoardLogger({self.log_dir}) is closed")
        return self._writer

    def log_epoch(self, row: dict) -> None:
        """Every numeric field of a metrics.jsonl row (but ``epoch``, the step) as a scalar."""
        epoch = int(row["epoch"])
        for key, value in row.items():
            number = _scalar(value)
            if key != "epoch" and number is not None:
                self.writer.add_scalar(scalar_tag(key), number, global_step=epoch)

    def log_alignment(self, rows: list[dict]) -> None:
        """Alignment rows (``step, block, metric, value, norm_ratio``) as ``alignment/<metric>/block<j>``."""
        for row in rows:
            step, block, metric = int(row["step"]), int(row["block"]), row["metric"]
            value = _scalar(row.get("value"))
            if value is not None:
                self.writer.add_scalar(f"alignment/{metric}/block{block}", value, global_step=step)
            ratio = _scalar(row.get("norm_ratio"))
            if ratio is not None and math.isfinite(ratio):
                self.writer.add_scalar(f"alignment_norm_ratio/{metric}/block{block}", ratio, global_step=step)

    def flush(self) -> None:
        """Write pending events to disk (TensorBoard then shows them while the run goes on)."""
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file; further calls do nothing."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
