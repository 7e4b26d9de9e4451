"""RIFT (reward-informed fine-tuning, arXiv 2601.09253): keep the negatives but bound their term.

Rewards are mapped to r_pos (correct, default 1.0) and r_neg (incorrect, default -0.2).
- variant "bounded" (default): per token -r_pos s on correct rollouts and |r_neg| exp(s) on incorrect
  ones (linear in the probability: bounded, and its gradient cannot blow up as p -> 0).
- variant "literal" (the study's written form): per token (1 - lam r_i) (-s) with r_i the mapped reward
  (r_pos or r_neg) and `lam` required.
Aggregated over all rollouts (token mean by default). stats["literal_variant"] (0 or 1) records which
form a run used.
"""
from __future__ import annotations

import torch

from losses.base import (LossInputError, LossInputs, aggregate, all_rows_normalizer, check_choice,
                         check_number, compute_dtype, correct_rows, finish, masked, require_binary)

VARIANTS = ("bounded", "literal")

normalizer = all_rows_normalizer


def loss(inputs: LossInputs, *, variant: str = "bounded", r_pos: float = 1.0, r_neg: float = -0.2,
         lam: float | None = None, aggregation: str = "token_mean") -> tuple[torch.Tensor, dict]:
    """RIFT over all rollouts. Returns (scalar loss, stats)."""
    check_choice("variant", variant, VARIANTS)
    r_pos = check_number("r_pos", r_pos)
    r_neg = check_number("r_neg", r_neg)
    require_binary(inputs.rewards, "rift")
    s = masked(inputs.logps, inputs.mask, compute_dtype(inputs.logps))
    positive = correct_rows(inputs.rewards).to(s.device)[:, None]
    if variant == "bounded":
        if lam is not None:
            raise LossInputError("lam only applies to variant='literal'", field="lam")
        token_loss = torch.where(positive, -r_pos * s, abs(r_neg) * s.exp())
    else:
        if lam is None:
            raise LossInputError("variant='literal' needs lam (L = sum_i (1 - lam r_i) NLL_i)",
                                 field="lam")
        lam = check_number("lam", lam)
        # Built in s's dtype: a float32 -0.2 would be off by 1e-9 in float64 runs.
        mapped = torch.where(positive, torch.full_like(s, r_pos), torch.full_like(s, r_neg))
        token_loss = -(1.0 - lam * mapped) * s
    rows = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    total, stats = aggregate(token_loss, inputs.mask, rows, aggregation, inputs.num_tokens)
    stats["literal_variant"] = int(variant == "literal")
    stats["positive_rows"] = int(positive.sum())
    stats["negative_rows"] = int(s.shape[0] - positive.sum())
    return finish(total, stats)
