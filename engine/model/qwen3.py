"""The Qwen3 decoder, composed from engine.model.layers and engine.model.attention.

Parameter names equal Hugging Face's, so checkpoints map one to one.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.model.attention import Attention
from engine.model.qwen3_config import Qwen3Config
from engine.model.kv_cache import KVCache
from engine.model.frozen import Embedding, Linear
from engine.model.layers import MLP, RMSNorm, RotaryEmbedding
from engine.model.memory import compact_frozen_weights, compacted_bytes, lean_cpu_allocator
from triton_kernels.torch_path import serial


@dataclasses.dataclass
class CausalLMOutput:
    logits: torch.Tensor | None                       # [B, T, V]
    hidden_states: tuple[torch.Tensor, ...] | None    # embeddings + one per layer, as HF
    last_hidden_state: torch.Tensor | None = None     # [B, T, H] after the final norm


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, kv_cache: KVCache | None = None) -> torch.Tensor:
        a = self.self_attn(h, cos, sin, mask, kv_cache, norm=self.input_layernorm)
        with serial(h):  # residual adds are small: one thread (`triton_kernels.torch_path.serial`)
            h = h + a
        m = self.mlp(self.post_attention_layernorm(h))
        with serial(h):
            return h + m


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def build_attention_mask(attention_mask: torch.Tensor | None, T: int, past: int) -> torch.Tensor | None:
    """[B, past + T] padding mask (1 = real token) -> [B, 1, T, past + T] bool, or None when plain
    causal attention over the new positions is already exact (no padding, or right padding only)."""
    if attention_mask is None:
        return None if past == 0 or T == 1 else _causal(T, past, None)
    if past == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        # Right padding (or none): padded keys come after every real query, so causal suffices.
        return None
    return _causal(T, past, attention_mask.bool())


def _causal(T: int, past: int, key_valid: torch.Tensor | None) -> torch.Tensor:
    device = key_valid.device if key_valid is not None else None
    q_pos = torch.arange(past, past + T, device=device)[:, None]
    k_pos = torch.arange(past + T, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if key_valid is not None:
        # A padded query would attend to nothing (NaN softmax); let it see itself instead.
        mask = (mask & key_valid[:, None, None, :]) | (k_pos == q_pos)[None, None]
    return mask


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.gradient_checkpointing = False

    def forward_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                       output_hidden_states: bool = False
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """input_ids [B, T]; attention_mask [B, past + T] (1 = real) or None.

        Returns the final-normed hidden [B, T, H] and, if asked, every layer's hidden states
        (embeddings first, then each layer's output; the last one after the final norm, as HF).
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: real tokens start at position 0 whatever their column.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        h = self.model.embed_tokens(input_ids).to(self.dtype)  # a no-op unless the table is compacted
        cos, sin = self.rotary.cos_sin(position_ids, h.dtype)
        mask = build_attention_mask(attention_mask, T, past)
        states = [h] if output_hidden_states else None
        recompute = self.gradient_checkpointing and self.training and kv_cache is None and torch.is_grad_enabled()
        if recompute and h.device.type == "cpu":
            lean_cpu_allocator()
        for layer in self.model.layers:
            if recompute:
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, kv_cache)
            if states is not None:
                states.append(h)
        if kv_cache is not None:
            kv_cache.advance(T)
        h = self.model.norm(h)
        if states is not None:
            states[-1] = h
        return h, (tuple(states) if states is not None else None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                output_hidden_states: bool = False, logits_to_keep: int = 0) -> CausalLMOutput:
        """Logits [B, T, V] (only the last `logits_to_keep` positions when > 0, as in decoding)."""
        h, states = self.forward_hidden(input_ids, attention_mask, position_ids, kv_cache,
                                        output_hidden_states)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        return CausalLMOutput(logits=logits, hidden_states=states, last_hidden_state=h)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations, KV cache). The final norm's weight is never compacted."""
        return self.model.norm.weight.dtype

    def compacted_bytes(self) -> int:
        """Bytes the narrow-stored matrices save against storing them in the compute dtype
        (`engine.model.memory.compacted_bytes`)."""
        return compacted_bytes(self)

    def compact_frozen_weights(self, storage: torch.dtype = torch.bfloat16) -> int:
        """Store every frozen matrix that `storage` holds exactly in `storage`; return the bytes freed
        (`engine.model.memory.compact_frozen_weights`)."""
        return compact_frozen_weights(self, storage)
