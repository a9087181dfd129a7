"""Loss and accuracy sums that stay on the device until somebody reads them."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class StepMetrics:
    """Sums over examples: cross-entropy loss, correct predictions, count.

    ``add`` and ``+=`` only queue device work; ``read`` is the one host synchronisation, meant
    for log intervals and epoch ends (a ``.item()`` per micro-batch would drain a GPU's queue).
    ``add`` only keeps the logits: the sums of all the micro-batches of a step are taken at once,
    when first asked for, off the path of the micro-batches (on the last stage, each small op
    there delays every later one). On ranks that do not own the loss the sums stay empty.
    """

    def __init__(self) -> None:
        self._loss_sum: torch.Tensor | None = None
        self._correct: torch.Tensor | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.count = 0

    @classmethod
    def restored(cls, sums: dict, device: torch.device) -> "StepMetrics":
        """Sums saved by ``read`` (e.g. in a checkpoint), back on ``device``; empty if none."""
        metrics = cls()
        if sums.get("count"):
            metrics._loss_sum = torch.tensor(float(sums["loss_sum"]), dtype=torch.float64, device=device)
            metrics._correct = torch.tensor(int(sums["correct"]), dtype=torch.long, device=device)
            metrics.count = int(sums["count"])
        return metrics

    @property
    def loss_sum(self) -> torch.Tensor | None:
        self._settle()
        return self._loss_sum

    @property
    def correct(self) -> torch.Tensor | None:
        self._settle()
        return self._correct

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self._pending.append((logits.detach(), targets))
        self.count += len(targets)

    def _settle(self) -> None:
        if not self._pending:
            return
        logits, targets = (torch.cat(parts) for parts in zip(*self._pending))
        self._pending.clear()
        with torch.no_grad():
            loss = F.cross_entropy(logits.float(), targets, reduction="sum")
            correct = (logits.argmax(1) == targets).sum()
            self._accumulate(loss, correct)

    def __iadd__(self, other: "StepMetrics") -> "StepMetrics":
        if other.loss_sum is not None:
            self._settle()
            self._accumulate(other.loss_sum, other.correct)
            self.count += other.count
        return self

    def _accumulate(self, loss: torch.Tensor, correct: torch.Tensor) -> None:
        if self._loss_sum is None:
            self._loss_sum, self._correct = loss.detach().double(), correct.detach().long()
        else:
            self._loss_sum = self._loss_sum + loss.detach()
            self._correct = self._correct + correct

    def read(self) -> tuple[float, int, int]:
        """``(loss_sum, correct, count)`` as Python numbers. Synchronises with the device."""
        if self.loss_sum is None:
            return 0.0, 0, self.count
        loss_sum, correct = torch.stack([self.loss_sum, self.correct.double()]).tolist()
        return loss_sum, int(correct), self.count

    def read_summed(self, group, device: torch.device) -> tuple[float, int, int]:
        """``read`` of the sums of every rank in ``group`` (the replicas of a stage); a collective,
        and one host synchronisation."""
        if self.loss_sum is None:
            values = torch.zeros(3, dtype=torch.float64, device=device)
        else:
            values = torch.stack([self.loss_sum, self.correct.double(),
                                  torch.tensor(float(self.count), dtype=torch.float64, device=device)])
        dist.all_reduce(values, group=group)
        loss_sum, correct, count = values.tolist()
        return loss_sum, int(correct), int(count)
