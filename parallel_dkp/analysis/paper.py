"""The paper's reported accuracies, as data: Tables 1 and 2 of "Learning the connections in direct
feedback alignment" (ICLR submission under double-blind review; text in ``shared/paper/``).

* **Table 1** ("2-Conv. Layer network results on CIFAR10 and Fashion-MNIST with cross entropy
  loss"): the 2-conv network of Table 3, 50 epochs.
* **Table 2** ("AlexNet results on CIFAR100 and TinyImageNet200 with cross entropy loss"):
  AlexNet with batch normalization, 90 epochs.

Both tables sit in section 3.2 ("Training convolutional networks"), on page 8 of the submission.
The text copy has no page markers; the page is inferred from the reference list's back-links
(the DRTP citation that opens 3.2 is on p. 7, the Launay et al. citation of the conclusion, right
after the tables, on p. 9) and from the tables splitting the sentence that ends p. 7.

Every entry is the mean ± spread over 10 trials in percent, copied as printed: "Inference
Accuracy" (``test_acc``) and "Train Accuracy" (``train_acc``). The paper reports top-1 accuracy
only (no top-5 for any dataset), and does not say whether "±" is a standard deviation or
another spread. TinyImageNet200 DFA's test accuracy is printed with three decimals (32.116 %)
and is kept so.
"""

from __future__ import annotations

PAPER_TITLE = "Learning the connections in direct feedback alignment"

RULE_ORDER = ("bp_fc_only", "bp", "kp", "fa", "drtp", "dfa", "dkp")
"""The rows' order in Tables 1 and 2: BP (FC Only), BP (Upperbound), KP, FA, DRTP, DFA, DKP (Ours)."""

PAPER_ROW_NAMES = {
    "bp_fc_only": "BP (FC Only)", "bp": "BP (Upperbound)", "kp": "KP", "fa": "FA",
    "drtp": "DRTP", "dfa": "DFA", "dkp": "DKP (Ours)",
}
"""The row label each rule has in the paper's tables."""

DATASET_TABLE = {"fashion_mnist": 1, "cifar10": 1, "cifar100": 2, "tiny_imagenet": 2}
"""Which table reports each dataset (keys are ``data.name`` values)."""

METRICS = ("test_acc", "train_acc")
"""``test_acc``: the paper's "Inference Accuracy"; ``train_acc``: its "Train Accuracy" (top-1)."""

# dataset -> rule -> metric -> (mean %, spread %), as printed in the paper.
PAPER_RESULTS: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    # Table 1, Fashion-MNIST (2-conv network, 50 epochs)
    "fashion_mnist": {
        "bp_fc_only": {"test_acc": (91.33, 0.18), "train_acc": (99.97, 0.02)},
        "bp": {"test_acc": (92.18, 0.13), "train_acc": (100.00, 0.00)},
        "kp": {"test_acc": (91.25, 0.18), "train_acc": (99.47, 0.14)},
        "fa": {"test_acc": (91.12, 0.39), "train_acc": (99.41, 0.26)},
        "drtp": {"test_acc": (89.58, 0.05), "train_acc": (94.86, 0.02)},
        "dfa": {"test_acc": (91.54, 0.14), "train_acc": (99.88, 0.05)},
        "dkp": {"test_acc": (91.66, 0.27), "train_acc": (99.89, 0.06)},
    },
    # Table 1, CIFAR10 (2-conv network, 50 epochs)
    "cifar10": {
        "bp_fc_only": {"test_acc": (60.01, 1.32), "train_acc": (99.34, 0.63)},
        "bp": {"test_acc": (70.70, 0.96), "train_acc": (99.82, 0.49)},
        "kp": {"test_acc": (70.08, 0.37), "train_acc": (99.98, 0.01)},
        "fa": {"test_acc": (60.45, 1.13), "train_acc": (95.36, 1.46)},
        "drtp": {"test_acc": (55.32, 6.14), "train_acc": (72.90, 0.08)},
        "dfa": {"test_acc": (62.70, 0.36), "train_acc": (97.72, 1.24)},
        "dkp": {"test_acc": (64.69, 0.72), "train_acc": (99.09, 0.29)},
    },
    # Table 2, CIFAR100 (AlexNet + BN, 90 epochs)
    "cifar100": {
        "bp_fc_only": {"test_acc": (47.72, 0.73), "train_acc": (39.03, 0.32)},
        "bp": {"test_acc": (65.88, 1.02), "train_acc": (64.09, 0.39)},
        "kp": {"test_acc": (66.78, 0.47), "train_acc": (67.70, 1.88)},
        "fa": {"test_acc": (19.49, 0.97), "train_acc": (12.90, 0.80)},
        "drtp": {"test_acc": (5.84, 0.65), "train_acc": (5.49, 0.19)},
        "dfa": {"test_acc": (48.03, 0.61), "train_acc": (35.18, 0.43)},
        "dkp": {"test_acc": (52.62, 0.48), "train_acc": (45.17, 0.43)},
    },
    # Table 2, TinyImageNet200 (AlexNet + BN, 90 epochs)
    "tiny_imagenet": {
        "bp_fc_only": {"test_acc": (29.78, 0.45), "train_acc": (24.89, 0.24)},
        "bp": {"test_acc": (49.53, 0.61), "train_acc": (49.25, 0.31)},
        "kp": {"test_acc": (51.36, 1.50), "train_acc": (60.44, 1.94)},
        "fa": {"test_acc": (9.98, 1.44), "train_acc": (7.12, 0.83)},
        "drtp": {"test_acc": (2.86, 0.59), "train_acc": (2.86, 0.26)},
        "dfa": {"test_acc": (32.116, 0.66), "train_acc": (24.75, 0.36)},
        "dkp": {"test_acc": (35.78, 1.92), "train_acc": (35.97, 0.37)},
    },
}

_METRIC_ALIASES = {
    "test_acc": "test_acc", "test": "test_acc", "inference": "test_acc", "top1": "test_acc",
    "test_top1": "test_acc", "test_acc_top1": "test_acc",
    "train_acc": "train_acc", "train": "train_acc", "train_top1": "train_acc", "train_acc_top1": "train_acc",
}


def paper_result(dataset: str, rule: str, metric: str = "test_acc") -> tuple[float, float] | None:
    """The paper's ``(mean, spread)`` in percent for ``dataset`` (a ``data.name``), ``rule`` (a
    ``rule.name``) and ``metric`` (``test_acc`` or ``train_acc``; ``test``/``train``/``top1``
    forms are accepted), or ``None`` when the paper reports none (other datasets, rules or
    metrics, e.g. any top-5 accuracy)."""
    key = _METRIC_ALIASES.get(metric.lower())
    if key is None:
        return None
    return PAPER_RESULTS.get(dataset, {}).get(rule, {}).get(key)
