"""DPO over (chosen, rejected) pairs of rows of this micro-batch, mean over the step's pairs.

h = (S_w - S_w_ref) - (S_l - S_l_ref), S = sum of completion-token log-probs of a row.
- variant "sigmoid" (default, beta 0.1): -log sigmoid(beta h).
  label_smoothing eps > 0 with smoothing "robust" (default; robust DPO, Chowdhury et al. 2024, TRL's
  loss_type="robust"): (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps);
  with smoothing "conservative" (cDPO, TRL's sigmoid label_smoothing):
  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
- variant "ipo": (h_norm - 1 / (2 beta))^2 with h_norm built from length-normalised sums S / |y|.
The normaliser is the number of pairs. No pairs gives loss 0 still attached to the graph (stats pairs=0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.base import (LossInputError, LossInputs, check_choice, check_number, compute_dtype, finish,
                         masked, require, step_normalizer)

VARIANTS = ("sigmoid", "ipo")
SMOOTHINGS = ("robust", "conservative")


def normalizer(mask: torch.Tensor, rewards: torch.Tensor, pairs: torch.Tensor | None = None,
               **_hparams: object) -> float:
    """Number of pairs in the micro-batch."""
    if pairs is None:
        raise LossInputError("loss 'dpo' needs pairs to count its normaliser", field="pairs")
    return float(pairs.shape[0])


def loss(inputs: LossInputs, *, beta: float = 0.1, variant: str = "sigmoid",
         label_smoothing: float = 0.0, smoothing: str = "robust") -> tuple[torch.Tensor, dict]:
    """Preference loss over `inputs.pairs` against `inputs.ref_logps`. Returns (scalar loss, stats)."""
    beta = check_number("beta", beta, low=0.0, low_open=True)
    check_choice("variant", variant, VARIANTS)
    check_choice("smoothing", smoothing, SMOOTHINGS)
    eps = check_number("label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True)
    if variant == "ipo" and eps > 0:
        raise LossInputError("label smoothing applies to variant='sigmoid' only", field="label_smoothing")
    ref_logps = require(inputs, "ref_logps", "dpo")
    pairs = require(inputs, "pairs", "dpo").to(inputs.logps.device)
    chosen, rejected = pairs[:, 0], pairs[:, 1]
    group_ids = inputs.group_ids.to(pairs.device)
    if bool((group_ids[chosen] != group_ids[rejected]).any()):
        raise LossInputError("a pair's chosen and rejected rows must belong to one group", field="pairs")
    dtype = compute_dtype(inputs.logps)
    mask = inputs.mask
    seq = masked(inputs.logps, mask, dtype).sum(dim=1)
    seq_ref = masked(ref_logps, mask, dtype).sum(dim=1)
    if variant == "ipo":
        # Rows without completion tokens have sums 0; dividing by 1 keeps them 0 instead of NaN.
        lengths = mask.sum(dim=1).clamp_min(1).to(dtype)
        seq, seq_ref = seq / lengths, seq_ref / lengths
    logratio = seq - seq_ref
    h = logratio[chosen] - logratio[rejected]
    if variant == "ipo":
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2
    elif smoothing == "robust":
        per_pair = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    else:
        per_pair = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    n_pairs = int(pairs.shape[0])
    step = step_normalizer(inputs.num_tokens, float(n_pairs))
    # Indexing an empty pair list still goes through the graph, so with no pairs the loss is an
    # attached 0 and backward gives an all-zero gradient.
    total = per_pair.sum() / (step if step > 0 else 1.0)
    margin = (beta * h).detach()
    empty = mask.sum(dim=1) == 0
    stats = {
        "pairs": n_pairs,
        "normalizer": float(n_pairs),
        "step_normalizer": step,
        "reward_margin": float(margin.mean()) if n_pairs else 0.0,
        "reward_accuracy": float((margin > 0).to(dtype).mean()) if n_pairs else 0.0,
        "chosen_logratio": float(logratio.detach()[chosen].mean()) if n_pairs else 0.0,
        "rejected_logratio": float(logratio.detach()[rejected].mean()) if n_pairs else 0.0,
        "empty_rows": int(empty.sum()),
        "pairs_with_empty_row": int((empty[chosen] | empty[rejected]).sum()),
    }
    return finish(total, stats)
