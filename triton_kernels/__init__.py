"""Fused kernels for the LoRA engine: Triton on CUDA tensors, plain torch elsewhere.

Each module holds one kernel: the Triton forward and backward, its `torch.autograd.Function`, and the
plain-torch reference that the CPU path runs. `ENGINE_KERNELS=triton|torch|auto` forces a side
(`dispatch.py`); Triton itself is optional (a missing install leaves the torch paths working).

- `lora_linear(x, weight, lora_a, lora_b, scale)`: x W^T + scale (x A^T) B^T (o_proj, any LoRA linear)
- `qkv_proj(x, (Wq, Wk, Wv), (Aq, Ak, Av), (Bq, Bk, Bv), scale) -> (q, k, v)`
- `qk_norm_rope(q, k, q_norm_weight, k_norm_weight, cos, sin, eps) -> (q, k)`
- `linear_logprob(hidden, weight, targets, *, chunk_size, return_entropy, return_prob)`
- `adamw_step_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step)`
"""
from triton_kernels.adamw import adamw_step_, adamw_step_torch_
from triton_kernels.dispatch import use_triton
from triton_kernels.linear_logprob import linear_logprob
from triton_kernels.lora_linear import lora_linear, lora_linear_torch
from triton_kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_torch
from triton_kernels.qkv_proj import qkv_proj, qkv_proj_torch

__all__ = [
    "adamw_step_", "adamw_step_torch_", "linear_logprob", "lora_linear", "lora_linear_torch",
    "qk_norm_rope", "qk_norm_rope_torch", "qkv_proj", "qkv_proj_torch", "use_triton",
]
