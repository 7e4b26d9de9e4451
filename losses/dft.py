"""DFT (dynamic fine-tuning, arXiv 2508.05629): L = -sum m sg(exp(s)) s / sum m over all rollouts.

The weight is the model's own token probability with the gradient stopped, so d L / d s = -exp(s) / n:
the gradient is, by design, not the derivative of the loss value. Token level only (a sequence-level
weight underflows on long outputs).
"""
from __future__ import annotations

import torch

from losses.base import LossInputs, aggregate, all_rows_normalizer, compute_dtype, finish, masked

normalizer = all_rows_normalizer


def loss(inputs: LossInputs, *, aggregation: str = "token_mean") -> tuple[torch.Tensor, dict]:
    """Probability-weighted NLL of all completion tokens. Returns (scalar loss, stats)."""
    s = masked(inputs.logps, inputs.mask, compute_dtype(inputs.logps))
    weight = s.detach().exp()
    rows = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    total, stats = aggregate(-weight * s, inputs.mask, rows, aggregation, inputs.num_tokens)
    used = weight[inputs.mask]
    stats["mean_token_prob"] = float(used.mean()) if used.numel() else 0.0
    return finish(total, stats)
