"""The LoRA projection op: K linears sharing one input (K = 1 for o_proj or any LoRA linear, K = 3 for the
fused q/k/v), y_s = x W_s^T + scale (x A_s^T) B_s^T, optionally after the layer's RMSNorm.
Shapes: x [..., in], W_s [out_s, in] (frozen, no gradient), A_s [r, in], B_s [out_s, r]; y_s [..., out_s].

One dispatch, `lora_projections`: Triton on CUDA tensors, else the torch path CPU training runs
(`_LoRAProjections`, a hand-written backward). The kernel tests compare the two.

Triton path: xa = x A^T ([M, r], small, cuBLAS) then one GEMM kernel whose tile loop accumulates
x_tile W_tile^T and, after the K loop, scale * xa_tile B_tile^T into the same float32 accumulator, so
the LoRA term never makes a separate pass over y. The backward reuses that kernel for
dx = dy W + scale (dy B) A; dA = scale (dy B)^T x and dB = scale dy^T xa are skinny GEMMs (cuBLAS).
For q/k/v the three A's are stacked into A_cat [3r, in] (xa = x A_cat^T is one skinny GEMM) and the same
kernel runs with three column segments (one launch writes q, k and v, each contiguous: no split copy);
the backward dx = sum_s dy_s W_s + scale [dy_q B_q | dy_k B_k | dy_v B_v] A_cat is one kernel whose
reduction runs over the three segments in turn and then over the 3r low-rank columns.
Compute dtype is x's dtype: W, A, B are cast to it (no copy when they match) and dA, dB come back in
the adapters' own dtypes.
"""
from __future__ import annotations

from typing import Sequence

import torch

from triton_kernels import dispatch
from triton_kernels._triton import dot_precision, interpreting, jit, next_pow2, tl, triton
from triton_kernels.torch_path import cast_weight, inv_rms, norm_backward, normed, recording, rms_norm, serial

# Production tile sizes for bf16 on Hopper (128x128 tiles, wgmma); tests shrink them.
GEMM_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}
# float32 operands need twice the shared memory per stage.
GEMM_CONFIG_FP32 = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


@jit
def _lowrank_gemm_kernel(
    X, Y0, Y1, Y2, U, V0, V1, V2, C0, C1, C2,
    M, K, R, N0, N1, N2, scale,
    stride_xm, stride_xk, stride_yk, stride_yn, stride_um, stride_ur, stride_vr, stride_vn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """C_s[M, N_s] = X[M, K] Y_s[K, N_s] + scale * U[:, s*R:(s+1)*R] V_s[R, N_s], for s = 0..2.

    Up to three column segments share X (the q/k/v projections share x); unused segments have N_s = 0.
    Each C_s is contiguous (row stride N_s); Y_s and V_s share strides.
    """
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    t0 = (N0 + BLOCK_N - 1) // BLOCK_N
    t1 = (N1 + BLOCK_N - 1) // BLOCK_N
    tiles_n = t0 + t1 + (N2 + BLOCK_N - 1) // BLOCK_N
    # Grouped order: GROUP_M row tiles sweep the column tiles together, so W tiles are reused in L2.
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    # Which segment this column tile belongs to (tiles never straddle two segments). Integers are
    # selected arithmetically: an int argument equal to 1 is specialised to a constant by Triton, and
    # branches yielding different constants would not type-check; pointers are never specialised.
    in_1 = pid_n >= t0
    in_2 = pid_n >= t0 + t1
    N = tl.where(in_2, N2, tl.where(in_1, N1, N0))
    tile_n = pid_n - tl.where(in_2, t0 + t1, tl.where(in_1, t0, 0))
    u_col = R * (in_1.to(tl.int32) + in_2.to(tl.int32))
    if in_2:
        Y = Y2
        V = V2
        C = C2
    elif in_1:
        Y = Y1
        V = V1
        C = C1
    else:
        Y = Y0
        V = V0
        C = C0

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped indices load valid memory for the ragged last tiles; the store mask drops those rows.
    rm_in = rm % M
    rn_in = rn % N
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm_in[:, None] * stride_xm + rk[None, :] * stride_xk
    y_ptrs = Y + rk[:, None] * stride_yk + rn_in[None, :] * stride_yn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            y = tl.load(y_ptrs)
        else:
            x = tl.load(x_ptrs, mask=rk[None, :] < K - k0, other=0.0)
            y = tl.load(y_ptrs, mask=rk[:, None] < K - k0, other=0.0)
        if UPCAST:  # the interpreter's tl.dot mishandles bf16; float32 products of bf16 are exact
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, y, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        y_ptrs += BLOCK_K * stride_yk

    rr = tl.arange(0, BLOCK_R)
    u = tl.load(U + rm_in[:, None] * stride_um + (u_col + rr)[None, :] * stride_ur,
                mask=rr[None, :] < R, other=0.0)
    v = tl.load(V + rr[:, None] * stride_vr + rn_in[None, :] * stride_vn, mask=rr[:, None] < R, other=0.0)
    if UPCAST:
        u = u.to(tl.float32)
        v = v.to(tl.float32)
    acc += scale * tl.dot(u, v, input_precision=PRECISION)

    c_ptrs = C + rm[:, None] * N + rn[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def gemm_config(dtype: torch.dtype) -> dict:
    return GEMM_CONFIG_FP32 if dtype == torch.float32 else GEMM_CONFIG


def launch_lowrank_gemm(x: torch.Tensor, ys: Sequence[torch.Tensor], u: torch.Tensor,
                        vs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], scale: float) -> None:
    """outs[s] = x @ ys[s] + scale * u[:, s*R:(s+1)*R] @ vs[s] in one launch (1 to 3 segments).

    x [M, K]; ys[s] [K, N_s] (any strides, e.g. W.t()); u [M, S*R]; vs[s] [R, N_s]; outs[s] [M, N_s]
    contiguous. All segments' ys (and vs) must share strides.
    """
    segments = len(ys)
    if not 1 <= segments <= 3 or len(vs) != segments or len(outs) != segments:
        raise ValueError("launch_lowrank_gemm takes 1 to 3 matching segments")
    if len({y.stride() for y in ys}) != 1 or len({v.stride() for v in vs}) != 1:
        raise ValueError("segment weights must share strides (make them contiguous)")
    M, K = x.shape
    R = vs[0].shape[0]
    ns = [o.shape[1] for o in outs] + [0] * (3 - segments)
    pad = lambda seq: list(seq) + [seq[0]] * (3 - segments)  # noqa: E731 - unused slots
    cfg = gemm_config(x.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * sum(triton.cdiv(n, cfg["BLOCK_N"]) for n in ns),)
    if grid[0] == 0:
        return
    _lowrank_gemm_kernel[grid](
        x, *pad(ys), u, *pad(vs), *pad(outs),
        M, K, R, *ns, float(scale),
        x.stride(0), x.stride(1), ys[0].stride(0), ys[0].stride(1),
        u.stride(0), u.stride(1), vs[0].stride(0), vs[0].stride(1),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=next_pow2(R),
        GROUP_M=cfg["GROUP_M"], EVEN_K=K % cfg["BLOCK_K"] == 0, PRECISION=dot_precision(x.dtype),
        UPCAST=interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


class _LoRALinearTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        xa = torch.mm(x2, a.t())
        y = dispatch.new_output((x2.shape[0], w.shape[0]), dtype, x.device)
        launch_lowrank_gemm(x2, [w.t()], xa, [b.t()], [y], scale)
        ctx.save_for_backward(x2, w, a, b, xa)
        ctx.scale, ctx.x_shape, ctx.dtypes = scale, x.shape, (lora_a.dtype, lora_b.dtype)
        return y.view(*lead, w.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w, a, b, xa = ctx.saved_tensors
        dy2 = dy.reshape(-1, w.shape[0]).to(x2.dtype)
        dyb = torch.mm(dy2, b)  # [M, r]
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = dispatch.new_output(x2.shape, x2.dtype, x2.device)
            launch_lowrank_gemm(dy2, [w], dyb, [a], [dx], ctx.scale)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            da = torch.mm(dyb.t(), x2).mul_(ctx.scale).to(ctx.dtypes[0])
        if ctx.needs_input_grad[3]:
            db = torch.mm(dy2.t(), xa).mul_(ctx.scale).to(ctx.dtypes[1])
        return dx, None, da, db, None


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
                x2 = normed(h, rstd, norm_w).reshape(-1, h.shape[-1])
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
                    dx, d_norm_w = norm_backward(dx.float(), h.float(), rstd, norm_w.float(), want_norm_w)
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
            rstd = inv_rms(h.float(), eps)
            x = normed(h, rstd, norm_w)
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


def lora_projections_torch(x: torch.Tensor, weights: tuple[torch.Tensor, ...], lora_as: tuple[torch.Tensor, ...],
                           lora_bs: tuple[torch.Tensor, ...], scale: float,
                           norm: tuple[torch.Tensor, float] | None = None) -> tuple[torch.Tensor, ...]:
    """x [..., in] -> K outputs [..., out_s] = x W_s^T + scale (x A_s^T) B_s^T; weights frozen [out_s, in],
    lora_as [r, in] (one shared r), lora_bs [out_s, r]. Gradients for x and every A, B.
    norm=(weight [in], eps): x is first RMS-normed (`rms_norm(x, weight, eps)`), inside the same node.
    The torch path of `lora_projections`."""
    extra = (norm[0],) if norm is not None else ()
    eps = float(norm[1]) if norm is not None else 0.0
    tensors = (*weights, *lora_as, *lora_bs, *extra)
    if not recording(x, *tensors):
        return _lora_projections_forward(x, float(scale), len(weights), eps, tensors)[0]
    return _LoRAProjections.apply(x, float(scale), len(weights), eps, *tensors)


def lora_projections(x: torch.Tensor, weights: tuple[torch.Tensor, ...], lora_as: tuple[torch.Tensor, ...],
                     lora_bs: tuple[torch.Tensor, ...], scale: float,
                     norm: tuple[torch.Tensor, float] | None = None) -> tuple[torch.Tensor, ...]:
    """The op's one dispatch: x [..., in] -> K outputs [..., out_s] (shapes as `lora_projections_torch`).
    Triton: one launch each way (`_LoRALinearTriton` per projection, `_QKVProjTriton` for three), the norm
    as its own op in front; torch: `lora_projections_torch`, the norm inside the same node."""
    if not dispatch.use_triton(x, *weights, *lora_as, *lora_bs):
        return lora_projections_torch(x, weights, lora_as, lora_bs, scale, norm=norm)
    if norm is not None:
        x = rms_norm(x, norm[0], float(norm[1]))
    if len(weights) == 3:
        return _QKVProjTriton.apply(x, *weights, *lora_as, *lora_bs, float(scale))
    return tuple(_LoRALinearTriton.apply(x, w, a, b, float(scale)) for w, a, b in zip(weights, lora_as, lora_bs))


def lora_linear_torch(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """One LoRA linear on the torch path (`lora_projections_torch` with K = 1)."""
    return lora_projections_torch(x, (weight,), (lora_a,), (lora_b,), scale)[0]


def qkv_proj_torch(x: torch.Tensor, weights: Sequence[torch.Tensor], lora_as: Sequence[torch.Tensor],
                   lora_bs: Sequence[torch.Tensor], scale: float) -> tuple[torch.Tensor, ...]:
    """The q/k/v projections on the torch path (`lora_projections_torch` with K = 3)."""
    return lora_projections_torch(x, tuple(weights), tuple(lora_as), tuple(lora_bs), scale)


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    out_f, in_f = weight.shape
    r = lora_a.shape[0]
    if x.shape[-1] != in_f or lora_a.shape != (r, in_f) or lora_b.shape != (out_f, r):
        raise ValueError(f"lora_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_a "
                         f"{tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)} do not fit "
                         "x [..., in], weight [out, in], lora_a [r, in], lora_b [out, r]")


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float) -> torch.Tensor:
    """x [..., in] -> x W^T + scale (x A^T) B^T [..., out]; gradients for x, A, B (W is frozen)."""
    _check_shapes(x, weight, lora_a, lora_b)
    if weight.requires_grad:
        raise ValueError("lora_linear: the base weight must be frozen (requires_grad=False)")
    return lora_projections(x, (weight,), (lora_a,), (lora_b,), scale)[0]


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
    return lora_projections(x, tuple(weights), tuple(lora_as), tuple(lora_bs), scale)
