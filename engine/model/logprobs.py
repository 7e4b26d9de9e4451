"""Per-token log-probs of a sequence under the model, without [tokens x vocab] float32 logits.

This picks the scored positions and their targets; the LM head + log-softmax itself is the fused op
`triton_kernels.linear_logprob` (`head_logprob`: Triton on CUDA, the torch paths CPU runs elsewhere).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from triton_kernels.linear_logprob import head_logprob


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
