"""Tokenised rollouts -> DPO pairs and groups -> per-step plans -> length-bucketed micro-batches ->
padded `Batch`es (with their reference log-probs attached by the trainer's batch building)."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from engine.errors import EngineError
from engine.packing import cheapest_runs
from engine.train.rollouts import Example


def build_pairs(examples: Sequence[Example], seed: int, mode: str = "one") -> list[tuple[int, int]]:
    """DPO pairs (chosen, rejected) within a group: reward 1 vs reward 0.

    mode "one" (default): one pair per group that has both, drawn with `seed`; "all": every pair."""
    if mode not in ("one", "all"):
        raise EngineError(f"dpo pairs must be 'one' or 'all', got {mode!r}", field="dpo_pairs")
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for rows in groups_of(examples):
        pos = [i for i in rows if examples[i].reward == 1.0]
        neg = [i for i in rows if examples[i].reward == 0.0]
        if not pos or not neg:
            continue
        if mode == "all":
            pairs.extend((w, l) for w in pos for l in neg)
        else:
            w = pos[int(torch.randint(len(pos), (1,), generator=gen))]
            l = neg[int(torch.randint(len(neg), (1,), generator=gen))]
            pairs.append((w, l))
    return pairs


def groups_of(examples: Sequence[Example]) -> list[list[int]]:
    """Row indices of each group, groups in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.group, []).append(i)
    return list(groups.values())


def plan_steps(units: Sequence[Sequence[int]], unit_sizes: Sequence[int], batch_size: int, steps: int,
               seed: int, unit_order: Sequence[int] | None = None) -> list[list[int]]:
    """Which units (groups, or DPO pairs) each optimizer step uses.

    Units are visited in a seeded permutation per epoch (the same for every loss, given the same
    groups), and a step takes whole units until it holds `batch_size` examples. Returns, per step,
    the list of unit indices."""
    if not units:
        raise EngineError("nothing to train on (no groups / pairs)")
    # A step never holds a unit twice: past the data's size it would (and a huge batch_size would never
    # fill); such a step is the whole data once (the trainer says so).
    batch_size = min(batch_size, sum(unit_sizes))
    plan, current, filled, epoch = [], [], 0, 0
    while len(plan) < steps:
        perm = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for u in perm.tolist():
            current.append(u)
            filled += unit_sizes[u]
            if filled >= batch_size:
                plan.append(current)
                current, filled = [], 0
                if len(plan) == steps:
                    break
        epoch += 1
    return plan


def split_micro_batches(units: Sequence[Sequence[int]], lengths: Sequence[int], max_rows: int,
                        pass_cost: float) -> list[list[int]]:
    """Length bucketing: sort a step's units (whole groups or pairs, never split) by their longest row,
    then cut them into micro-batches of at most `max_rows` rows (a larger unit gets one of its own) where
    padding costs more than another pass (`cheapest_runs`; `pass_cost` in tokens, `pass_cost_tokens`)."""
    order = sorted(units, key=lambda u: -max(lengths[i] for i in u))
    runs = cheapest_runs([max(lengths[i] for i in u) for u in order], [len(u) for u in order], pass_cost, max_rows)
    return [[i for u in order[lo:hi] for i in u] for lo, hi in runs]


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor       # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    mask: torch.Tensor            # [B, T] bool, completion tokens (position t scores token t)
    rewards: torch.Tensor         # [B]
    group_ids: torch.Tensor       # [B]
    rows: list[int]               # dataset row of each batch row
    behavior_logps: torch.Tensor | None = None  # [B, T]
    ref_logps: torch.Tensor | None = None       # [B, T], cached reference log-probs
    pairs: torch.Tensor | None = None           # [B / 2, 2] DPO (chosen, rejected) batch rows

    def to(self, device: torch.device) -> "Batch":
        moved = {f.name: (getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor)
                          else getattr(self, f.name)) for f in dataclasses.fields(self)}
        return Batch(**moved)


def collate(examples: Sequence[Example], rows: Sequence[int], pad_id: int) -> Batch:
    T = max(len(examples[i].ids) for i in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    has_blp = all(examples[i].behavior_logps is not None for i in rows)
    blp = torch.zeros(B, T, dtype=torch.float32) if has_blp else None
    for b, i in enumerate(rows):
        e = examples[i]
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids)
        attn[b, :n] = 1
        mask[b, e.prompt_len:n] = True
        if blp is not None:
            blp[b, e.prompt_len:n] = torch.tensor(e.behavior_logps)
    return Batch(input_ids=ids, attention_mask=attn, mask=mask,
                 rewards=torch.tensor([examples[i].reward for i in rows], dtype=torch.float32),
                 group_ids=torch.tensor([examples[i].group for i in rows], dtype=torch.long),
                 rows=list(rows), behavior_logps=blp)


def step_batches(examples: Sequence[Example], units: Sequence[Sequence[int]], max_rows: int, pass_cost: float,
                 pad_id: int, ref_logps: Sequence[torch.Tensor] | None = None, paired: bool = False) -> list[Batch]:
    """A step's units -> its micro-batches (`split_micro_batches`), each a padded `Batch` with what the loss
    reads beside the model's log-probs: the rows' reference log-probs ([len(ids) - prompt_len] per example,
    when given) placed on their completion positions, and for DPO (`paired`) the pairs, which are
    consecutive rows since DPO units are [chosen, rejected]."""
    lengths = [len(e.ids) for e in examples]
    batches = []
    for rows in split_micro_batches(units, lengths, max_rows, pass_cost):
        b = collate(examples, rows, pad_id)
        if ref_logps is not None:
            b.ref_logps = torch.zeros(b.mask.shape, dtype=torch.float32)
            for j, i in enumerate(rows):
                e = examples[i]
                b.ref_logps[j, e.prompt_len:len(e.ids)] = ref_logps[i]
        if paired:
            b.pairs = torch.arange(len(rows)).view(-1, 2)
        batches.append(b)
    return batches


def describe(examples: Sequence[Example]) -> dict[str, Any]:
    """Counts worth logging about a tokenised rollout set."""
    groups = groups_of(examples)
    mixed = sum(1 for g in groups if len({examples[i].reward for i in g}) > 1)
    return {"rollouts": len(examples), "groups": len(groups), "groups_mixed_reward": mixed,
            "positives": sum(e.reward == 1.0 for e in examples),
            "completion_tokens": sum(len(e.ids) - e.prompt_len for e in examples),
            "max_len": max(len(e.ids) for e in examples)}
