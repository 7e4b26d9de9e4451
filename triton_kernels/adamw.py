"""One AdamW step over flat float32 buffers, as a single fused kernel (torch.optim.AdamW's math), and the
torch path the optimizer (`engine.train.optim.AdamW`) runs off CUDA, behind one dispatch (`adamw_step_`).

    param     *= 1 - lr * weight_decay                      (decoupled weight decay)
    exp_avg    = lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad^2
    param     -= lr / (1 - beta1^step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps)

Each element is read once from each of the four buffers and written once to three of them: the step
moves 28 bytes per parameter, against torch's several passes.
"""
from __future__ import annotations

import torch

from triton_kernels import dispatch
from triton_kernels._triton import jit, tl, triton

CONFIG = {"BLOCK": 2048, "num_warps": 8}


@jit
def _adamw_kernel(P, G, M1, M2, n, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt,
                  BLOCK: tl.constexpr):
    """The float scalars arrive precomputed in float64 on the host (as torch forms them), then rounded."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    p = tl.load(P + offs, mask=ok)
    g = tl.load(G + offs, mask=ok)
    m = tl.load(M1 + offs, mask=ok)
    v = tl.load(M2 + offs, mask=ok)
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
    tl.store(P + offs, p, mask=ok)
    tl.store(M1 + offs, m, mask=ok)
    tl.store(M2 + offs, v, mask=ok)


def _scalars(lr: float, beta1: float, beta2: float, weight_decay: float, step: int) -> tuple[float, float, float]:
    """(decay factor, step size, sqrt of the second bias correction), computed in float64 as torch does."""
    return 1.0 - lr * weight_decay, lr / (1.0 - beta1 ** step), (1.0 - beta2 ** step) ** 0.5


def adamw_step_torch_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                      scratch: torch.Tensor | None = None) -> None:
    """The torch path (what the optimizer runs on CPU), in place: the ops of torch.optim.AdamW's
    single-tensor path. The denominator is formed a chunk at a time in `scratch` (a reused flat buffer
    of the state dtype, `engine.train.optim`'s per-bucket one; a fresh one of the full size when None),
    so a step allocates nothing."""
    decay, step_size, bc2_sqrt = _scalars(lr, beta1, beta2, weight_decay, step)
    if weight_decay != 0:
        param.mul_(decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    if scratch is None:
        scratch = torch.empty_like(exp_avg_sq)
    chunk = max(scratch.numel(), 1)
    for s0 in range(0, param.numel(), chunk):
        sl = slice(s0, s0 + chunk)
        v = exp_avg_sq[sl]
        denom = torch.sqrt(v, out=scratch[:v.numel()]).div_(bc2_sqrt).add_(eps)
        param[sl].addcdiv_(exp_avg[sl], denom, value=-step_size)


def adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                scratch: torch.Tensor | None = None) -> None:
    """In-place AdamW step on flat buffers of one shape and dtype (float32, or float64 on the torch path
    only); step counts from 1. The op's one dispatch: the fused kernel for float32 CUDA buffers, else
    `adamw_step_torch_` (with `scratch`, its reused denominator buffer)."""
    buffers = (param, grad, exp_avg, exp_avg_sq)
    if any(b.dtype not in (torch.float32, torch.float64) or b.dtype != param.dtype or not b.is_contiguous()
           or b.shape != param.shape for b in buffers):
        raise ValueError("adamw_step_: param, grad, exp_avg, exp_avg_sq must be contiguous float32 of one shape")
    if int(step) < 1:
        raise ValueError(f"adamw_step_: step counts from 1, got {step}")
    if param.dtype != torch.float32 or not dispatch.use_triton(*buffers):
        adamw_step_torch_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, int(step), scratch)
        return
    decay, step_size, bc2_sqrt = _scalars(lr, beta1, beta2, weight_decay, int(step))
    n = param.numel()
    if n == 0:
        return
    _adamw_kernel[(triton.cdiv(n, CONFIG["BLOCK"]),)](
        param, grad, exp_avg, exp_avg_sq, n, 1.0 - beta1, float(beta2), 1.0 - beta2, float(eps), decay, step_size,
        bc2_sqrt,
        BLOCK=CONFIG["BLOCK"], num_warps=CONFIG["num_warps"],
    )
