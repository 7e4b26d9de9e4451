"""Fused kernels for the LoRA engine: Triton on CUDA tensors, plain torch elsewhere.

One op, one file: each holds the op's Triton kernels (forward and backward) with their
`torch.autograd.Function`, the torch implementation CPU training runs (hand-written backwards where that
pays; shared pieces in `torch_path.py`), and the op's one dispatch between them; the kernel tests check
the Triton path against that torch path. `ENGINE_KERNELS=triton|torch|auto` forces a side
(`dispatch.py`); Triton itself is optional (a missing install leaves the torch paths working).

- `lora_linear(x, weight, lora_a, lora_b, scale)`: x W^T + scale (x A^T) B^T (o_proj, any LoRA linear)
- `qkv_proj(x, (Wq, Wk, Wv), (Aq, Ak, Av), (Bq, Bk, Bv), scale) -> (q, k, v)` (same file, `lora_projections`)
- `qk_norm_rope(q, k, q_norm_weight, k_norm_weight, cos, sin, eps) -> (q, k)`
- `linear_logprob(hidden, weight, targets, *, chunk_size, return_entropy, return_prob)`
- `adamw_step_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step)`
"""
from triton_kernels.adamw import adamw_step_, adamw_step_torch_
from triton_kernels.dispatch import use_triton
from triton_kernels.linear_logprob import linear_logprob
from triton_kernels.lora_linear import (lora_linear, lora_linear_torch, lora_projections, lora_projections_torch, qkv_proj,
                                        qkv_proj_torch)
from triton_kernels.qk_norm_rope import norm_rope, qk_norm_rope, qk_norm_rope_torch

__all__ = [
    "adamw_step_", "adamw_step_torch_", "linear_logprob", "lora_linear", "lora_linear_torch", "lora_projections",
    "lora_projections_torch", "norm_rope", "qk_norm_rope", "qk_norm_rope_torch", "qkv_proj", "qkv_proj_torch",
    "use_triton",
]
