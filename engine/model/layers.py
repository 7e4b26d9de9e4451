"""Small Qwen3 building blocks: RMSNorm, rotary embedding tables, SwiGLU MLP.

The norm and the SwiGLU product are `autograd.Function`s with hand-written backwards: each is a few
whole-tensor passes instead of the dozen small ops (and saved temporaries) that autograd records for the
composite formula, which is what the step spends outside the matrix products on CPU. They run on one
thread on CPU and skip autograd when it records nothing (`triton_kernels.torch_path`: `serial`,
`recording`). The fused ops (LoRA projections, q/k norm + RoPE, the LM head's log-probs) live in
`triton_kernels/`, one file each with their Triton and torch paths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.frozen import Linear
from triton_kernels.torch_path import recording, rms_norm, serial


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding:
    """Half-split (rotate_half) RoPE tables: inv_freq = theta^(-2i/head_dim), computed in float32."""

    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim = head_dim
        self.theta = theta
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
            self._inv_freq[device] = 1.0 / (self.theta ** (exponent / self.head_dim))
        return self._inv_freq[device]

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, T, head_dim] in `dtype` (each half repeats the other)."""
        freqs = position_ids.float()[..., None] * self.inv_freq(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, saving only gate and up (silu is recomputed in the backward: one cheap pass
    instead of keeping a third [tokens, intermediate] tensor per layer)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        with serial(gate):
            return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        with serial(gate):
            d_up = F.silu(gate).mul_(grad) if ctx.needs_input_grad[1] else None
            d_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return d_gate, d_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, same shapes and dtype."""
    if not recording(gate, up):
        with serial(gate):
            return F.silu(gate).mul_(up)
    return _SwiGLU.apply(gate, up)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
