"""Fused q/k/v projection with LoRA: three `lora_linear`s that share x, in one launch each way.

Shapes: x [..., in]; weights (Wq [nq, in], Wk [nk, in], Wv [nv, in]) frozen; lora_as three [r, in];
lora_bs ([nq, r], [nk, r], [nv, r]); one shared scale. Returns q [..., nq], k [..., nk], v [..., nv].

Forward: the three A's are stacked into A_cat [3r, in] so xa = x A_cat^T is one skinny GEMM; the three
B's act block-diagonally on xa's column blocks inside `lora_linear`'s GEMM kernel, run with three
column segments (one launch writes q, k and v, each contiguous: no split copy).
Backward: dx = sum_s dy_s W_s + scale [dy_q B_q | dy_k B_k | dy_v B_v] A_cat is one kernel whose
reduction runs over the three segments in turn and then over the 3r low-rank columns.
"""
from __future__ import annotations

from typing import Sequence

import torch

from triton_kernels import dispatch
from triton_kernels._triton import dot_precision, interpreting, jit, next_pow2, tl, triton
from triton_kernels.lora_linear import gemm_config, launch_lowrank_gemm, lora_linear_torch


@jit
def _segmented_reduction_gemm_kernel(
    X0, X1, X2, Y0, Y1, Y2, U, V, C,
    M, N, K0, K1, K2, R, scale,
    stride_yk, stride_yn, stride_um, stride_ur, stride_vr, stride_vn,
    NUM_SEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """C[M, N] = sum_s X_s[M, K_s] Y_s[K_s, N] + scale * U[M, R] V[R, N].

    X_s contiguous (row stride K_s); Y_s share strides. EVEN_K: every K_s is a multiple of BLOCK_K.
    """
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_in = rm % M
    rn_in = rn % N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(NUM_SEG):  # unrolled: s is a compile-time constant
        X = X0 if s == 0 else (X1 if s == 1 else X2)
        Y = Y0 if s == 0 else (Y1 if s == 1 else Y2)
        K = K0 if s == 0 else (K1 if s == 1 else K2)
        x_ptrs = X + rm_in[:, None] * K + rk[None, :]
        y_ptrs = Y + rk[:, None] * stride_yk + rn_in[None, :] * stride_yn
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs)
                y = tl.load(y_ptrs)
            else:
                x = tl.load(x_ptrs, mask=rk[None, :] < K - k0, other=0.0)
                y = tl.load(y_ptrs, mask=rk[:, None] < K - k0, other=0.0)
            if UPCAST:  # the interpreter's tl.dot mishandles bf16
                x = x.to(tl.float32)
                y = y.to(tl.float32)
            acc = tl.dot(x, y, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K
            y_ptrs += BLOCK_K * stride_yk

    rr = tl.arange(0, BLOCK_R)
    u = tl.load(U + rm_in[:, None] * stride_um + rr[None, :] * stride_ur, mask=rr[None, :] < R, other=0.0)
    v = tl.load(V + rr[:, None] * stride_vr + rn_in[None, :] * stride_vn, mask=rr[:, None] < R, other=0.0)
    if UPCAST:
        u = u.to(tl.float32)
        v = v.to(tl.float32)
    acc += scale * tl.dot(u, v, input_precision=PRECISION)
    tl.store(C + rm[:, None] * N + rn[None, :], acc.to(C.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _launch_segmented_reduction(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], u: torch.Tensor,
                                v: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """out[M, N] = sum_s xs[s] @ ys[s] + scale * u @ v; xs[s] [M, K_s] contiguous, ys[s] [K_s, N]."""
    M, N = out.shape
    segments = len(xs)
    ks = [x.shape[1] for x in xs] + [0] * (3 - segments)
    pad = lambda seq: list(seq) + [seq[0]] * (3 - segments)  # noqa: E731 - unused slots
    cfg = gemm_config(out.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    if grid[0] == 0:
        return
    _segmented_reduction_gemm_kernel[grid](
        *pad(xs), *pad(ys), u, v, out, M, N, *ks, u.shape[1], float(scale),
        ys[0].stride(0), ys[0].stride(1), u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        NUM_SEG=segments, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=next_pow2(u.shape[1]), GROUP_M=cfg["GROUP_M"],
        EVEN_K=all(k % cfg["BLOCK_K"] == 0 for k in ks), PRECISION=dot_precision(out.dtype),
        UPCAST=interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


class _QKVProjTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, wq, wk, wv, aq, ak, av, bq, bk, bv, scale: float):
        dtype, lead = x.dtype, x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        ws = [w.to(dtype).contiguous() for w in (wq, wk, wv)]
        bs = [b.to(dtype).contiguous() for b in (bq, bk, bv)]
        a_cat = torch.cat([a.to(dtype) for a in (aq, ak, av)])  # [3r, in]
        xa = torch.mm(x2, a_cat.t())  # [M, 3r]: column block s feeds segment s
        outs = [dispatch.new_output((x2.shape[0], w.shape[0]), dtype, x.device) for w in ws]
        launch_lowrank_gemm(x2, [w.t() for w in ws], xa, [b.t() for b in bs], outs, scale)
        ctx.save_for_backward(x2, *ws, a_cat, *bs, xa)
        ctx.scale, ctx.x_shape = scale, x.shape
        ctx.a_dtypes = [a.dtype for a in (aq, ak, av)]
        ctx.b_dtypes = [b.dtype for b in (bq, bk, bv)]
        return tuple(o.view(*lead, o.shape[1]) for o in outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x2, wq, wk, wv, a_cat, bq, bk, bv, xa = ctx.saved_tensors
        ws, bs = (wq, wk, wv), (bq, bk, bv)
        M, r = x2.shape[0], a_cat.shape[0] // 3
        dys = [torch.zeros((M, w.shape[0]), dtype=x2.dtype, device=x2.device) if d is None
               else d.reshape(M, w.shape[0]).to(x2.dtype).contiguous() for d, w in zip((dq, dk, dv), ws)]
        dyb = torch.cat([torch.mm(d, b) for d, b in zip(dys, bs)], dim=1)  # [M, 3r]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dispatch.new_output(x2.shape, x2.dtype, x2.device)
            _launch_segmented_reduction(dys, ws, dyb, a_cat, dx, ctx.scale)
            dx = dx.view(ctx.x_shape)
        da = [None] * 3
        if any(ctx.needs_input_grad[4:7]):
            da_cat = torch.mm(dyb.t(), x2).mul_(ctx.scale)
            da = [da_cat[s * r:(s + 1) * r].to(ctx.a_dtypes[s]) for s in range(3)]
        db = [torch.mm(dys[s].t(), xa[:, s * r:(s + 1) * r]).mul_(ctx.scale).to(ctx.b_dtypes[s])
              if ctx.needs_input_grad[7 + s] else None for s in range(3)]
        return (dx, None, None, None, *da, *db, None)


def qkv_proj_torch(x: torch.Tensor, weights: Sequence[torch.Tensor], lora_as: Sequence[torch.Tensor],
                   lora_bs: Sequence[torch.Tensor], scale: float) -> tuple[torch.Tensor, ...]:
    """Plain-torch reference (and the CPU path): three LoRA linears."""
    return tuple(lora_linear_torch(x, w, a, b, scale) for w, a, b in zip(weights, lora_as, lora_bs))


def qkv_proj(x: torch.Tensor, weights: Sequence[torch.Tensor], lora_as: Sequence[torch.Tensor],
             lora_bs: Sequence[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., in] -> (q [..., nq], k [..., nk], v [..., nv]), each x W_s^T + scale (x A_s^T) B_s^T.

    weights = (Wq, Wk, Wv) frozen [n_s, in]; lora_as three [r, in] (same r); lora_bs [n_s, r].
    """
    if not (len(weights) == len(lora_as) == len(lora_bs) == 3):
        raise ValueError("qkv_proj takes three weights, three lora_as and three lora_bs")
    in_f, r = x.shape[-1], lora_as[0].shape[0]
    for w, a, b in zip(weights, lora_as, lora_bs):
        if w.shape[1] != in_f or a.shape != (r, in_f) or b.shape != (w.shape[0], r):
            raise ValueError(f"qkv_proj: weight {tuple(w.shape)}, lora_a {tuple(a.shape)}, lora_b "
                             f"{tuple(b.shape)} do not fit x [..., {in_f}] with one shared rank {r}")
        if w.requires_grad:
            raise ValueError("qkv_proj: base weights must be frozen (requires_grad=False)")
    if dispatch.use_triton(x, *weights, *lora_as, *lora_bs):
        return _QKVProjTriton.apply(x, *weights, *lora_as, *lora_bs, float(scale))
    return qkv_proj_torch(x, weights, lora_as, lora_bs, scale)
