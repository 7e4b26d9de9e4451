"""LoRA linear layer: y = x W^T + scale (x A^T) B^T, with the low-rank term fused into the GEMM.

Shapes: x [..., in], W [out, in] (frozen, no gradient), A [r, in], B [out, r]; y [..., out].

Triton path: xa = x A^T ([M, r], small, cuBLAS) then one GEMM kernel whose tile loop accumulates
x_tile W_tile^T and, after the K loop, scale * xa_tile B_tile^T into the same float32 accumulator, so
the LoRA term never makes a separate pass over y. The backward reuses that kernel for
dx = dy W + scale (dy B) A; dA = scale (dy B)^T x and dB = scale dy^T xa are skinny GEMMs (cuBLAS).
The same kernel with three column segments is the fused q/k/v projection (`qkv_proj.py`).

Compute dtype is x's dtype: W, A, B are cast to it (no copy when they match) and dA, dB come back in
the adapters' own dtypes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from triton_kernels import dispatch
from triton_kernels._triton import dot_precision, interpreting, jit, next_pow2, tl, triton

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


def lora_linear_torch(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Plain-torch reference (and the CPU path): two GEMMs and one addmm, autograd does the rest."""
    dtype = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    xa = F.linear(x2, lora_a.to(dtype))
    y = torch.addmm(F.linear(x2, weight.to(dtype)), xa, lora_b.to(dtype).t(), alpha=scale)
    return y.view(*x.shape[:-1], weight.shape[0])


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
    if dispatch.use_triton(x, weight, lora_a, lora_b):
        return _LoRALinearTriton.apply(x, weight, lora_a, lora_b, float(scale))
    return lora_linear_torch(x, weight, lora_a, lora_b, scale)
