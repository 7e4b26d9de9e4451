"""What the fused ops' torch implementations (the path CPU training runs) share.

- `serial`: on CPU the small passes (and the low-rank GEMMs) run on one thread: each multi-threaded op
  is a parallel region whose threads must all be scheduled before it finishes, which on a loaded
  machine costs ~15 ms per op (BENCHMARKS.md), far more than the op's own work.
- `recording`: when autograd records nothing (generation, reference log-probs) the ops run their
  forward math directly instead of through their `autograd.Function`.
- `cast_weight` / `workspace`: a frozen weight stored narrower than the compute dtype (compaction,
  `engine.model.memory`) is cast per product into one reused per-thread buffer.
- `rstd` / `normed` / `norm_backward` / `rms_norm`: RMSNorm in float32 with its hand-written backward,
  which q/k norm + RoPE and the normed LoRA projection build on.
All math is float32 whatever the input dtype, with one rounding at the output.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch


@contextlib.contextmanager
def serial(t: torch.Tensor) -> Iterator[None]:
    """Run the enclosed CPU ops on one thread (no-op for other devices or a 1-thread process)."""
    threads = torch.get_num_threads() if t.device.type == "cpu" else 1
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def recording(*tensors: torch.Tensor) -> bool:
    """True when autograd records these inputs. Otherwise (generation, reference log-probs) the
    hand-written ops run their forward math directly: an autograd.Function's bookkeeping costs more
    than the math itself at decode sizes."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


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


def inv_rms(x32: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim, keepdim; one reduction pass, no x^2 temporary."""
    return torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x32.shape[-1]).add_(eps).rsqrt_()


def normed(h: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rmsnorm(h) * weight from a known rstd, float32 math, in h's dtype (as `rms_norm`)."""
    return (h.float() * rstd).mul_(weight.float()).to(h.dtype)


def norm_backward(dn: torch.Tensor, x32: torch.Tensor, rstd: torch.Tensor, w32: torch.Tensor,
                  want_weight: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Given dL/dn for n = xhat * w (xhat = x * rstd): dx = rstd (dn w - xhat mean(dn w xhat)), and dw
    summed over every leading dim. `dn` is float32 (left unchanged: it may be autograd's shared grad)."""
    xhat = x32 * rstd
    dw = (dn * xhat).flatten(0, -2).sum(0) if want_weight else None
    dnw = dn * w32
    proj = (dnw * xhat).sum(-1, keepdim=True).div_(x32.shape[-1])
    return dnw.sub_(xhat.mul_(proj)).mul_(rstd), dw


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        with serial(x):
            rstd = inv_rms(x.float(), eps)
            ctx.save_for_backward(x, weight, rstd)
            return normed(x, rstd, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        with serial(x):
            dx, dw = norm_backward(grad.float(), x.float(), rstd, weight.float(), ctx.needs_input_grad[1])
            return dx.to(x.dtype), (dw.to(weight.dtype) if dw is not None else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32; the weight multiplies (no 1 + w).

    x [..., D], weight [D] -> [..., D] in x's dtype.
    """
    if not recording(x, weight):
        with serial(x):
            return normed(x, inv_rms(x.float(), eps), weight)
    return _RMSNorm.apply(x, weight, eps)
