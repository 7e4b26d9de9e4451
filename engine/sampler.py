"""Batched generation on a preallocated KV cache: greedy, temperature, top-k, top-p; seeded.

How a batch runs: prompts are left-padded to the longest one, prefilled in one forward pass (only the
last position goes through the lm_head), then decoded one token per step. Positions are tracked per row
(left padding never shifts them) and passed to the model, so the mask is only needed for the padded
keys (and not at all when a batch has no padding). A row stops on a stop id; finished rows are dropped
from the batch and the cache (`KVCache.select_rows`) so they cost nothing afterwards.

Sampling. The filtered distribution is `softmax(logits / temperature)` restricted to the top-k tokens
(k > 0), then to the nucleus (the smallest set of most likely tokens whose mass reaches top_p; the same
set as transformers' TopKLogitsWarper/TopPLogitsWarper, applied in that order) and renormalised. A token is
drawn by inverse CDF in vocabulary order: the smallest id whose cumulative filtered probability exceeds
u * (total), u ~ U[0, 1). Every sequence owns a stream of uniforms from its own `torch.Generator` seed,
so a sequence's sample does not depend on the batch it ran in, the batch size, or its neighbours;
resuming an interrupted run reproduces the same samples. temperature == 0 is greedy (argmax).

`behavior_logps`: for every generated token y_t (the stop token included), log_softmax(z_t)[y_t] where z_t
are the model's RAW logits at that step, i.e. the log-probability under the model at temperature 1, not
under the temperature/top-k/top-p distribution actually sampled from. This is what a trainer's policy
log-probs compute, so the importance ratio exp(logp - behavior_logp) of offline GRPO is exactly 1 for
the unchanged policy. Computed in float32 from the (possibly bf16) logits.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Sequence

import torch

from .errors import EngineError
from .kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 1024
    temperature: float = 1.0     # 0 = greedy
    top_p: float = 1.0           # 1 = off
    top_k: int = 0               # 0 = off

    def __post_init__(self) -> None:
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0):
            raise EngineError(f"expected a positive integer, got {self.max_new_tokens!r}", field="max_new_tokens")
        if not self.temperature >= 0:
            raise EngineError(f"expected a temperature >= 0, got {self.temperature!r}", field="temperature")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"expected 0 < top_p <= 1, got {self.top_p!r}", field="top_p")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise EngineError(f"expected an integer top_k >= 0, got {self.top_k!r}", field="top_k")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass
class Generation:
    token_ids: list[int]          # generated tokens; ends with the stop token when `finished`
    behavior_logps: list[float]   # one per token: log_softmax(raw logits at temperature 1)[token]
    finished: bool                # True: ended on a stop id; False: hit max_new_tokens / the context


def sequence_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (run seed, item id, sample index); not Python's salted hash."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_batch_size(batch_size: int) -> None:
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise EngineError(f"expected a positive batch size, got {batch_size!r}", field="batch_size")


def check_context(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                  labels: Sequence[object] | None = None) -> None:
    """Raise EngineError for an empty prompt or one that leaves no room for a token in the context."""
    ctx = model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        name = labels[i] if labels is not None else i
        if len(p) == 0:
            raise EngineError(f"prompt {name!r} is empty", field="prompt")
        if len(p) >= ctx:
            raise EngineError(f"prompt {name!r} has {len(p)} tokens; the model's context "
                              f"(max_position_embeddings) is {ctx}", field="prompt")


def filtered_probs(logits: torch.Tensor, params: SamplingParams
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampling distribution over candidate tokens, in increasing token-id order.

    logits [B, V] float32 -> (probs [B, C] unnormalised (rows sum to the kept mass), ids [B, C] or None
    meaning C = V and ids = arange(V)). Tokens outside the top-k / nucleus have probability 0.
    """
    scores = logits / params.temperature if params.temperature != 1 else logits
    ids = None
    if 0 < params.top_k < scores.shape[-1]:
        vals, ids = scores.topk(params.top_k, dim=-1)          # descending
        if params.top_p < 1:
            vals = _nucleus(vals, params.top_p)
        ids, order = ids.sort(dim=-1)                          # back to vocabulary order
        scores = vals.gather(-1, order)
    elif params.top_p < 1:
        desc = scores.sort(dim=-1, descending=True).values
        kept = _nucleus(desc, params.top_p)
        n_keep = kept.isfinite().sum(-1, keepdim=True)
        threshold = desc.gather(-1, n_keep - 1)
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    return torch.softmax(scores, dim=-1), ids


def _nucleus(desc: torch.Tensor, top_p: float) -> torch.Tensor:
    """desc [B, C] sorted descending -> the same with tokens outside the nucleus set to -inf: a token is
    kept when the mass strictly before it is < top_p (the first token always)."""
    probs = torch.softmax(desc, dim=-1)
    before = probs.cumsum(-1) - probs
    drop = before >= top_p
    drop[:, 0] = False
    return desc.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (raw), uniforms [B] in [0, 1) (ignored when greedy) -> tokens [B] long,
    behavior log-probs [B] float32 (log_softmax of the raw logits at the chosen tokens)."""
    logits = logits.float()
    if params.greedy:
        tokens = logits.argmax(-1)
    else:
        probs, ids = filtered_probs(logits, params)
        cdf = probs.cumsum(-1)
        target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
        pick = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
        chosen_p = probs.gather(-1, pick)
        if bool((chosen_p <= 0).any()):  # u * total rounded up to total: take the most likely instead
            pick = torch.where(chosen_p > 0, pick, probs.argmax(-1, keepdim=True))
        tokens = (ids.gather(-1, pick) if ids is not None else pick).squeeze(-1)
    logps = logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return tokens, logps


@torch.inference_mode()
def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
             stop_ids: Sequence[int], pad_id: int, seed: int = 0, seeds: Sequence[int] | None = None,
             batch_size: int = 32, on_step: Callable[[int], None] | None = None) -> list[Generation]:
    """Generate a completion for every prompt (token ids, no padding); results in input order.

    Prompts run in batches of `batch_size`, longest first (batches of similar length: little padding).
    `seeds[i]` seeds prompt i's uniforms (default `sequence_seed(seed, i)`); greedy ignores them.
    `on_step(n)` is called after every decode step with the number of tokens it produced.
    Generation stops at max_new_tokens or when the context (max_position_embeddings) is full.
    """
    check_batch_size(batch_size)
    check_context(model, prompts)
    if seeds is None:
        seeds = [sequence_seed(seed, i) for i in range(len(prompts))]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outs = _generate_batch(model, [prompts[i] for i in chunk], params, stop_ids, pad_id,
                               [seeds[i] for i in chunk], on_step)
        for i, out in zip(chunk, outs):
            results[i] = out
    return results  # type: ignore[return-value]


def _uniforms(seeds: Sequence[int], steps: int, device: torch.device) -> torch.Tensor:
    """[B, steps] float32: row i is the first `steps` draws of torch.Generator(seed_i)."""
    rows = [torch.rand(steps, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(rows).to(device)


def _generate_batch(model: torch.nn.Module, prompts: list[Sequence[int]], params: SamplingParams,
                    stop_ids: Sequence[int], pad_id: int, seeds: Sequence[int],
                    on_step: Callable[[int], None] | None) -> list[Generation]:
    device = model.device
    B, P = len(prompts), max(len(p) for p in prompts)
    max_new = min(params.max_new_tokens, model.config.max_position_embeddings - P)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.ones(B, P + max_new, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, :P - len(p)] = 0
    ids, mask = ids.to(device), mask.to(device)
    padded = bool((lengths < P).any())

    cache = KVCache(model.config, B, P + max_new, model.dtype, device)
    logits = model(ids, attention_mask=mask[:, :P] if padded else None, kv_cache=cache,
                   logits_to_keep=1).logits[:, -1]
    uniforms = None if params.greedy else _uniforms(seeds, max_new, device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    out_tokens = torch.full((B, max_new), pad_id, dtype=torch.long, device=device)
    out_logps = torch.zeros(B, max_new, dtype=torch.float32, device=device)
    n_tokens = [max_new] * B
    finished = [False] * B
    active = torch.arange(B, device=device)   # original row of each batch row
    positions = lengths.clone()               # position id of the next token, per batch row

    for step in range(max_new):
        tokens, logps = next_tokens(logits, params, uniforms[:, step] if uniforms is not None else None)
        out_tokens[active, step] = tokens
        out_logps[active, step] = logps
        if on_step is not None:
            on_step(len(tokens))
        done = torch.isin(tokens, stop)
        if bool(done.any()):
            for row in active[done].tolist():
                n_tokens[row], finished[row] = step + 1, True
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            # Drop finished rows everywhere so later steps cost nothing for them.
            active, tokens, positions, mask = active[keep], tokens[keep], positions[keep], mask[keep]
            uniforms = uniforms[keep] if uniforms is not None else None
            cache.select_rows(keep)
            padded = bool((mask[:, :P] == 0).any())
        if step == max_new - 1:
            break
        logits = model(tokens[:, None], attention_mask=mask[:, :P + step + 1] if padded else None,
                       position_ids=positions[:, None], kv_cache=cache, logits_to_keep=1).logits[:, -1]
        positions += 1

    tokens_list, logps_list = out_tokens.tolist(), out_logps.tolist()
    return [Generation(tokens_list[i][:n_tokens[i]], logps_list[i][:n_tokens[i]], finished[i])
            for i in range(B)]
