"""Learning rules: bp, bp_fc_only, fa, kp, dfa, dkp, drtp (see DESIGN.md §1)."""

from __future__ import annotations

import torch

from parallel_dkp.config import RuleConfig
from parallel_dkp.rules.base import DirectBlock, Feedback, LearningRule
from parallel_dkp.rules.bp import BP, BPFCOnly
from parallel_dkp.rules.direct import DFA, DKP, DRTP, DirectRule
from parallel_dkp.rules.fa import FA, KP

RULES: dict[str, type[LearningRule]] = {r.name: r for r in (BP, BPFCOnly, FA, KP, DFA, DKP, DRTP)}


def build_rule(cfg: RuleConfig) -> LearningRule:
    if cfg.name not in RULES:
        raise ValueError(f"rule.name = {cfg.name!r} is not one of {', '.join(RULES)}")
    return RULES[cfg.name](feedback_init=cfg.feedback_init)


def output_error(logits_BK: torch.Tensor, targets_B: torch.Tensor, total: int) -> torch.Tensor:
    """``dℓ/dh`` of the summed cross-entropy over ``total`` examples: ``(softmax(h) - onehot(y)) / total``.

    The softmax runs in the logits' dtype, at least float32 (half-precision logits are promoted).
    In place after the softmax (three small ops where indexing took six: on the last stage this
    runs once per micro-batch, between its forward and the error's broadcast).
    """
    with torch.no_grad():
        error = torch.softmax(logits_BK.to(torch.promote_types(logits_BK.dtype, torch.float32)), dim=1)
        error.scatter_add_(1, targets_B.unsqueeze(1), error.new_full((len(targets_B), 1), -1.0))
        return error.div_(total).to(logits_BK.dtype)


def target_signal(targets_B: torch.Tensor, num_classes: int, total: int, dtype=torch.float32) -> torch.Tensor:
    """DRTP's signal: ``onehot(y) / total``, on the scale of the output error ``e`` (see
    ``rules/direct.py`` for why the 1/N stays). ``scatter_``: no host check of the labels' range."""
    signal = torch.zeros(len(targets_B), num_classes, dtype=dtype, device=targets_B.device)
    return signal.scatter_(1, targets_B.unsqueeze(1), 1.0 / total)


__all__ = [
    "RULES", "DirectBlock", "Feedback", "LearningRule", "DirectRule",
    "BP", "BPFCOnly", "FA", "KP", "DFA", "DKP", "DRTP", "build_rule", "output_error", "target_signal",
]
