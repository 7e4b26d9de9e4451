"""Per-token log-probabilities through the LM head without materialising [N, V] logits.

logp[n] = log_softmax(hidden[n] @ W^T)[targets[n]]; hidden [..., H], W [V, H] (frozen), targets [...]
long in [0, V). Accumulation (logits, log-sum-exp, entropy) is float32 for every input dtype.

Triton forward: a GEMM-shaped kernel; program (row block, vocab split) walks its vocabulary range in
BLOCK_V chunks, computing the logit tile in float32 and folding it into an online log-sum-exp (running
max m, rescaled sum s), the target's logit and, for the entropy, the rescaled sum of p*z. Splits run
next to each other (split index fastest), so concurrent programs share the row block's hidden tile and
read different W chunks: W streams through L2 about once per wave. torch combines the [splits, N]
partials. Triton backward: per chunk of `chunk_size` token rows, a GEMM kernel whose epilogue turns the
logit tile into dlogits = g * (onehot(target) - exp(z - lse)) (stored in hidden's dtype), then
grad_hidden = dlogits @ W by cuBLAS. Memory: chunk_size x V of dlogits, never N x V.

Torch paths (CPU). `linear_logprob`: row chunks of [chunk, V] float32 logits, recomputed in the backward
(reference log-probs, evaluation, entropies). `head_logprob` (what training calls) on float32 takes the
blockwise loop `_online_head` instead, all of a chunk's rows against one vocabulary block at a time; with
autograd recording, `_HeadLogprobWithJacobian` forms each row's gradient d logp / d h = W[target] -
softmax(h W^T) W inside the forward while the block's logits are at hand: two GEMMs over the vocabulary
instead of three (no logits recomputation in the backward), and the backward is one [N, H] row scaling.
A compacted (narrow-stored) head also takes the blockwise loop without autograd, cast block by block.

Entropy (return_entropy=True) is returned detached: the losses here need only logp, and the token
probability exp(logp) (return_prob=True) is computed from logp so it does carry gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.errors import EngineError
from triton_kernels import dispatch
from triton_kernels._triton import dot_precision, interpreting, jit, tl, triton
from triton_kernels.torch_path import workspace

# Production tiles for bf16 on Hopper; tests shrink them. SPLITS_MIN: vocabulary splits per row block.
FWD_CONFIG = {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "SPLITS_MIN": 16, "num_warps": 8, "num_stages": 3}
BWD_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}
# Bytes allowed for one chunk of materialised logits (torch path) or dlogits (Triton backward).
CHUNK_BYTES = 256 * 2**20
# The torch training path walks the vocabulary in blocks, all of a chunk's token rows at once (every
# GEMM keeps the full row count: efficient shapes), with one [rows, block] float32 logits buffer of at
# most this many bytes. Measured on the 0.6B head at 384 scored rows (BENCHMARKS.md): 8 MiB (28 blocks)
# beat one 233 MB block by ~10% per step and keeps the step's peak ~0.2 GiB lower.
HEAD_BUFFER_BYTES = 8 * 2**20
MIN_VOCAB_BLOCK = 4096


@jit
def _logprob_fwd_kernel(
    HID, W, TGT, PM, PS, PZ, PT,
    N, V, H, splits, vocab_per_split,
    stride_hn, stride_hh, stride_wv, stride_wh,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, ENTROPY: tl.constexpr,
    EVEN_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Partials [splits, N] for rows of this block over vocab [split*vps, (split+1)*vps):
    PM running max, PS sum exp(z - PM), PZ target logit (0 when the target is elsewhere),
    PT sum exp(z - PM) * z (entropy only)."""
    pid = tl.program_id(0)
    split = pid % splits  # fastest: concurrent programs share a row block, see module docstring
    rn = (pid // splits) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rn < N
    rn_in = rn % N
    tgt = tl.load(TGT + rn_in)
    v_start = split * vocab_per_split
    v_end = min(V, v_start + vocab_per_split)
    rh = tl.arange(0, BLOCK_H)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    pz = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        rv = v0 + tl.arange(0, BLOCK_V)
        rv_in = rv % V
        h_ptrs = HID + rn_in[:, None] * stride_hn + rh[None, :] * stride_hh
        w_ptrs = W + rh[:, None] * stride_wh + rv_in[None, :] * stride_wv
        z = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for h0 in range(0, H, BLOCK_H):
            if EVEN_H:
                a = tl.load(h_ptrs)
                b = tl.load(w_ptrs)
            else:
                a = tl.load(h_ptrs, mask=rh[None, :] < H - h0, other=0.0)
                b = tl.load(w_ptrs, mask=rh[:, None] < H - h0, other=0.0)
            if UPCAST:  # the interpreter's tl.dot mishandles bf16
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            z = tl.dot(a, b, z, input_precision=PRECISION)
            h_ptrs += BLOCK_H * stride_hh
            w_ptrs += BLOCK_H * stride_wh
        in_range = (rv < v_end)[None, :]
        zt += tl.sum(tl.where(rv[None, :] == tgt[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(tl.where(in_range, z, float("-inf")), axis=1))
        rescale = tl.exp(m - m_new)
        p = tl.where(in_range, tl.exp(z - m_new[:, None]), 0.0)
        s = s * rescale + tl.sum(p, axis=1)
        if ENTROPY:
            pz = pz * rescale + tl.sum(p * z, axis=1)
        m = m_new
    out = split * N + rn
    tl.store(PM + out, m, mask=row_ok)
    tl.store(PS + out, s, mask=row_ok)
    tl.store(PZ + out, zt, mask=row_ok)
    if ENTROPY:
        tl.store(PT + out, pz, mask=row_ok)


@jit
def _dlogits_kernel(
    HID, W, TGT, LSE, GRAD, DZ,
    M, V, H,
    stride_hn, stride_hh, stride_wv, stride_wh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """DZ[M, V] = GRAD[:, None] * (onehot(TGT) - exp(HID W^T - LSE[:, None])), DZ contiguous."""
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    tiles_n = (V + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rv = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_in = rm % M
    rk = tl.arange(0, BLOCK_K)
    h_ptrs = HID + rm_in[:, None] * stride_hn + rk[None, :] * stride_hh
    w_ptrs = W + rk[:, None] * stride_wh + (rv % V)[None, :] * stride_wv
    z = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(h_ptrs)
            b = tl.load(w_ptrs)
        else:
            a = tl.load(h_ptrs, mask=rk[None, :] < H - k0, other=0.0)
            b = tl.load(w_ptrs, mask=rk[:, None] < H - k0, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        z = tl.dot(a, b, z, input_precision=PRECISION)
        h_ptrs += BLOCK_K * stride_hh
        w_ptrs += BLOCK_K * stride_wh
    lse = tl.load(LSE + rm_in)
    g = tl.load(GRAD + rm_in)
    tgt = tl.load(TGT + rm_in)
    onehot = (rv[None, :] == tgt[:, None]).to(tl.float32)
    dz = g[:, None] * (onehot - tl.exp(z - lse[:, None]))
    tl.store(DZ + rm[:, None].to(tl.int64) * V + rv[None, :], dz.to(DZ.dtype.element_ty),
             mask=(rm[:, None] < M) & (rv[None, :] < V))


def _chunk_rows(chunk_size: int | None, vocab: int, bytes_per_elem: int) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, CHUNK_BYTES // (vocab * bytes_per_elem))


def _forward_triton(hidden, weight, targets, want_entropy: bool):
    """(logp [N], lse [N], entropy [N] | None), float32."""
    (N, H), V = hidden.shape, weight.shape[0]
    cfg = FWD_CONFIG
    row_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    vocab_blocks = triton.cdiv(V, cfg["BLOCK_V"])
    splits = min(vocab_blocks, max(cfg["SPLITS_MIN"], triton.cdiv(2 * _sm_count(hidden.device), row_blocks)))
    vocab_per_split = triton.cdiv(vocab_blocks, splits) * cfg["BLOCK_V"]
    splits = triton.cdiv(V, vocab_per_split)  # every split non-empty
    parts = [dispatch.new_output((splits, N), torch.float32, hidden.device)
             for _ in range(4 if want_entropy else 3)]
    pm, ps, pz = parts[:3]
    _logprob_fwd_kernel[(row_blocks * splits,)](
        hidden, weight, targets, pm, ps, pz, parts[3] if want_entropy else pz,
        N, V, H, splits, vocab_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"], ENTROPY=want_entropy,
        EVEN_H=H % cfg["BLOCK_H"] == 0, PRECISION=dot_precision(hidden.dtype), UPCAST=interpreting(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    m = pm.max(0).values
    weights = torch.exp(pm - m)
    total = (ps * weights).sum(0)
    lse = m + total.log()
    logp = pz.sum(0) - lse
    entropy = lse - (parts[3] * weights).sum(0) / total if want_entropy else None
    return logp, lse, entropy


def _backward_triton(hidden, weight, targets, lse, grad, chunk_size):
    (N, H), V = hidden.shape, weight.shape[0]
    cfg = BWD_CONFIG
    grad_hidden = dispatch.new_output((N, H), hidden.dtype, hidden.device)
    rows = min(_chunk_rows(chunk_size, V, hidden.element_size()), N)
    dz_buf = torch.empty((rows, V), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        dz = dz_buf[: stop - start]
        if dispatch.poisoning():
            dz.fill_(float("nan"))
        grid = (triton.cdiv(stop - start, cfg["BLOCK_M"]) * triton.cdiv(V, cfg["BLOCK_N"]),)
        h = hidden[start:stop]
        _dlogits_kernel[grid](
            h, weight, targets[start:stop], lse[start:stop], grad[start:stop], dz,
            stop - start, V, H, h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
            EVEN_K=H % cfg["BLOCK_K"] == 0, PRECISION=dot_precision(hidden.dtype), UPCAST=interpreting(),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        torch.mm(dz, weight, out=grad_hidden[start:stop])
    return grad_hidden


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one by one; fewer splits exercise the online rescaling


class _LinearLogprobTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, want_entropy: bool, chunk_size):
        logp, lse, entropy = _forward_triton(hidden, weight, targets, want_entropy)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        if entropy is None:
            return logp, lse.new_empty(0)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad = _backward_triton(hidden, weight, targets, lse, grad_logp.float().contiguous(), ctx.chunk_size)
        return grad, None, None, None, None


def _chunk_stats(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, want_entropy: bool):
    """float32 logits of one row chunk -> (logp, lse, entropy | None)."""
    z = F.linear(h, weight).float()
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, targets[:, None]).squeeze(1) - lse
    entropy = None
    if want_entropy:
        entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, lse, entropy


class _LinearLogprobTorch(torch.autograd.Function):
    """Row-chunked plain torch: [chunk, V] logits at a time, recomputed in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, want_entropy: bool, chunk_size):
        N = hidden.shape[0]
        rows = _chunk_rows(chunk_size, weight.shape[0], 4)
        logp = hidden.new_empty(N, dtype=torch.float32)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if want_entropy else lse.new_empty(0)
        for start in range(0, N, rows):
            sl = slice(start, start + rows)
            logp[sl], lse[sl], ent = _chunk_stats(hidden[sl], weight, targets[sl], want_entropy)
            if want_entropy:
                entropy[sl] = ent
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.rows = rows
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], ctx.rows):
            sl = slice(start, start + ctx.rows)
            g = grad_logp[sl].float()
            # dlogits = g * (onehot - softmax), built in place in the recomputed logits' buffer
            dz = F.linear(hidden[sl], weight).float().sub_(lse[sl, None]).exp_().mul_(-g[:, None])
            dz.scatter_add_(1, targets[sl, None], g[:, None])
            torch.mm(dz.to(weight.dtype), weight, out=grad_hidden[sl])
        return grad_hidden, None, None, None, None


def linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   chunk_size: int | None = None, return_entropy: bool = False, return_prob: bool = False):
    """log softmax(hidden W^T)[targets] as float32 [...], differentiable in hidden.

    hidden [..., H]; weight [V, H] (frozen); targets [...] integer ids in [0, V). chunk_size: token rows
    per materialised [chunk, V] block (torch path logits, Triton backward dlogits); default fits
    CHUNK_BYTES. Returns logp, or (logp, [entropy], [prob]) with the requested extras in that order;
    entropy is detached (module docstring), prob = exp(logp) carries gradient.
    """
    lead, H = hidden.shape[:-1], hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or targets.shape != lead:
        raise ValueError(f"linear_logprob: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets "
                         f"{tuple(targets.shape)} do not fit hidden [..., H], weight [V, H], targets [...]")
    if weight.requires_grad:
        raise ValueError("linear_logprob: the LM head weight must be frozen (requires_grad=False)")
    V = weight.shape[0]
    h2, t1 = hidden.reshape(-1, H), targets.reshape(-1).long()
    if t1.numel():
        low, high = torch.stack(torch.aminmax(t1)).tolist()  # one device sync
        if low < 0 or high >= V:
            raise EngineError(f"token ids must lie in [0, {V}) (the model's vocabulary); got {low}..{high}",
                              field="targets")
    w = weight.to(hidden.dtype)
    if h2.shape[0] and dispatch.use_triton(hidden, weight, targets):
        logp, entropy = _LinearLogprobTriton.apply(h2, w, t1.contiguous(), return_entropy, chunk_size)
    else:
        logp, entropy = _LinearLogprobTorch.apply(h2, w, t1, return_entropy, chunk_size)
    logp = logp.view(lead)
    if not (return_entropy or return_prob):
        return logp
    extras = ([entropy.view(lead)] if return_entropy else []) + ([logp.exp()] if return_prob else [])
    return (logp, *extras)


def head_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 buffer_bytes: int = HEAD_BUFFER_BYTES) -> torch.Tensor:
    """log softmax(hidden W^T)[targets], float32 [N]; hidden [N, H], weight [V, H] frozen, targets [N].
    Differentiable in hidden. The op's dispatch as the model calls it: Triton on CUDA, else (float32)
    the blockwise torch loop, with the Jacobian formed in the forward when autograd records, or the
    row-chunked torch path of `linear_logprob` (module docstring). `buffer_bytes` bounds the blockwise
    loop's logits buffer."""
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    # Without autograd the torch path is linear_logprob's, unless the head is stored narrower than the
    # compute dtype (compacted): that one would cast the whole [V, H] head per call (0.6 GB for Qwen3),
    # where the blockwise loop below casts one vocabulary block at a time.
    blockwise = needs_grad or weight.dtype != hidden.dtype
    if not blockwise or hidden.dtype != torch.float32 or dispatch.use_triton(hidden, weight, targets):
        return linear_logprob(hidden, weight, targets)
    if targets.numel():
        low, high = torch.stack(torch.aminmax(targets)).tolist()
        if low < 0 or high >= weight.shape[0]:
            raise EngineError(f"token ids must lie in [0, {weight.shape[0]}) (the model's vocabulary); got "
                              f"{low}..{high}", field="targets")
    N, V = hidden.shape[0], weight.shape[0]
    elems = max(buffer_bytes // 4, MIN_VOCAB_BLOCK)
    block = min(V, max(MIN_VOCAB_BLOCK, elems // max(N, 1)))
    rows = max(1, min(N, elems // block))
    if not needs_grad:
        return _online_head(hidden, weight, targets, rows, block, jacobian=False)[0]
    return _HeadLogprobWithJacobian.apply(hidden, weight, targets, rows, block)


def _online_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int, block: int,
                 jacobian: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per chunk of `rows` token rows, an online log-sum-exp over vocabulary blocks W_b of `block` rows:
    z = h W_b^T; m' = max(m, max z); s = s e^(m - m') + sum e^(z - m'); with `jacobian` also
    acc = acc e^(m - m') + e^(z - m') W_b. Then lse = m + log s, logp = h . W[t] - lse and
    J = W[t] - acc / s (= W[t] - softmax W). Returns (logp [N], J [N, H] or None)."""
    N, V = hidden.shape[0], weight.shape[0]
    w_target = weight[targets].to(hidden.dtype)                 # [N, H]
    logp = (hidden * w_target).sum(1)                           # target logits, then - lse
    jac = torch.empty_like(hidden) if jacobian else None        # acc, then J
    buf = hidden.new_empty(min(rows, N) * min(block, V))
    # A compacted (bf16-stored) head is cast block by block into the shared cast workspace.
    cast = workspace(min(block, V) * weight.shape[1], hidden.dtype, hidden.device).view(-1, weight.shape[1]) \
        if weight.dtype != hidden.dtype else None
    for r0 in range(0, N, rows):
        h = hidden[r0:r0 + rows]
        acc = jac[r0:r0 + rows] if jac is not None else None
        n = h.shape[0]
        for v0 in range(0, V, block):
            w = weight[v0:v0 + block]
            if cast is not None:
                w = cast[:w.shape[0]].copy_(w)
            z = torch.mm(h, w.t(), out=buf[: n * w.shape[0]].view(n, w.shape[0]))
            if v0 == 0:
                m = z.amax(1)
                e = z.sub_(m[:, None]).exp_()
                s = e.sum(1)
                if acc is not None:
                    torch.mm(e, w, out=acc)
                continue
            m_new = torch.maximum(m, z.amax(1))
            rescale = (m - m_new).exp_()
            e = z.sub_(m_new[:, None]).exp_()
            s = s.mul_(rescale).add_(e.sum(1))
            if acc is not None:
                acc.mul_(rescale[:, None]).addmm_(e, w)
            m = m_new
        logp[r0:r0 + rows] -= m + s.log()
        if acc is not None:
            acc.div_(s[:, None])
    if jac is not None:
        torch.sub(w_target, jac, out=jac)
    return logp, jac


class _HeadLogprobWithJacobian(torch.autograd.Function):
    """float32 torch path: `_online_head` with the Jacobian formed in the forward. Backward:
    grad_h = g[:, None] * J."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int, block: int):
        logp, jac = _online_head(hidden, weight, targets, rows, block, jacobian=True)
        ctx.save_for_backward(jac)
        return logp

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor):
        (jac,) = ctx.saved_tensors
        return jac * grad_logp[:, None], None, None, None, None
