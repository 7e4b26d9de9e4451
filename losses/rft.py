"""RFT (rejection-sampling fine-tuning): SFT restricted to rollouts with reward 1.

The normaliser counts only the tokens (or rows) of correct rollouts. A micro-batch without a correct
rollout gives loss 0 with an all-zero gradient (stats rows_used = 0), never NaN.

De-duplication of correct solutions (protocol option) is a data-pipeline step: the loss receives the
rows that were kept. `dedup_mask` says which rows to keep.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from losses.base import (LossInputError, LossInputs, aggregate, compute_dtype, correct_rows, finish,
                         masked, require_binary, selection_normalizer)


def normalizer(mask: torch.Tensor, rewards: torch.Tensor, pairs: torch.Tensor | None = None,
               *, aggregation: str = "token_mean", **_hparams: object) -> float:
    """Tokens (token_mean) or non-empty rows (sequence_mean) of the correct rollouts."""
    return selection_normalizer(mask, correct_rows(rewards), aggregation)


def rows_that_count(rewards: torch.Tensor) -> torch.Tensor:
    """[N] bool: only correct rollouts enter the loss, the normaliser and the gradient. Rewards must
    be binary here too: the rows left out never reach `loss`'s check."""
    require_binary(rewards, "rft")
    return correct_rows(rewards)


def loss(inputs: LossInputs, *, aggregation: str = "token_mean") -> tuple[torch.Tensor, dict]:
    """Negative log-likelihood of the correct rollouts' tokens. Returns (scalar loss, stats)."""
    require_binary(inputs.rewards, "rft")
    s = masked(inputs.logps, inputs.mask, compute_dtype(inputs.logps))
    rows = correct_rows(inputs.rewards).to(s.device)
    total, stats = aggregate(-s, inputs.mask, rows, aggregation, inputs.num_tokens)
    return finish(total, stats)


def dedup_mask(texts: Sequence[str], group_ids: Sequence[int] | torch.Tensor,
               rewards: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """[N] bool: rows to keep when dropping duplicate correct solutions.

    Two correct rollouts of one group are duplicates when their texts are equal after whitespace
    normalisation (runs of whitespace -> one space, ends stripped); the first one is kept. Incorrect
    rollouts are always kept (RFT ignores them; other losses may not).
    """
    group_list = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    reward_list = rewards.tolist() if isinstance(rewards, torch.Tensor) else list(rewards)
    if not len(texts) == len(group_list) == len(reward_list):
        raise LossInputError(f"texts, group_ids and rewards differ in length "
                             f"({len(texts)}, {len(group_list)}, {len(reward_list)})", field="texts")
    seen: set[tuple[int, str]] = set()
    keep = []
    for text, group, reward in zip(texts, group_list, reward_list):
        if reward != 1:
            keep.append(True)
            continue
        key = (group, " ".join(text.split()))
        keep.append(key not in seen)
        seen.add(key)
    return torch.tensor(keep, dtype=torch.bool)
