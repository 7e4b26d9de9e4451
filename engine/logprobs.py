"""Per-token log-probs of a sequence under the model, without [tokens x vocab] float32 logits.

The final hidden states go through the LM head and a log-softmax over row chunks. Without autograd
(reference log-probs, evaluation) that is `triton_kernels.linear_logprob` (Triton on CUDA, chunked torch
elsewhere). In training on the torch path, `_HeadLogprobWithJacobian` instead forms each row's gradient
d logp / d h = W[target] - softmax(h W^T) W inside the forward while the chunk's logits are at hand:
two GEMMs over the vocabulary instead of three (no logits recomputation in the backward), and the
backward is one [N, H] row scaling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from triton_kernels import dispatch
from triton_kernels.linear_logprob import linear_logprob

from .errors import EngineError

# The torch training path walks the vocabulary in blocks of VOCAB_BLOCK head rows (16 MiB of float32
# weight at H = 1024, so a block stays in cache between its two GEMMs) for up to ROW_CHUNK token rows
# at a time: every GEMM keeps all the chunk's rows (efficient shapes) and no [rows, V] logits exist.
VOCAB_BLOCK = 4096
ROW_CHUNK = 2048


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


def head_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(hidden W^T)[targets], float32 [N]; hidden [N, H], weight [V, H] frozen, targets [N].
    Differentiable in hidden; see the module docstring for which path runs."""
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    if not needs_grad or hidden.dtype != torch.float32 or dispatch.use_triton(hidden, weight, targets):
        return linear_logprob(hidden, weight, targets)
    if targets.numel():
        low, high = torch.stack(torch.aminmax(targets)).tolist()
        if low < 0 or high >= weight.shape[0]:
            raise EngineError(f"token ids must lie in [0, {weight.shape[0]}) (the model's vocabulary); got "
                              f"{low}..{high}", field="targets")
    return _HeadLogprobWithJacobian.apply(hidden, weight, targets)


class _HeadLogprobWithJacobian(torch.autograd.Function):
    """float32 torch path. Per chunk of rows, an online log-sum-exp over vocabulary blocks W_b:
    z = h W_b^T; m' = max(m, max z); s = s e^(m - m') + sum e^(z - m'); acc = acc e^(m - m') + e^(z - m') W_b.
    Then lse = m + log s, logp = h . W[t] - lse and J = W[t] - acc / s (= W[t] - softmax W).
    Backward: grad_h = g[:, None] * J."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        N, V = hidden.shape[0], weight.shape[0]
        w_target = weight[targets]                                  # [N, H]
        logp = (hidden * w_target).sum(1)                           # target logits, then - lse
        jac = torch.zeros_like(hidden)                              # acc, then J
        rows = min(N, ROW_CHUNK)
        buf = hidden.new_empty(rows * min(V, VOCAB_BLOCK))
        for r0 in range(0, N, rows):
            h, acc = hidden[r0:r0 + rows], jac[r0:r0 + rows]
            m = h.new_full((h.shape[0],), float("-inf"))
            s = h.new_zeros(h.shape[0])
            for v0 in range(0, V, VOCAB_BLOCK):
                w = weight[v0:v0 + VOCAB_BLOCK]
                z = torch.mm(h, w.t(), out=buf[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0]))
                m_new = torch.maximum(m, z.amax(1))
                rescale = (m - m_new).exp_()
                e = z.sub_(m_new[:, None]).exp_()
                s.mul_(rescale).add_(e.sum(1))
                acc.mul_(rescale[:, None]).addmm_(e, w)
                m = m_new
            logp[r0:r0 + rows] -= m + s.log()
            acc.div_(s[:, None])
        torch.sub(w_target, jac, out=jac)
        ctx.save_for_backward(jac)
        return logp

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor):
        (jac,) = ctx.saved_tensors
        return jac * grad_logp[:, None], None, None
