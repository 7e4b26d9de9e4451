"""Offline GRPO, the study's form: A_i = r_i - mean_{j in g(i)} r_j + b, L = -sum m A s / sum m.

Defaults: b = 0.1 for every group, no std division, no importance ratio, no clipping, no KL. Options:
- std_scale: A = (r - mean) / (std + 1e-4) + b with the Bessel-corrected group std.
- bias_scope "all_correct": only groups whose every rollout has reward 1 get b.
- clip_eps: PPO-style -min(rho A, clip(rho, 1 - eps, 1 + eps) A) per token, rho = exp(s - behavior_logps).
- kl_beta: + kl_beta * (exp(ref - s) - (ref - s) - 1) per token (k3 estimator) against ref_logps.
A group whose rewards are all equal (or with a single rollout) gets exactly A = b (or 0 without bias).
Micro-batches hold whole groups, so the group mean here is the exact one.
"""
from __future__ import annotations

import torch

from losses.base import (LossInputError, LossInputs, aggregate, all_rows_normalizer, check_choice,
                         check_number, compute_dtype, finish, group_index, group_sum, masked, require)

BIAS_SCOPES = ("all", "all_correct")
STD_EPS = 1e-4

normalizer = all_rows_normalizer


def advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, bias: float = 0.1,
               std_scale: bool = False, bias_scope: str = "all") -> tuple[torch.Tensor, dict]:
    """[N] float64 advantages from [N] rewards and [N] group ids, plus group counts for logging."""
    check_choice("bias_scope", bias_scope, BIAS_SCOPES)
    inverse, n_groups = group_index(group_ids)
    r = rewards.to(torch.float64)
    count = torch.bincount(inverse, minlength=n_groups).to(torch.float64)
    mean = group_sum(r, inverse, n_groups) / count
    high = torch.full((n_groups,), -torch.inf, dtype=r.dtype, device=r.device)
    low = torch.full((n_groups,), torch.inf, dtype=r.dtype, device=r.device)
    high = high.scatter_reduce(0, inverse, r, "amax")
    low = low.scatter_reduce(0, inverse, r, "amin")
    # Exact zero for equal-reward groups: r - mean can be off by an ulp, which std division would blow up.
    equal = high == low
    centered = torch.where(equal[inverse], torch.zeros_like(r), r - mean[inverse])
    if std_scale:
        variance = group_sum(centered * centered, inverse, n_groups) / (count - 1).clamp_min(1)
        centered = centered / (variance.sqrt()[inverse] + STD_EPS)
    gets_bias = equal & (low == 1) if bias_scope == "all_correct" else torch.ones_like(equal)
    adv = centered + bias * gets_bias[inverse].to(r.dtype)
    return adv, {"groups": n_groups, "equal_reward_groups": int(equal.sum()),
                 "bias_groups": int(gets_bias.sum())}


def loss(inputs: LossInputs, *, bias: float = 0.1, std_scale: bool = False, bias_scope: str = "all",
         clip_eps: float | None = None, kl_beta: float | None = None,
         aggregation: str = "token_mean") -> tuple[torch.Tensor, dict]:
    """Advantage-weighted NLL over all rollouts. Returns (scalar loss, stats)."""
    bias = check_number("bias", bias)
    if not isinstance(std_scale, bool):
        raise LossInputError(f"expected true or false, got {std_scale!r}", field="std_scale")
    dtype = compute_dtype(inputs.logps)
    mask = inputs.mask
    s = masked(inputs.logps, mask, dtype)
    adv64, stats_groups = advantages(inputs.rewards, inputs.group_ids, bias=bias, std_scale=std_scale,
                                     bias_scope=bias_scope)
    adv = adv64.to(device=s.device, dtype=dtype)[:, None]
    extra: dict = {}
    n_tokens = max(int(mask.sum()), 1)
    if clip_eps is not None:
        eps = check_number("clip_eps", clip_eps, low=0.0, high=1.0, low_open=True, high_open=True)
        behavior = masked(require(inputs, "behavior_logps", "grpo", " when clip_eps is set"), mask, dtype)
        ratio = (s - behavior).exp()
        unclipped = ratio * adv
        clipped = ratio.clamp(1.0 - eps, 1.0 + eps) * adv
        token_loss = -torch.minimum(unclipped, clipped)
        # Tokens where the clipped branch wins carry no gradient.
        extra["clip_fraction"] = float(((clipped < unclipped) & mask).sum()) / n_tokens
        extra["ratio_mean"] = float(ratio.detach()[mask].sum()) / n_tokens
    else:
        token_loss = -adv * s
    if kl_beta is not None and kl_beta != 0:
        kl_beta = check_number("kl_beta", kl_beta, low=0.0)
        ref = masked(require(inputs, "ref_logps", "grpo", " when kl_beta is set"), mask, dtype)
        delta = ref - s
        k3 = delta.exp() - delta - 1.0
        token_loss = token_loss + kl_beta * k3
        extra["kl"] = float(k3.detach()[mask].sum()) / n_tokens
    rows = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    total, stats = aggregate(token_loss, mask, rows, aggregation, inputs.num_tokens)
    stats.update(stats_groups)
    stats["advantage_mean"] = float(adv64.mean()) if adv64.numel() else 0.0
    stats["advantage_min"] = float(adv64.min()) if adv64.numel() else 0.0
    stats["advantage_max"] = float(adv64.max()) if adv64.numel() else 0.0
    stats.update(extra)
    return finish(total, stats)
