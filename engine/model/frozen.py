"""Frozen weights stored narrower than the compute dtype, and the products that use them.

LoRA training in float32 on CPU from a bf16 checkpoint (as Qwen3 ships) keeps the frozen matrices at
2 bytes (`Qwen3ForCausalLM.compact_frozen_weights`, `load_model(compact_frozen=True)`): every product
casts its weight into a reused float32 buffer (`cast_weight`) and never saves the cast copy for the
backward (`linear`). Lossless: the values are the checkpoint's, so results are bit-identical.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn


def recording(*tensors: torch.Tensor) -> bool:
    """True when autograd records these inputs. Otherwise (generation, reference log-probs) the
    hand-written ops run their forward math directly: an autograd.Function's bookkeeping costs more
    than the math itself at decode sizes."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def stays_narrow(stored: torch.dtype, ndim: int, compute: torch.dtype) -> bool:
    """Whether a frozen tensor stored in `stored` keeps that dtype under `compute`: matrices (not
    norms) stored in fewer bytes than the compute dtype."""
    return ndim == 2 and stored.is_floating_point and stored.itemsize < compute.itemsize


def compacts_by_default(device: torch.device, compute: torch.dtype, full_finetune: bool = False) -> bool:
    """Whether a LoRA run keeps its frozen matrices narrow: float32 on CPU (bf16 products there run
    ~100x slower, so the weights are cast per product instead; on GPU the run computes in bf16)."""
    return not full_finetune and device.type == "cpu" and compute == torch.float32


_cast_workspace = threading.local()
CAST_WORKSPACE_MAX_BYTES = 64 * 2**20


def cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype` for one product. A narrow-stored (compacted) weight is copied into one
    reused per-thread buffer (sized by the largest weight so far): valid until the next cast on this
    thread, so use it at once. A fresh tensor per cast would cost page faults and heap growth on CPU."""
    if weight.dtype == dtype:
        return weight
    if weight.numel() * dtype.itemsize > CAST_WORKSPACE_MAX_BYTES:  # e.g. a whole LM head: not kept
        return weight.to(dtype)
    return workspace(weight.numel(), dtype, weight.device).view(weight.shape).copy_(weight)


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat per-thread scratch tensor of at least `numel` elements (its first `numel` returned),
    shared by every `cast_weight` of this thread, dtype and device."""
    buffers = _cast_workspace.__dict__.setdefault("buffers", {})
    buf = buffers.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buffers.pop((dtype, device), None)  # free the smaller buffer before allocating its successor
        buf = buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


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


