"""A preallocated key/value cache for prefill + one-token decode steps."""
from __future__ import annotations

import torch

from engine.model.qwen3_config import Qwen3Config


class KVCache:
    """Keys and values of every layer, preallocated: values as [layers, B, kv_heads, max_len, head_dim];
    keys the same on GPU, and on CPU stored transposed, [layers, B, kv_heads, head_dim, max_len], so that
    a decode step's q x K^T reads each head's keys as one row-major [head_dim, S] block (measured ~1/3
    less time for that product than the transposed view of [S, head_dim]: BENCHMARKS.md). `update`
    returns [B, kv_heads, S, head_dim] views either way.

    `length` is how many positions are filled (the same for every row: left padding keeps rows
    aligned, and the attention mask says which positions are real).
    """

    def __init__(self, config: Qwen3Config, batch_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str, keys_transposed: bool | None = None) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys_transposed = torch.device(device).type == "cpu" if keys_transposed is None else keys_transposed
        k_shape = (*shape[:3], shape[4], shape[3]) if self.keys_transposed else shape
        self.k = torch.zeros(k_shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, kv_heads, T, D] at positions [length, length + T); return the filled prefix."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        keys = self.k[layer].transpose(-1, -2) if self.keys_transposed else self.k[layer]
        keys[:, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return keys[:, :, :end], self.v[layer, :, :, :end]

    def window(self, rows: slice, start: int) -> "KVCache":
        """An empty cache over rows `rows` whose position 0 is this cache's position `start`, sharing this
        cache's storage: a forward pass on it fills those rows from `start` on (a group of shorter
        prompts prefilled on its own, right-aligned with the longest)."""
        view = object.__new__(KVCache)
        view.keys_transposed, view.max_len, view.length = self.keys_transposed, self.max_len - start, 0
        view.k = self.k[:, rows, :, :, start:] if self.keys_transposed else self.k[:, rows, :, start:]
        view.v = self.v[:, rows, :, start:]
        return view

    def advance(self, n: int) -> None:
        """Called by the model once every layer has written its n new positions."""
        self.length += n

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (drop finished sequences to save decode compute)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
