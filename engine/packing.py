"""Cutting length-sorted rows into forward passes: the trade between padding and one more pass.

Shared by the trainer's micro-batches (`engine.train.batching`) and the sampler's prefill passes
(`engine.generate.sampler`), so it sits below both.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


# What one more forward (and backward) pass costs, in padded tokens, when a batch is split by length.
# Measured on CPU with the embedded shape (2 threads): a pass costs ~1.3-3 ms beyond ~0.065-0.08 ms per
# token in training, ~1.2 ms beyond ~0.05 ms per token in a prefill. On a GPU a pass's kernel launches
# are worth far more tokens: unmeasured here, a conservative guess that splits only badly padded batches.
PASS_COST_TOKENS = {"cpu": 32}
PASS_COST_TOKENS_OTHER = 2048


def pass_cost_tokens(device: torch.device | str) -> float:
    """`PASS_COST_TOKENS` for the device's type."""
    return PASS_COST_TOKENS.get(torch.device(device).type, PASS_COST_TOKENS_OTHER)


def cheapest_runs(widths: Sequence[int], rows: Sequence[int], pass_cost: float,
                  max_rows: int | None = None) -> list[tuple[int, int]]:
    """Split items sorted widest first into runs [lo, hi), each one pass padded to its first item's width:
    a run costs (its rows) x widths[lo] + pass_cost, and holds at most `max_rows` rows (an item with more
    runs alone). Returns the runs of least total cost, fewest passes among equals (exact, O(n^2))."""
    if any(a < b for a, b in zip(widths, widths[1:])):
        raise ValueError("widths must be sorted widest first")
    n = len(widths)
    # best[j]: (cost, passes) of the cheapest split of the first j items, compared in that order.
    best, cut = [(0.0, 0)] + [(math.inf, 0)] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        count = 0
        for i in range(j - 1, -1, -1):  # the run [i, j)
            count += rows[i]
            if max_rows is not None and count > max_rows and i < j - 1:
                break
            if count * widths[i] + pass_cost > best[j][0]:
                break  # longer runs only pad more (widths grow towards i = 0)
            option = (best[i][0] + count * widths[i] + pass_cost, best[i][1] + 1)
            if option < best[j]:
                best[j], cut[j] = option, i
    runs, j = [], n
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    return runs[::-1]
