"""SFT: L = -sum m s / sum m over every rollout, correct or not (the study trains SFT on all rollouts)."""
from __future__ import annotations

import torch

from losses.base import LossInputs, aggregate, all_rows_normalizer, compute_dtype, finish, masked

normalizer = all_rows_normalizer


def loss(inputs: LossInputs, *, aggregation: str = "token_mean") -> tuple[torch.Tensor, dict]:
    """Negative log-likelihood of all completion tokens. Returns (scalar loss, stats)."""
    s = masked(inputs.logps, inputs.mask, compute_dtype(inputs.logps))
    rows = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    total, stats = aggregate(-s, inputs.mask, rows, aggregation, inputs.num_tokens)
    return finish(total, stats)
