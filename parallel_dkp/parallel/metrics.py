"""Loss and accuracy sums that stay on the device until somebody reads them."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class StepMetrics:
    """Sums over examples: cross-entropy loss, correct predictions, count.

    ``add`` and ``+=`` only queue device work; ``read`` is the one host synchronisation, meant
    for log intervals and epoch ends (a ``.item()`` per micro-batch would drain a GPU's queue).
    On ranks that do not own the loss the sums stay empty.
    """

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | None = None
        self.correct: torch.Tensor | None = None
        self.count = 0

    @classmethod
    def restored(cls, sums: dict, device: torch.device) -> "StepMetrics":
        """Sums saved by ``read`` (e.g. in a checkpoint), back on ``device``; empty if none."""
        metrics = cls()
        if sums.get("count"):
            metrics.loss_sum = torch.tensor(float(sums["loss_sum"]), dtype=torch.float64, device=device)
            metrics.correct = torch.tensor(int(sums["correct"]), dtype=torch.long, device=device)
            metrics.count = int(sums["count"])
        return metrics

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        with torch.no_grad():
            loss = F.cross_entropy(logits.float(), targets, reduction="sum")
            correct = (logits.argmax(1) == targets).sum()
            self._accumulate(loss, correct, len(targets))

    def __iadd__(self, other: "StepMetrics") -> "StepMetrics":
        if other.loss_sum is not None:
            self._accumulate(other.loss_sum, other.correct, other.count)
        return self

    def _accumulate(self, loss: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        if self.loss_sum is None:
            self.loss_sum, self.correct = loss.detach().double(), correct.detach().long()
        else:
            self.loss_sum = self.loss_sum + loss.detach()
            self.correct = self.correct + correct
        self.count += count

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
