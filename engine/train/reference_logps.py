"""Reference log-probs (base model, adapters off, no gradient), computed once per
(model, tokenised rollouts) and cached on disk as safetensors; DPO and the GRPO KL reuse them."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm import tqdm

from engine.distributed import (DistContext, all_reduce_tensor_, broadcast_tensors_, gather_json, is_sharded, on_main,
                                shard_indices)
from engine.fsio import atomic_file
from engine.model.logprobs import token_logprobs
from engine.model.lora import adapters_disabled
from engine.train.batching import collate
from engine.train.rollouts import Example


def cache_key(model, examples: Sequence[Example]) -> str:
    """Hash of what the reference log-probs depend on: the model's identity and the exact token ids."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(getattr(model, "name_or_path", "")).encode())
    h.update(str(model.dtype).encode())
    # A fingerprint of the weights themselves: a few entries of every tensor.
    for name, p in model.named_parameters():
        if "lora_" not in name:
            h.update(name.encode())
            h.update(p.detach().flatten()[:: max(1, p.numel() // 64)][:64].float().cpu().numpy().tobytes())
    for e in examples:
        h.update(len(e.ids).to_bytes(4, "little") + e.prompt_len.to_bytes(4, "little"))
        h.update(torch.tensor(e.ids, dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()[:24]


@torch.no_grad()
def compute_ref_logps(model, examples: Sequence[Example], pad_id: int, micro_batch_size: int = 16,
                      device: torch.device | None = None) -> list[torch.Tensor]:
    """Per example, the completion tokens' log-probs [len(ids) - prompt_len] under the base model."""
    device = device or model.device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    out: list[torch.Tensor | None] = [None] * len(examples)
    was_training = model.training
    model.eval()
    with adapters_disabled(model):
        for s in tqdm(range(0, len(order), micro_batch_size), desc="reference log-probs", unit="batch",
                      leave=False):
            rows = order[s:s + micro_batch_size]
            b = collate(examples, rows, pad_id).to(device)
            lp = token_logprobs(model, b.input_ids, b.attention_mask, score_mask=b.mask).cpu()
            for j, i in enumerate(rows):
                e = examples[i]
                out[i] = lp[j, e.prompt_len:len(e.ids)].clone()
    model.train(was_training)
    return out  # type: ignore[return-value]


def load_or_compute(model, examples: Sequence[Example], pad_id: int, cache_dir: str | os.PathLike,
                    micro_batch_size: int = 16) -> list[torch.Tensor]:
    key = cache_key(model, examples)
    path = Path(cache_dir) / f"ref_logps-{key}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                flat, offsets = f.get_tensor("logps"), f.get_tensor("offsets")
            if len(offsets) == len(examples) + 1:
                return [flat[offsets[i]:offsets[i + 1]] for i in range(len(examples))]
        except SafetensorError:
            pass  # torn cache file: recompute and overwrite
    logps = compute_ref_logps(model, examples, pad_id, micro_batch_size)
    offsets = torch.tensor([0] + [len(x) for x in logps]).cumsum(0)
    with atomic_file(path, "wb") as f:
        f.write(save({"logps": torch.cat(logps), "offsets": offsets}, metadata={"key": key}))
    return logps


def shared_reference_logps(ctx: DistContext, model: torch.nn.Module, examples: Sequence, pad_id: int,
                    cache_dir, micro_batch_size: int) -> list[torch.Tensor]:
    """engine.train.reference_logps's cached reference log-probs, per example [len(ids) - prompt_len], on every
    rank. Replicated model: rank 0 loads or computes (and caches) them, then broadcasts them.
    FSDP: every rank must run the forwards together, so each computes a contiguous share (padded
    with idle forwards to the same count) and a SUM of zero-filled buffers assembles the whole;
    not cached (one forward over the data, less than an epoch of training)."""
    if not ctx.enabled:
        return load_or_compute(model, examples, pad_id, cache_dir, micro_batch_size)
    offsets = [0]
    for e in examples:
        offsets.append(offsets[-1] + len(e.ids) - e.prompt_len)
    flat = torch.zeros(offsets[-1], dtype=torch.float32)
    if is_sharded(model):
        mine = shard_indices(len(examples), ctx.rank, ctx.world_size)
        for i, lp in zip(mine, compute_ref_logps(model, [examples[i] for i in mine], pad_id, micro_batch_size)):
            flat[offsets[i]:offsets[i + 1]] = lp
        passes = -(-len(mine) // micro_batch_size)
        with torch.no_grad():
            for _ in range(max(gather_json(ctx, passes)) - passes):
                model.forward_hidden(torch.tensor([examples[0].ids], device=ctx.device))
        all_reduce_tensor_(ctx, flat)
    else:
        def compute() -> None:
            flat.copy_(torch.cat(load_or_compute(model, examples, pad_id, cache_dir, micro_batch_size)))
        on_main(ctx, compute)
        broadcast_tensors_(ctx, [flat])
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(examples))]
