"""Function-space comparisons that run the model: linear mode connectivity and per-layer CKA.

One base model is loaded once. A weighted sum of runs' updates, sum_i c_i Delta_i, is set on its LoRA
modules as one combined adapter of rank (number of nonzero c_i) x r: A = [A_i; ...] stacked, B =
[c_i s_i B_i, ...] side by side, scale 1, so that B A = sum_i c_i s_i B_i A_i exactly. Why this and
not merging into the weights: no weight copy per alpha, nothing to restore, no float drift from
repeated add/subtract on bf16 weights, and every point of a curve sees the same frozen W0.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
from torch import nn
from tqdm import tqdm

from engine.errors import EngineError
from engine.model.lora import LoRAConfig, apply_lora, lora_modules
from engine.model.logprobs import token_logprobs
from engine.tasks.registry import TaskItem, build_prompt

from .adapters import AdapterSet
from .cka import MinibatchCKA, gram, pairwise_cka_from_grams

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids [B,T], attention_mask [B,T], score_mask [B,T]


class DeltaSetter:
    """Holds every run's factors on the model's device and sets sum_i c_i Delta_i on the model."""

    def __init__(self, model: nn.Module, aset: AdapterSet) -> None:
        if not lora_modules(model):
            run = aset.runs[0]
            apply_lora(model, LoRAConfig(r=run.r, alpha=run.alpha, target_modules=run.target_modules,
                                         use_rslora=run.use_rslora))
        self.model, self.aset = model, aset
        self.modules = lora_modules(model)
        missing = [m for m in aset.modules if m not in self.modules]
        if missing:
            raise ValueError(f"the model has no LoRA module {missing[0]!r}")
        device = model.device
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        for name in aset.modules:
            A, B = aset.factors(name)                                   # [R, r, in], [R, out, r]
            self.A[name] = A.to(device=device, dtype=torch.float32)
            self.B[name] = (B * aset.scales[:, None, None]).to(device=device, dtype=torch.float32)

    def set(self, coefs: Sequence[float]) -> None:
        """Model weights become W0 + sum_i coefs[i] Delta_i (runs in AdapterSet order)."""
        if len(coefs) != len(self.aset.runs):
            raise ValueError(f"expected {len(self.aset.runs)} coefficients, got {len(coefs)}")
        used = [i for i, c in enumerate(coefs) if c != 0]
        c = torch.tensor([float(coefs[i]) for i in used], dtype=torch.float32)
        for name, m in self.modules.items():
            if not used or name not in self.A:
                m.enabled = False
                continue
            A, B = self.A[name][used], self.B[name][used] * c.to(self.B[name].device)[:, None, None]
            m.lora_A = nn.Parameter(A.reshape(-1, A.shape[-1]), requires_grad=False)       # [n r, in]
            m.lora_B = nn.Parameter(B.permute(1, 0, 2).reshape(B.shape[1], -1), requires_grad=False)
            m.r, m.scale, m.enabled = m.lora_A.shape[0], 1.0, True


def _pad(seqs: list[list[int]], masks: list[list[bool]], pad_id: int, device) -> Batch:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(seqs), T, dtype=torch.long)
    score = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        score[i, :len(s)] = torch.tensor(m)
    return ids.to(device), attn.to(device), score.to(device)


def solution_batches(tokenizer, items: Sequence[TaskItem], *, style: str = "boxed",
                     enable_thinking: bool | None = None, batch_size: int = 8, device=None) -> list[Batch]:
    """Chat-templated prompt followed by the item's gold worked solution and the end-of-turn token, the
    format a model that writes its working first produces; the score mask covers the solution and the
    stop token (right padding). The bare final answer right after the prompt would be off-format for
    such a model (9-10 nats per token on the embedded model against 0.15 in format, protocol section 4),
    so the LMC loss would measure format, not connectivity: items without a solution are refused."""
    missing = [item.id for item in items if not (item.solution or "").strip()]
    if missing:
        raise EngineError(f"the LMC loss scores each item's gold worked solution, and {len(missing)} of "
                          f"{len(items)} items have none (first: {missing[0]!r}); use a task with worked "
                          "solutions (synthetic, gsm8k, math500)", field="task")
    batches = []
    for start in range(0, len(items), batch_size):
        seqs, masks = [], []
        for item in items[start:start + batch_size]:
            prompt = tokenizer.encode(tokenizer.apply_chat_template(build_prompt(item, style), True, enable_thinking))
            target = tokenizer.encode(item.solution) + [tokenizer.im_end_id]
            seqs.append(prompt + target)
            masks.append([False] * len(prompt) + [True] * len(target))
        batches.append(_pad(seqs, masks, tokenizer.pad_id, device))
    return batches


def prompt_batches(tokenizer, items: Sequence[TaskItem], *, style: str = "boxed", enable_thinking: bool | None = None,
                   batch_size: int = 8, device=None) -> list[Batch]:
    """Chat-templated prompts (with the generation prompt); the score mask marks every prompt token."""
    batches = []
    for start in range(0, len(items), batch_size):
        seqs = [tokenizer.encode(tokenizer.apply_chat_template(build_prompt(item, style), True, enable_thinking))
                for item in items[start:start + batch_size]]
        batches.append(_pad(seqs, [[True] * len(s) for s in seqs], tokenizer.pad_id, device))
    return batches


@torch.no_grad()
def scored_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean token cross-entropy over every scored token of every batch (teacher-forced)."""
    total, count = 0.0, 0
    for ids, attn, score in batches:
        lp = token_logprobs(model, ids, attn, score_mask=score)
        mask = score.clone()
        mask[:, 0] = False                     # position 0 has no context (never an answer token)
        total -= float(lp[mask].double().sum())
        count += int(mask.sum())
    return total / count


def lmc_curve(setter: DeltaSetter, a: int, b: int, batches: Sequence[Batch], alphas: Sequence[float],
              progress: bool = False) -> dict:
    """Loss along W(alpha) = W0 + alpha Delta_a + (1 - alpha) Delta_b (alpha = 0 is run b, 1 is run a).

    barrier (the headline) = max_alpha [L(alpha) - ((1 - alpha) L(0) + alpha L(1))], the height above
    the straight line between the endpoints; barrier_midpoint = L(1/2) - (L(0) + L(1)) / 2 and
    barrier_mean_ends = max_alpha L(alpha) - (L(0) + L(1)) / 2, which is just half the endpoint gap
    whenever the curve is monotone (reported beside the headline only). The endpoints are taken from the
    curve, so the grid must hold 0 and 1."""
    alphas = [float(x) for x in alphas]
    if 0.0 not in alphas or 1.0 not in alphas:
        raise ValueError("the alpha grid must include 0 and 1")
    losses = []
    R = len(setter.aset.runs)
    for alpha in tqdm(alphas, desc=f"LMC {setter.aset.names[a]}-{setter.aset.names[b]}", disable=not progress):
        coefs = [0.0] * R
        coefs[a] += alpha
        coefs[b] += 1 - alpha
        setter.set(coefs)
        losses.append(scored_loss(setter.model, batches))
    L0, L1 = losses[alphas.index(0.0)], losses[alphas.index(1.0)]
    line = [lo - ((1 - al) * L0 + al * L1) for al, lo in zip(alphas, losses)]
    mid = losses[alphas.index(0.5)] - (L0 + L1) / 2 if 0.5 in alphas else math.nan
    return {"a": setter.aset.names[a], "b": setter.aset.names[b], "alphas": alphas, "loss": losses,
            "barrier": max(line), "barrier_midpoint": mid, "barrier_mean_ends": max(losses) - (L0 + L1) / 2}


class PathAccuracy:
    """Greedy accuracy of merged models W0 + sum_i c_i Delta_i on fixed items, each coefficient vector
    evaluated once (the reference endpoint is shared by every pair against it)."""

    def __init__(self, setter: DeltaSetter, tokenizer, items: Sequence[TaskItem], *, style: str,
                 enable_thinking: bool | None, max_new_tokens: int, batch_size: int) -> None:
        self.setter, self.tokenizer, self.items = setter, tokenizer, list(items)
        self.options = dict(style=style, enable_thinking=enable_thinking, max_new_tokens=max_new_tokens,
                            batch_size=batch_size)
        self._records: dict[tuple[float, ...], list[dict]] = {}

    def records(self, coefs: Sequence[float]) -> list[dict]:
        """Per-item eval records (engine.generate.rollout.evaluate_items) of the model at `coefs`."""
        key = tuple(float(c) for c in coefs)
        if key not in self._records:
            from engine.generate.rollout import evaluate_items
            self.setter.set(key)
            self._records[key], _ = evaluate_items(self.setter.model, self.tokenizer, self.items, **self.options)
        return self._records[key]

    def along(self, a: int, b: int, alphas: Sequence[float]) -> dict:
        """{alphas, accuracy, correct (counts), n} at W0 + alpha Delta_a + (1 - alpha) Delta_b."""
        R = len(self.setter.aset.runs)
        correct = []
        for alpha in alphas:
            coefs = [0.0] * R
            coefs[a] += alpha
            coefs[b] += 1 - alpha
            correct.append(sum(bool(r["correct"]) for r in self.records(coefs)))
        n = len(self.items)
        return {"alphas": [float(x) for x in alphas], "correct": correct, "n": n, "accuracy": [c / n for c in correct]}


def _layer_states(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor) -> list[torch.Tensor]:
    """Each decoder layer's output [B, T, H] (the embeddings left out; the last after the final norm)."""
    _, states = model.forward_hidden(ids, attn, output_hidden_states=True)
    return list(states[1:])


@torch.no_grad()
def layer_cka(setter: DeltaSetter, batches: Sequence[Batch], mode: str = "mean", progress: bool = False
              ) -> torch.Tensor:
    """Per-layer CKA between every pair of runs' merged models -> [R, R, L] float64.

    mode 'mean': linear CKA on hidden states mean-pooled over each prompt's tokens (all prompts of all
    batches are the n examples). mode 'tokens': unbiased minibatch CKA over tokens, one minibatch per
    batch of prompts (all its real tokens)."""
    if mode not in ("mean", "tokens"):
        raise ValueError(f"CKA mode must be 'mean' or 'tokens', got {mode!r}")
    R = len(setter.aset.runs)
    model = setter.model
    bar = tqdm(total=R * len(batches), desc=f"CKA ({mode})", disable=not progress)
    if mode == "mean":
        grams = []
        for run in range(R):
            setter.set([1.0 if i == run else 0.0 for i in range(R)])
            pooled = []
            for ids, attn, score in batches:
                w = score.to(torch.float64)[..., None]
                pooled.append(torch.stack([(h.to(torch.float64) * w).sum(1) / w.sum(1)
                                           for h in _layer_states(model, ids, attn)]))   # [L, B, H]
                bar.update()
            grams.append(gram(torch.cat(pooled, 1), centre=True).cpu())                  # [L, n, n]
        bar.close()
        return pairwise_cka_from_grams(torch.stack(grams))
    acc = MinibatchCKA()
    for ids, attn, score in batches:
        grams = []
        for run in range(R):
            setter.set([1.0 if i == run else 0.0 for i in range(R)])
            feats = torch.stack([h[score] for h in _layer_states(model, ids, attn)])     # [L, n, H]
            grams.append(gram(feats, centre=False).cpu())
            bar.update()
        acc.update_grams(torch.stack(grams))
    bar.close()
    return acc.compute()


def load_function_model(base: str | os.PathLike, aset: AdapterSet, *, device=None, dtype=None) -> DeltaSetter:
    """The base model with LoRA modules ready for `DeltaSetter.set`."""
    from engine import load_model
    model = load_model(base, device=device, dtype=dtype)
    return DeltaSetter(model, aset)
