"""Frozen weights stored narrower than the compute dtype, and the products that use them.

LoRA training in float32 on CPU from a bf16 checkpoint (as Qwen3 ships) keeps the frozen matrices at
2 bytes (`Qwen3ForCausalLM.compact_frozen_weights`, `load_model(compact_frozen=True)`): every product
casts its weight into a reused float32 buffer (`cast_weight`) and never saves the cast copy for the
backward (`linear`). Lossless: the values are the checkpoint's, so results are bit-identical.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from triton_kernels.torch_path import cast_weight, recording


def stays_narrow(stored: torch.dtype, ndim: int, compute: torch.dtype) -> bool:
    """Whether a frozen tensor stored in `stored` keeps that dtype under `compute`: matrices (not
    norms) stored in fewer bytes than the compute dtype."""
    return ndim == 2 and stored.is_floating_point and stored.itemsize < compute.itemsize


def compacts_by_default(device: torch.device, compute: torch.dtype, full_finetune: bool = False) -> bool:
    """Whether a LoRA run keeps its frozen matrices narrow: float32 on CPU (bf16 products there run
    ~100x slower, so the weights are cast per product instead; on GPU the run computes in bf16)."""
    return not full_finetune and device.type == "cpu" and compute == torch.float32


class _CastLinear(torch.autograd.Function):
    """x W^T with a frozen W stored in another dtype (e.g. bf16 as the checkpoint ships it, under float32
    compute): W is cast for the product and again in the backward, so no compute-dtype copy of it
    outlives the GEMM (autograd would save the cast copy until the backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, cast_weight(weight, x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return (torch.matmul(grad, cast_weight(weight, grad.dtype)) if ctx.needs_input_grad[0] else None), None


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T in x's dtype. A frozen weight kept in a narrower storage dtype
    (`Qwen3ForCausalLM.compact_frozen_weights`) is cast per call; a trainable one must match x."""
    if weight.dtype == x.dtype or weight.requires_grad:
        return F.linear(x, weight)
    if not recording(x):
        return F.linear(x, cast_weight(weight, x.dtype))
    return _CastLinear.apply(x, weight)


class Linear(nn.Linear):
    """nn.Linear (no bias) whose frozen weight may be stored in another dtype than the compute (`linear`)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        # A meta-device build is filled from a checkpoint. Initialising meta tensors goes through
        # torch's reference ops, which import torch._dynamo and with it Triton (~100 MB resident).
        if not self.weight.is_meta:
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class Embedding(nn.Embedding):
    """nn.Embedding that skips initialising a meta-device build (see `Linear.reset_parameters`)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


