"""Small Qwen3 building blocks: RMSNorm, rotary embedding, SwiGLU MLP, fused LoRA projections.

The norm, the q/k norm + RoPE and the SwiGLU product are `autograd.Function`s with hand-written
backwards: each is a few whole-tensor passes instead of the dozen small ops (and saved temporaries)
that autograd records for the composite formula, which is what the step spends outside the matrix
products on CPU. All math is float32 whatever the input dtype, with one rounding at the output.

On CPU these small passes (and the low-rank GEMMs) run on one thread (`serial`): each multi-threaded
op is a parallel region whose threads must all be scheduled before it finishes, which on a loaded
machine costs ~15 ms per op (BENCHMARKS.md), far more than the op's own work. When autograd records
nothing (generation, reference log-probs) they run their forward math directly (`frozen.recording`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.frozen import Linear, cast_weight, recording


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


def _rstd(x32: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim, keepdim; one reduction pass, no x^2 temporary."""
    return torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x32.shape[-1]).add_(eps).rsqrt_()


def _normed(h: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rmsnorm(h) * weight from a known rstd, float32 math, in h's dtype (as `rms_norm`)."""
    return (h.float() * rstd).mul_(weight.float()).to(h.dtype)


def _norm_backward(dn: torch.Tensor, x32: torch.Tensor, rstd: torch.Tensor, w32: torch.Tensor,
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
            rstd = _rstd(x.float(), eps)
            ctx.save_for_backward(x, weight, rstd)
            return _normed(x, rstd, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        with serial(x):
            dx, dw = _norm_backward(grad.float(), x.float(), rstd, weight.float(), ctx.needs_input_grad[1])
            return dx.to(x.dtype), (dw.to(weight.dtype) if dw is not None else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32; the weight multiplies (no 1 + w).

    x [..., D], weight [D] -> [..., D] in x's dtype.
    """
    if not recording(x, weight):
        with serial(x):
            return _normed(x, _rstd(x.float(), eps), weight)
    return _RMSNorm.apply(x, weight, eps)


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D], cos/sin [B, T, D] -> [B, T, H, D]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, sign: float) -> torch.Tensor:
    """[x1 c - sign x2 s, x2 c + sign x1 s] with c, s the half tables [B, T, 1, D/2]: RoPE for sign 1,
    its transpose (the backward) for sign -1. Two fused passes per half, no rotate_half copy."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mul(x1, c, out=out[..., :half]).addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=out[..., half:]).addcmul_(x1, s, value=sign)
    return out


class _NormRope(torch.autograd.Function):
    """rope(rmsnorm(x) * w) for one of q / k."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                eps: float) -> torch.Tensor:
        out, rstd, c, s = _norm_rope_forward(x, weight, cos, sin, eps)
        ctx.save_for_backward(x, weight, rstd, c, s)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd, c, s = ctx.saved_tensors
        with serial(x):
            dn = _rotate(grad.float(), c, s, -1.0)
            dx, dw = _norm_backward(dn, x.float(), rstd, weight.float(), ctx.needs_input_grad[1])
            return dx.to(x.dtype), (dw.to(weight.dtype) if dw is not None else None), None, None, None


def _norm_rope_forward(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rope(rmsnorm(x) * w), rstd, c, s): the output and what the backward needs."""
    half = x.shape[-1] // 2
    with serial(x):
        c, s = cos[..., :half].float().unsqueeze(2), sin[..., :half].float().unsqueeze(2)
        x32 = x.float()
        rstd = _rstd(x32, eps)
        n = (x32 * rstd).mul_(weight.float())
        return _rotate(n, c, s, 1.0).to(x.dtype), rstd, c, s


def norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              eps: float) -> torch.Tensor:
    """Qwen3's per-head RMSNorm then RoPE: x [B, T, H, D], weight [D], cos/sin [B, T, D] as
    `RotaryEmbedding.cos_sin` makes them (second half equal to the first) -> [B, T, H, D] in x's dtype.
    Equals apply_rope(rms_norm(x, weight, eps), cos, sin) computed in float32."""
    if not recording(x, weight):
        return _norm_rope_forward(x, weight, cos, sin, eps)[0]
    return _NormRope.apply(x, weight, cos, sin, eps)


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


class _LoRAProjections(torch.autograd.Function):
    """Several LoRA linears sharing one input: y_s = x W_s^T + scale (x A_s^T) B_s^T, s = 1..K,
    optionally with an RMSNorm in front (x = rmsnorm(h) * w_norm, the layer's input norm).

    The A's are stacked so x A_cat^T is one GEMM; each y_s is its base GEMM with the low-rank term
    added in place (addmm_). Backward: dx = sum_s dy_s W_s + scale [dy_1 B_1 | ...] A_cat accumulates
    in one buffer (addmm_), dA_cat = scale (dy B)^T x is one GEMM, dB_s = scale dy_s^T xa_s.
    With the norm, h and its rstd are saved instead of x (x is recomputed in the backward: one cheap
    pass instead of keeping a [tokens, hidden] tensor per layer; h is saved by the residual anyway).
    Compute dtype is x's; dA, dB come back in the adapters' dtypes. W's are frozen.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, count: int, eps: float, *tensors: torch.Tensor):
        outs, saved = _lora_projections_forward(x, scale, count, eps, tensors)
        ctx.save_for_backward(*saved)
        ctx.scale, ctx.count, ctx.r, ctx.norm = scale, count, tensors[count].shape[0], len(tensors) > 3 * count
        ctx.x_shape = x.shape
        ctx.param_dtypes = [t.dtype for t in tensors]
        return outs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        saved = ctx.saved_tensors
        if ctx.norm:
            h, rstd, norm_w, xa, a_cat, *rest = saved
            with serial(h):
                x2 = _normed(h, rstd, norm_w).reshape(-1, h.shape[-1])
        else:
            x2, xa, a_cat, *rest = saved
        count, r, scale = ctx.count, ctx.r, ctx.scale
        weights, bs = rest[:count], rest[count:]
        dys = [torch.zeros(x2.shape[0], w.shape[0], dtype=x2.dtype, device=x2.device) if g is None
               else g.reshape(-1, w.shape[0]).to(x2.dtype) for g, w in zip(grads, weights)]
        with serial(x2):  # the low-rank products are small: one thread each
            dyb = torch.cat([torch.mm(dy, b) for dy, b in zip(dys, bs)], 1) if count > 1 else torch.mm(dys[0], bs[0])
        dx = d_norm_w = None
        want_norm_w = ctx.norm and ctx.needs_input_grad[4 + 3 * count]
        if ctx.needs_input_grad[0] or want_norm_w:
            dx = torch.mm(dys[0], cast_weight(weights[0], x2.dtype))
            for dy, w in zip(dys[1:], weights[1:]):
                dx.addmm_(dy, cast_weight(w, x2.dtype))
            with serial(x2):
                dx = dx.addmm_(dyb, a_cat, alpha=scale).view(ctx.x_shape)
                if ctx.norm:
                    dx, d_norm_w = _norm_backward(dx.float(), h.float(), rstd, norm_w.float(), want_norm_w)
                    dx = dx.to(h.dtype) if ctx.needs_input_grad[0] else None
                    d_norm_w = d_norm_w.to(norm_w.dtype) if d_norm_w is not None else None
        with serial(x2):
            da_cat = torch.mm(dyb.t(), x2).mul_(scale)
            das = [da_cat[s * r:(s + 1) * r] for s in range(count)]
            dbs = [torch.mm(dy.t(), xa[:, s * r:(s + 1) * r]).mul_(scale) for s, dy in enumerate(dys)]
        dtypes = ctx.param_dtypes
        grads_out = [None] * count + [d.to(dtypes[count + i]) for i, d in enumerate(das)] + \
            [d.to(dtypes[2 * count + i]) for i, d in enumerate(dbs)]
        return (dx, None, None, None, *grads_out, *([d_norm_w] if ctx.norm else []))


def _lora_projections_forward(x: torch.Tensor, scale: float, count: int, eps: float,
                              tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], tuple]:
    """The outputs of `_LoRAProjections` and the tensors its backward needs."""
    norm_w = tensors[-1] if len(tensors) > 3 * count else None
    weights, lora_as, lora_bs = tensors[:count], tensors[count:2 * count], tensors[2 * count:3 * count]
    dtype, r = x.dtype, lora_as[0].shape[0]
    h = rstd = None
    if norm_w is not None:
        h = x
        with serial(h):
            rstd = _rstd(h.float(), eps)
            x = _normed(h, rstd, norm_w)
    x2 = x.reshape(-1, x.shape[-1])
    a_cat = torch.cat([a.to(dtype) for a in lora_as]) if count > 1 else lora_as[0].to(dtype)
    bs = [b.to(dtype) for b in lora_bs]
    with serial(x):
        xa = torch.mm(x2, a_cat.t())
    outs = []
    for s, (w, b) in enumerate(zip(weights, bs)):
        y = torch.mm(x2, cast_weight(w, dtype).t())
        with serial(x):
            y.addmm_(xa[:, s * r:(s + 1) * r], b.t(), alpha=scale)
        outs.append(y.view(*x.shape[:-1], w.shape[0]))
    saved = (h, rstd, norm_w, xa, a_cat, *weights, *bs) if norm_w is not None else (x2, xa, a_cat, *weights, *bs)
    return tuple(outs), saved


def lora_projections(x: torch.Tensor, weights: tuple[torch.Tensor, ...], lora_as: tuple[torch.Tensor, ...],
                     lora_bs: tuple[torch.Tensor, ...], scale: float,
                     norm: tuple[torch.Tensor, float] | None = None) -> tuple[torch.Tensor, ...]:
    """x [..., in] -> K outputs [..., out_s] = x W_s^T + scale (x A_s^T) B_s^T; weights frozen [out_s, in],
    lora_as [r, in] (one shared r), lora_bs [out_s, r]. Gradients for x and every A, B.
    norm=(weight [in], eps): x is first RMS-normed (`rms_norm(x, weight, eps)`), inside the same node."""
    extra = (norm[0],) if norm is not None else ()
    eps = float(norm[1]) if norm is not None else 0.0
    tensors = (*weights, *lora_as, *lora_bs, *extra)
    if not recording(x, *tensors):
        return _lora_projections_forward(x, float(scale), len(weights), eps, tensors)[0]
    return _LoRAProjections.apply(x, float(scale), len(weights), eps, *tensors)
