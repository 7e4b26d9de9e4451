"""Qwen3 grouped-query attention: q/k per-head RMSNorm before RoPE, no biases, SDPA."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from triton_kernels.lora_linear import lora_projections
from triton_kernels.qk_norm_rope import qk_norm_rope

from engine.model.qwen3_config import Qwen3Config
from engine.model.kv_cache import KVCache
from engine.model.frozen import Linear
from engine.model.layers import RMSNorm


class Attention(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.eps = config.rms_norm_eps
        # q_proj / o_proj are not square for 0.6B and 4B: heads x head_dim != hidden.
        self.q_proj = Linear(config.hidden_size, config.q_out)
        self.k_proj = Linear(config.hidden_size, config.kv_out)
        self.v_proj = Linear(config.hidden_size, config.kv_out)
        self.o_proj = Linear(config.q_out, config.hidden_size)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def project_qkv(self, x: torch.Tensor, norm: RMSNorm | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> q [B, T, q_out], k, v [B, T, kv_out], after `norm` (the layer's input
        norm) when given. Three active LoRA adapters of one rank and scale run as one fused projection
        (stacked A: one low-rank GEMM each way; on CPU with the norm inside it): `lora_projections`."""
        mods = (self.q_proj, self.k_proj, self.v_proj)
        fusable = all(getattr(m, "enabled", False) and not (m.dropout > 0 and m.training) for m in mods) and \
            len({(m.r, m.scale) for m in mods}) == 1
        if fusable:
            return lora_projections(x, tuple(m.weight for m in mods), tuple(m.lora_A for m in mods),
                                    tuple(m.lora_B for m in mods), mods[0].scale,
                                    norm=(norm.weight, norm.eps) if norm is not None else None)
        if norm is not None:
            x = norm(x)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, kv_cache: KVCache | None = None,
                norm: RMSNorm | None = None) -> torch.Tensor:
        """x [B, T, hidden] (normed by `norm` first when given); cos/sin [B, T, head_dim]; mask
        [B, 1, T, S] bool (True = attend) or None for plain causal attention over the T positions.
        Returns [B, T, hidden]."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, norm)
        q, k = q.view(B, T, self.num_heads, self.head_dim), k.view(B, T, self.num_kv_heads, self.head_dim)
        q, k = qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, self.eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        gqa = self.num_heads != self.num_kv_heads
        if T == 1 and kv_cache is not None and q.device.type == "cpu":
            out = decode_attention(q, k, v, mask)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        # SDPA's output is [B, T, H, D] in memory (and T = 1 in decoding), so this is a view, not a copy.
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))



def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One decoding step's attention on CPU: q [B, H, 1, D], k/v [B, KV, S, D] (the cache prefix; k is
    fastest as the transposed view of a [D, S] store, as KVCache keeps it), mask [B, 1, 1, S] bool
    (True = attend) or None -> [B, H, 1, D]. The G = H / KV query heads of a key head go through it as
    one [G, D] x [D, S] product, so each cached key and value is read once (SDPA's CPU kernel is slower
    at a single query: BENCHMARKS.md). The scale goes on q (B x H x D numbers, not B x H x S) and the
    mask as an additive bias (a broadcast add measured ~4x cheaper than masked_fill_ here)."""
    B, H, _, D = q.shape
    kv = k.shape[1]
    scores = torch.matmul(q.reshape(B, kv, H // kv, D) * D ** -0.5, k.transpose(-1, -2))  # [B, KV, G, S]
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
        scores += bias.masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).view(B, H, 1, D)
