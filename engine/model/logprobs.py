"""Per-token log-probs of a sequence under the model, without [tokens x vocab] float32 logits.

The final hidden states go through the LM head and a log-softmax over row chunks. Without autograd
(reference log-probs, evaluation) that is `triton_kernels.linear_logprob` (Triton on CUDA, chunked torch
elsewhere), except for a compacted head on the torch path, which goes through the blockwise loop below
without its Jacobian. In training on the torch path, `_HeadLogprobWithJacobian` instead forms each row's gradient
d logp / d h = W[target] - softmax(h W^T) W inside the forward while the chunk's logits are at hand:
two GEMMs over the vocabulary instead of three (no logits recomputation in the backward), and the
backward is one [N, H] row scaling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from triton_kernels import dispatch
from triton_kernels.linear_logprob import linear_logprob

from engine.errors import EngineError
from engine.model.frozen import workspace

# The torch training path walks the vocabulary in blocks, all of a chunk's token rows at once (every
# GEMM keeps the full row count: efficient shapes), with one [rows, block] float32 logits buffer of at
# most this many bytes. Measured on the 0.6B head at 384 scored rows (BENCHMARKS.md): 8 MiB (28 blocks)
# beat one 233 MB block by ~10% per step and keeps the step's peak ~0.2 GiB lower.
HEAD_BUFFER_BYTES = 8 * 2**20
MIN_VOCAB_BLOCK = 4096


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   score_mask: torch.Tensor | None = None) -> torch.Tensor:
    """input_ids [B, T] -> [B, T] float32 where position t holds log p(input_ids[t] | input_ids[<t]).

    Position 0 (no context) holds 0. With `score_mask` [B, T] bool only those positions are scored
    (the rest hold 0): the lm_head runs on completion tokens only, not on the prompt.
    """
    hidden, _ = model.forward_hidden(input_ids, attention_mask)
    return hidden_logprobs(model, hidden, input_ids, attention_mask, score_mask)


def hidden_logprobs(model, hidden: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None,
                    score_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The lm_head + log-softmax half of `token_logprobs`: final-normed hidden [B, T, H] -> [B, T]
    float32 (split out so the training-step profiler can time the two halves apart)."""
    B, T, H = hidden.shape
    want = torch.zeros(B, T, dtype=torch.bool, device=input_ids.device)
    want[:, 1:] = True if score_mask is None else score_mask[:, 1:].bool()
    if attention_mask is not None:
        want &= attention_mask.bool()
    # The hidden state at t - 1 predicts the token at t.
    rows, cols = want.nonzero(as_tuple=True)
    h, targets, weight = hidden[rows, cols - 1], input_ids[rows, cols], model.lm_head.weight
    if weight.requires_grad:
        # Full-parameter training (the embedded base model, small vocabulary): the head learns too.
        picked = F.log_softmax(F.linear(h, weight).float(), -1).gather(-1, targets[:, None])[:, 0]
    else:
        picked = head_logprob(h, weight, targets)
    out = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
    return out.index_put((rows, cols), picked.float())


def head_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 buffer_bytes: int = HEAD_BUFFER_BYTES) -> torch.Tensor:
    """log softmax(hidden W^T)[targets], float32 [N]; hidden [N, H], weight [V, H] frozen, targets [N].
    Differentiable in hidden; see the module docstring for which path runs. `buffer_bytes` bounds the
    torch path's logits buffer."""
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
