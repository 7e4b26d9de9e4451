"""Shared pieces of the offline losses: the input type, validation, masking, groups and aggregation.

Every loss in this package is `loss(inputs, **hparams) -> (loss, stats)` plus a
`normalizer(mask, rewards, pairs=None, **hparams) -> float` giving the count its aggregation divides by
for one micro-batch. The trainer sums the normalisers of an optimizer step's micro-batches and passes the
sum as `LossInputs.num_tokens`; each micro-batch loss is already divided by it, so summing the
micro-batch losses (and their gradients) equals one big batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.errors import EngineError

AGGREGATIONS = ("token_mean", "sequence_mean")


class LossInputError(EngineError, ValueError):
    """A missing or malformed `LossInputs` field or hyperparameter (also a `ValueError`)."""


class UnknownLossError(EngineError, KeyError):
    """A loss name that is not registered (also a `KeyError`)."""


@dataclass
class LossInputs:
    """One micro-batch of rollouts, as the losses see it.

    logps:          [N, T] float, policy log-probs with grad; position t scores completion token t.
    mask:           [N, T] bool, True on completion tokens (non-bool masks are converted with `!= 0`).
    rewards:        [N] float (binary 0/1 in the study).
    group_ids:      [N] long, rollouts of one prompt share an id.
    ref_logps:      [N, T] reference log-probs (DPO, GRPO's KL), no grad needed.
    behavior_logps: [N, T] log-probs of the policy that generated the rollouts (GRPO clipping).
    pairs:          [P, 2] long, (chosen row, rejected row) indices into this micro-batch (DPO).
    num_tokens:     the optimizer step's normaliser (sum of `get_normalizer` over the step's
                    micro-batches: tokens, rows or pairs depending on the loss); None = this batch's own.
    """

    logps: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    ref_logps: torch.Tensor | None = None
    behavior_logps: torch.Tensor | None = None
    pairs: torch.Tensor | None = None
    num_tokens: float | int | torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.logps, torch.Tensor) or self.logps.dim() != 2 \
                or not self.logps.is_floating_point():
            raise LossInputError("expected a floating tensor of shape [N, T]", field="logps")
        n_rows = self.logps.shape[0]
        if not isinstance(self.mask, torch.Tensor) or self.mask.shape != self.logps.shape:
            raise LossInputError(f"expected a tensor of shape {tuple(self.logps.shape)} like logps",
                                 field="mask")
        if self.mask.dtype != torch.bool:
            self.mask = self.mask != 0
        for name in ("rewards", "group_ids"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.shape != (n_rows,):
                raise LossInputError(f"expected a tensor of shape [{n_rows}] (one per row of logps)",
                                     field=name)
        if self.group_ids.is_floating_point() or self.group_ids.dtype == torch.bool:
            raise LossInputError("expected an integer tensor", field="group_ids")
        for name in ("ref_logps", "behavior_logps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, torch.Tensor)
                                      or value.shape != self.logps.shape
                                      or not value.is_floating_point()):
                raise LossInputError(f"expected a floating tensor of shape {tuple(self.logps.shape)}",
                                     field=name)
        if self.pairs is not None:
            _check_pairs(self.pairs, n_rows)


def _check_pairs(pairs: torch.Tensor, n_rows: int) -> None:
    if not isinstance(pairs, torch.Tensor) or pairs.dim() != 2 or pairs.shape[1] != 2 \
            or pairs.is_floating_point() or pairs.dtype == torch.bool:
        raise LossInputError("expected an integer tensor of shape [P, 2] (chosen row, rejected row)",
                             field="pairs")
    if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= n_rows):
        raise LossInputError(f"row indices must lie in [0, {n_rows}) (rows of this micro-batch)",
                             field="pairs")
    if bool((pairs[:, 0] == pairs[:, 1]).any()):
        raise LossInputError("a pair's chosen and rejected rows must differ", field="pairs")


def require(inputs: LossInputs, field: str, loss: str, why: str = "") -> torch.Tensor:
    """The optional field `field` of `inputs`, or a LossInputError naming it."""
    value = getattr(inputs, field)
    if value is None:
        raise LossInputError(f"loss '{loss}' needs LossInputs.{field}{why}", field=field)
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise LossInputError(f"got {value!r}, expected one of {', '.join(choices)}", field=name)


def check_number(name: str, value: object, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float, checked to be finite and inside the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LossInputError(f"expected a finite number, got {value!r}", field=name)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise LossInputError(f"got {value!r}, expected a value in {lo}{low}, {high}{hi}", field=name)
    return float(value)


def compute_dtype(logps: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); bf16/fp16/fp32 accumulate in float32."""
    return torch.float64 if logps.dtype == torch.float64 else torch.float32


def masked(values: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, T] `values` in `dtype` with 0 off the mask.

    Zeroing before any arithmetic (not after) keeps garbage at padding (inf, nan) out of every
    forward value and every backward product, so masked positions get an exact zero gradient.
    """
    return torch.where(mask, values.to(dtype), torch.zeros((), dtype=dtype, device=values.device))


def correct_rows(rewards: torch.Tensor) -> torch.Tensor:
    """[N] bool: the rollouts the protocol calls correct (reward exactly 1)."""
    return rewards == 1


def require_binary(rewards: torch.Tensor, loss: str) -> None:
    if not bool(((rewards == 0) | (rewards == 1)).all()):
        raise LossInputError(f"loss '{loss}' expects binary rewards (0 wrong, 1 correct)",
                             field="rewards")


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """([N] index of each row's group in 0..G-1, G)."""
    uniques, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(uniques.numel())


def group_sum(values: torch.Tensor, inverse: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[G] sum of [N] `values` per group."""
    return torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)


def selection_normalizer(mask: torch.Tensor, rows: torch.Tensor, aggregation: str) -> float:
    """The count a micro-batch contributes: tokens of the selected rows (token_mean) or the number
    of selected rows that have at least one completion token (sequence_mean)."""
    check_choice("aggregation", aggregation, AGGREGATIONS)
    mask = mask if mask.dtype == torch.bool else mask != 0
    used = mask & rows.to(mask.device)[:, None]
    if aggregation == "token_mean":
        return float(used.sum())
    return float(used.any(dim=1).sum())


def all_rows_normalizer(mask: torch.Tensor, rewards: torch.Tensor, pairs: torch.Tensor | None = None,
                        *, aggregation: str = "token_mean", **_hparams: object) -> float:
    """Normaliser of losses that use every rollout (SFT, DFT, RIFT, GRPO)."""
    rows = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    return selection_normalizer(mask, rows, aggregation)


def step_normalizer(num_tokens: float | int | torch.Tensor | None, own: float) -> float:
    """The divisor for this micro-batch: the step's normaliser, defaulting to the batch's own."""
    if num_tokens is None:
        return own
    value = float(num_tokens.item() if isinstance(num_tokens, torch.Tensor) else num_tokens)
    if not math.isfinite(value) or value < 0:
        raise LossInputError(f"expected a finite count >= 0, got {value!r}", field="num_tokens")
    # The step's sum includes this micro-batch, so a smaller value means the trainer passed the wrong
    # thing (e.g. another loss's normaliser) and the gradient would be silently mis-scaled.
    if value < own - 1e-6 * max(own, 1.0):
        raise LossInputError(
            f"{value:g} is smaller than this micro-batch's own normaliser {own:g}; pass the sum of "
            "get_normalizer(name)(...) over the optimizer step's micro-batches", field="num_tokens")
    return value


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, aggregation: str,
              num_tokens: float | int | torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """Scalar loss from per-token losses, divided by the step normaliser.

    token_loss: [N, T] (finite everywhere; masked positions are ignored), mask: [N, T] bool,
    rows: [N] bool, the rows this loss uses. token_mean: sum over used tokens / step token count.
    sequence_mean: sum over used rows of the row's token mean / step row count (rows without
    completion tokens contribute nothing and are not counted).
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    used = mask & rows[:, None]
    token_loss = torch.where(used, token_loss, torch.zeros((), dtype=token_loss.dtype,
                                                           device=token_loss.device))
    lengths = used.sum(dim=1)
    if aggregation == "token_mean":
        total = token_loss.sum()
        own = float(lengths.sum())
    else:
        total = (token_loss.sum(dim=1) / lengths.clamp_min(1).to(token_loss.dtype)).sum()
        own = float((lengths > 0).sum())
    step = step_normalizer(num_tokens, own)
    # An empty step (no used tokens anywhere) has total == 0: dividing by 1 keeps loss 0, grad 0.
    loss = total / (step if step > 0 else 1.0)
    stats = {
        "rows": int(mask.shape[0]),
        "rows_used": int(rows.sum()),
        "tokens_used": int(lengths.sum()),
        "empty_rows": int((mask.sum(dim=1) == 0).sum()),
        "normalizer": own,
        "step_normalizer": step,
    }
    return loss, stats


def finish(loss: torch.Tensor, stats: dict) -> tuple[torch.Tensor, dict]:
    """Attach the loss value to the stats (python float) and return the pair."""
    stats["loss"] = float(loss.detach())
    return loss, stats


# How a step's stats combine over its micro-batches (and ranks): each micro-batch's stats describe only
# its own rows, so counts add up, extremes take the extreme, and means are weighted by the count they
# were taken over. A float stat not listed here is averaged with equal weights.
WEIGHTED_MEANS = {"mean_token_prob": "tokens_used", "clip_fraction": "tokens_used", "ratio_mean": "tokens_used",
                  "kl": "tokens_used", "advantage_mean": "rows", "reward_margin": "pairs",
                  "reward_accuracy": "pairs", "chosen_logratio": "pairs", "rejected_logratio": "pairs"}
SAME_IN_EVERY_PART = {"step_normalizer", "literal_variant"}  # one value per step, not per micro-batch
SUMMED_FLOATS = {"loss", "normalizer"}  # each micro-batch's loss is already divided by the step's count


def merge_stats(parts: list[dict]) -> dict[str, float | int]:
    """One optimizer step's stats from its micro-batches' stats (numbers only; other values are dropped).
    The merged "loss" is the step's loss, since each part's loss was divided by the step normaliser."""
    values: dict[str, list] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values.setdefault(key, []).append(value)
    merged: dict[str, float | int] = {}
    for key, vals in values.items():
        weight_key = WEIGHTED_MEANS.get(key)
        if key in SAME_IN_EVERY_PART:
            merged[key] = max(vals)
        elif key.endswith("_min") or key.endswith("_max"):
            merged[key] = min(vals) if key.endswith("_min") else max(vals)
        elif key in SUMMED_FLOATS or all(isinstance(v, int) for v in vals):
            merged[key] = sum(vals)
        elif weight_key is not None and all(weight_key in p for p in parts if key in p):
            weights = [p[weight_key] for p in parts if key in p]
            total = sum(weights)
            merged[key] = sum(w * v for w, v in zip(weights, vals)) / total if total else 0.0
        else:
            merged[key] = sum(vals) / len(vals)
    return merged
