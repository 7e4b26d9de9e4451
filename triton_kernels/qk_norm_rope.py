"""Qwen3's per-head RMSNorm followed by half-split RoPE for q and k: the Triton kernel (one launch for
both), the torch path CPU runs (`norm_rope`, an autograd.Function with a hand-written backward) and the
one dispatch between them, `qk_norm_rope`. The kernel tests compare the Triton path with that torch path.

Shapes: q [B, T, Hq, D], k [B, T, Hkv, D] (any strides with a unit last stride); norm weights [D];
cos, sin [T, D] or [B, T, D] (or [1, T, D]), as HF's rotary embedding gives them from position ids.
Per head row x: n = x * rsqrt(mean(x^2) + eps) * w, then out = n * cos + rotate_half(n) * sin with
rotate_half(n) = [-n2, n1] (n1, n2 the two halves). Everything in float32, one rounding at the store;
outputs are contiguous [B, T, H, D] in the input dtype.

Backward (same launch shape): with g the upstream grad, dn = g * cos + [g2 * sin2, -g1 * sin1];
dw = sum over rows of dn * xhat; dx = rstd * (dn*w - xhat * mean(dn*w*xhat)). Each program writes a
partial dw row (no atomics, so the result is deterministic); torch sums them.
"""
from __future__ import annotations

import torch

from triton_kernels import dispatch
from triton_kernels._triton import jit, next_pow2, tl, triton
from triton_kernels.torch_path import inv_rms, norm_backward, recording, serial

# Rows (head vectors) per program; tests shrink it.
CONFIG = {"BLOCK_ROWS": 16, "num_warps": 4}


@jit
def _qk_norm_rope_kernel(
    Q, K, GQ, GK, QO, KO, WQ, WK, COS, SIN, DWQ, DWK,
    q_rows, k_rows, q_blocks, T, HQ, HK, D, half, eps,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sgq_b, sgq_t, sgq_h, sgk_b, sgk_t, sgk_h, sc_b, sc_t,
    BACKWARD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Forward: QO/KO = rope(rmsnorm(Q/K)). Backward: QO/KO = dQ/dK from upstream GQ/GK, partial dw
    rows into DWQ/DWK [programs, D]. Programs [0, q_blocks) take q's rows, the rest k's."""
    pid = tl.program_id(0)
    is_q = pid < q_blocks
    blk = tl.where(is_q, pid, pid - q_blocks)
    rows = tl.where(is_q, q_rows, k_rows)
    H = tl.where(is_q, HQ, HK)
    s_b = tl.where(is_q, sq_b, sk_b)
    s_t = tl.where(is_q, sq_t, sk_t)
    s_h = tl.where(is_q, sq_h, sk_h)
    g_b = tl.where(is_q, sgq_b, sgk_b)
    g_t = tl.where(is_q, sgq_t, sgk_t)
    g_h = tl.where(is_q, sgq_h, sgk_h)
    if is_q:
        X = Q
        G = GQ
        O = QO
        W = WQ
        DW = DWQ
    else:
        X = K
        G = GK
        O = KO
        W = WK
        DW = DWK

    r = blk * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = r < rows
    bt = r // H
    h = r % H
    b = bt // T
    t = bt % T
    c = tl.arange(0, BLOCK_HALF)
    col_ok = c < half
    ok = row_ok[:, None] & col_ok[None, :]
    x_off = (b * s_b + t * s_t + h * s_h)[:, None] + c[None, :]
    x1 = tl.load(X + x_off, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + half, mask=ok, other=0.0).to(tl.float32)
    w1 = tl.load(W + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(W + half + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    cs_off = (b * sc_b + t * sc_t)[:, None] + c[None, :]
    cos1 = tl.load(COS + cs_off, mask=ok, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + cs_off + half, mask=ok, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + cs_off, mask=ok, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + cs_off + half, mask=ok, other=0.0).to(tl.float32)

    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
    xhat1 = x1 * rstd[:, None]
    xhat2 = x2 * rstd[:, None]
    o_off = (r * D)[:, None] + c[None, :]  # outputs are contiguous [rows, D]
    if BACKWARD:
        g_off = (b * g_b + t * g_t + h * g_h)[:, None] + c[None, :]
        g1 = tl.load(G + g_off, mask=ok, other=0.0).to(tl.float32)
        g2 = tl.load(G + g_off + half, mask=ok, other=0.0).to(tl.float32)
        dn1 = g1 * cos1 + g2 * sin2
        dn2 = g2 * cos2 - g1 * sin1
        tl.store(DW + blk * D + c, tl.sum(dn1 * xhat1, axis=0), mask=col_ok)
        tl.store(DW + blk * D + half + c, tl.sum(dn2 * xhat2, axis=0), mask=col_ok)
        dxh1 = dn1 * w1
        dxh2 = dn2 * w2
        proj = (tl.sum(dxh1 * xhat1, axis=1) + tl.sum(dxh2 * xhat2, axis=1)) / D
        out1 = rstd[:, None] * (dxh1 - xhat1 * proj[:, None])
        out2 = rstd[:, None] * (dxh2 - xhat2 * proj[:, None])
    else:
        n1 = xhat1 * w1
        n2 = xhat2 * w2
        out1 = n1 * cos1 - n2 * sin1
        out2 = n2 * cos2 + n1 * sin2
    tl.store(O + o_off, out1.to(O.dtype.element_ty), mask=ok)
    tl.store(O + o_off + half, out2.to(O.dtype.element_ty), mask=ok)


def _cos_strides(cos: torch.Tensor) -> tuple[int, int]:
    """(batch stride, time stride) of cos/sin; batch stride 0 when shared across the batch."""
    if cos.dim() == 2:
        return 0, cos.stride(0)
    return (cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(1)


def _launch(q, k, gq, gk, wq, wk, cos, sin, eps: float, backward: bool):
    """Runs the kernel; returns (out_q, out_k, dwq, dwk) (dw's None in the forward)."""
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    block = CONFIG["BLOCK_ROWS"]
    q_rows, k_rows = B * T * HQ, B * T * HK
    q_blocks, k_blocks = triton.cdiv(q_rows, block), triton.cdiv(k_rows, block)
    out_q = dispatch.new_output(q.shape, q.dtype, q.device)
    out_k = dispatch.new_output(k.shape, k.dtype, k.device)
    dwq = dwk = None
    if backward:
        dwq = dispatch.new_output((q_blocks, D), torch.float32, q.device)
        dwk = dispatch.new_output((k_blocks, D), torch.float32, q.device)
    if q_blocks + k_blocks == 0:
        return out_q, out_k, dwq, dwk
    gq_, gk_ = (gq, gk) if backward else (q, k)  # unused pointers in the forward
    sc_b, sc_t = _cos_strides(cos)
    _qk_norm_rope_kernel[(q_blocks + k_blocks,)](
        q, k, gq_, gk_, out_q, out_k, wq, wk, cos, sin,
        dwq if backward else out_q, dwk if backward else out_k,
        q_rows, k_rows, q_blocks, T, HQ, HK, D, D // 2, float(eps),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        gq_.stride(0), gq_.stride(1), gq_.stride(2), gk_.stride(0), gk_.stride(1), gk_.stride(2), sc_b, sc_t,
        BACKWARD=backward, BLOCK_ROWS=block, BLOCK_HALF=next_pow2(D // 2, 1), num_warps=CONFIG["num_warps"],
    )
    return out_q, out_k, dwq, dwk


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _QKNormRopeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, wq, wk, cos, sin, eps: float):
        q, k, cos, sin = (_unit_last_stride(t) for t in (q, k, cos, sin))
        wq, wk = wq.contiguous(), wk.contiguous()
        out_q, out_k, _, _ = _launch(q, k, None, None, wq, wk, cos, sin, eps, backward=False)
        ctx.save_for_backward(q, k, wq, wk, cos, sin)
        ctx.eps = eps
        return out_q, out_k

    @staticmethod
    def backward(ctx, gq, gk):
        q, k, wq, wk, cos, sin = ctx.saved_tensors
        gq = torch.zeros_like(q) if gq is None else _unit_last_stride(gq.to(q.dtype))
        gk = torch.zeros_like(k) if gk is None else _unit_last_stride(gk.to(k.dtype))
        dq, dk, dwq, dwk = _launch(q, k, gq, gk, wq, wk, cos, sin, ctx.eps, backward=True)
        return dq, dk, dwq.sum(0).to(wq.dtype), dwk.sum(0).to(wk.dtype), None, None, None


def _rotate(x: torch.Tensor, tables: tuple[torch.Tensor, ...], transpose: bool) -> torch.Tensor:
    """RoPE of x [..., D] with the half tables (c1, c2, s1, s2) [B, T, 1, D/2] (cos = [c1 | c2], sin =
    [s1 | s2]): [x1 c1 - x2 s1, x2 c2 + x1 s2]; with `transpose` its transpose (the backward):
    [x1 c1 + x2 s2, x2 c2 - x1 s1]. Two fused passes per half, no rotate_half copy."""
    c1, c2, s1, s2 = tables
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if transpose:
        torch.mul(x1, c1, out=out[..., :half]).addcmul_(x2, s2, value=1.0)
        torch.mul(x2, c2, out=out[..., half:]).addcmul_(x1, s1, value=-1.0)
    else:
        torch.mul(x1, c1, out=out[..., :half]).addcmul_(x2, s1, value=-1.0)
        torch.mul(x2, c2, out=out[..., half:]).addcmul_(x1, s2, value=1.0)
    return out


class _NormRope(torch.autograd.Function):
    """rope(rmsnorm(x) * w) for one of q / k, with its hand-written backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                eps: float) -> torch.Tensor:
        out, rstd, tables = _norm_rope_forward(x, weight, cos, sin, eps)
        ctx.save_for_backward(x, weight, rstd, *tables)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd, *tables = ctx.saved_tensors
        with serial(x):
            dn = _rotate(grad.float(), tables, transpose=True)
            dx, dw = norm_backward(dn, x.float(), rstd, weight.float(), ctx.needs_input_grad[1])
            return dx.to(x.dtype), (dw.to(weight.dtype) if dw is not None else None), None, None, None


def _norm_rope_forward(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """(rope(rmsnorm(x) * w), rstd, half tables): the output and what the backward needs."""
    half = x.shape[-1] // 2
    with serial(x):
        c1, c2 = cos[..., :half].float().unsqueeze(2), cos[..., half:].float().unsqueeze(2)
        s1, s2 = sin[..., :half].float().unsqueeze(2), sin[..., half:].float().unsqueeze(2)
        tables = (c1, c2, s1, s2)
        x32 = x.float()
        rstd = inv_rms(x32, eps)
        n = (x32 * rstd).mul_(weight.float())
        return _rotate(n, tables, transpose=False).to(x.dtype), rstd, tables


def norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              eps: float) -> torch.Tensor:
    """Qwen3's per-head RMSNorm then RoPE for one of q / k, the torch path: x [B, T, H, D], weight [D],
    cos/sin [B, T, D] (or [1, T, D]) -> [B, T, H, D] in x's dtype; rope(rmsnorm(x) * w) in float32."""
    if not recording(x, weight):
        return _norm_rope_forward(x, weight, cos, sin, eps)[0]
    return _NormRope.apply(x, weight, cos, sin, eps)


def qk_norm_rope_torch(q: torch.Tensor, k: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path (what CPU runs, and what the Triton kernel is tested against): `norm_rope` on q, then
    on k. cos/sin [T, D] are broadcast over the batch as [1, T, D]."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    return norm_rope(q, q_norm_weight, cos, sin, eps), norm_rope(k, k_norm_weight, cos, sin, eps)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B,T,Hq,D], k [B,T,Hkv,D] -> (rope(rmsnorm(q)), rope(rmsnorm(k))), same shapes and dtypes.

    cos, sin: [T, D] or [B, T, D]. Gradients for q, k and both norm weights (not for cos/sin).
    """
    B, T, _, D = q.shape
    if k.dim() != 4 or k.shape[:2] != (B, T) or k.shape[3] != D or D % 2:
        raise ValueError(f"qk_norm_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, T, H, D] "
                         "with matching B, T and an even D")
    if q_norm_weight.shape != (D,) or k_norm_weight.shape != (D,):
        raise ValueError(f"qk_norm_rope: norm weights must be [{D}]")
    if cos.shape != sin.shape or cos.shape[-2:] != (T, D) or cos.dim() not in (2, 3) or (
            cos.dim() == 3 and cos.shape[0] not in (1, B)):
        raise ValueError(f"qk_norm_rope: cos/sin {tuple(cos.shape)} must be [T, D] or [B, T, D] "
                         f"with T={T}, D={D}")
    if dispatch.use_triton(q, k, q_norm_weight, k_norm_weight, cos, sin):
        if q.dtype != k.dtype or cos.dtype != sin.dtype or q_norm_weight.dtype != k_norm_weight.dtype:
            raise ValueError("qk_norm_rope: q/k, cos/sin and the two norm weights must share dtypes")
        return _QKNormRopeTriton.apply(q, k, q_norm_weight, k_norm_weight, cos, sin, float(eps))
    return qk_norm_rope_torch(q, k, q_norm_weight, k_norm_weight, cos, sin, eps)
