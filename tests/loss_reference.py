"""The independent float64 reference for tests/test_losses.py: per-token (loss, d loss / d s) in plain
Python, then aggregation by loops, written from the protocol's formulas (not from losses/)."""
from __future__ import annotations

import math
import statistics

import numpy as np


def ref_grpo_advantages(rewards, groups, bias=0.1, std_scale=False, bias_scope="all"):
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    adv = [0.0] * len(rewards)
    for rows in members.values():
        rs = [rewards[i] for i in rows]
        equal = max(rs) == min(rs)
        mean = sum(rs) / len(rs)
        std = statistics.stdev(rs) if len(rs) > 1 else 0.0
        gets_bias = bias_scope == "all" or all(x == 1 for x in rs)
        for i in rows:
            centered = 0.0 if equal else rewards[i] - mean
            if std_scale:
                centered = centered / (std + 1e-4)
            adv[i] = centered + (bias if gets_bias else 0.0)
    return adv


def ref_token_terms(name, b, h):
    """{(i, t): (loss, dloss/ds)} on used tokens, for every loss but DPO."""
    lp, mask, rewards = b["logps"], b["mask"], b["rewards"]
    n_rows, n_tok = lp.shape
    if name == "grpo":
        adv = ref_grpo_advantages(rewards, b["group_ids"], h.get("bias", 0.1), h.get("std_scale", False),
                                  h.get("bias_scope", "all"))
    terms = {}
    for i in range(n_rows):
        for t in range(n_tok):
            if not mask[i][t]:
                continue
            s = lp[i][t]
            pos = rewards[i] == 1
            if name == "sft":
                terms[i, t] = (-s, -1.0)
            elif name == "rft":
                if pos:
                    terms[i, t] = (-s, -1.0)
            elif name == "dft":
                terms[i, t] = (-math.exp(s) * s, -math.exp(s))
            elif name == "rift" and h.get("variant", "bounded") == "literal":
                r_i = h.get("r_pos", 1.0) if pos else h.get("r_neg", -0.2)
                w = 1 - h["lam"] * r_i
                terms[i, t] = (-w * s, -w)
            elif name == "rift":
                if pos:
                    terms[i, t] = (-h.get("r_pos", 1.0) * s, -h.get("r_pos", 1.0))
                else:
                    q = abs(h.get("r_neg", -0.2)) * math.exp(s)
                    terms[i, t] = (q, q)
            elif name == "grpo":
                a = adv[i]
                if h.get("clip_eps") is not None:
                    e = h["clip_eps"]
                    rho = math.exp(s - b["behavior_logps"][i][t])
                    unclipped, clipped = rho * a, min(max(rho, 1 - e), 1 + e) * a
                    val, grad = (-unclipped, -rho * a) if unclipped <= clipped else (-clipped, 0.0)
                else:
                    val, grad = -a * s, -a
                if h.get("kl_beta"):
                    d = b["ref_logps"][i][t] - s
                    val += h["kl_beta"] * (math.exp(d) - d - 1)
                    grad += h["kl_beta"] * (1 - math.exp(d))
                terms[i, t] = (val, grad)
    return terms


def ref_aggregate(terms, shape, aggregation, norm=None):
    grad = np.zeros(shape)
    if aggregation == "token_mean":
        n = norm if norm is not None else len(terms)
        value = sum(v for v, _ in terms.values()) / max(n, 1)
        for (i, t), (_, d) in terms.items():
            grad[i, t] = d / max(n, 1)
        return value, grad
    lengths: dict[int, int] = {}
    for i, _ in terms:
        lengths[i] = lengths.get(i, 0) + 1
    n = norm if norm is not None else len(lengths)
    value = 0.0
    for (i, t), (v, d) in terms.items():
        value += v / lengths[i] / n
        grad[i, t] = d / lengths[i] / n
    return value, grad


def ref_dpo(b, h):
    lp, ref, mask = b["logps"], b["ref_logps"], b["mask"]
    beta, variant = h.get("beta", 0.1), h.get("variant", "sigmoid")
    eps, smoothing = h.get("label_smoothing", 0.0), h.get("smoothing", "robust")
    n_rows, n_tok = lp.shape
    length = [max(sum(1 for t in range(n_tok) if mask[i][t]), 1) for i in range(n_rows)]
    scale = [1 / length[i] if variant == "ipo" else 1.0 for i in range(n_rows)]
    logratio = [scale[i] * sum(lp[i][t] - ref[i][t] for t in range(n_tok) if mask[i][t])
                for i in range(n_rows)]
    pairs = b["pairs"]
    n_pairs = len(pairs)
    value, grad = 0.0, np.zeros((n_rows, n_tok))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    softplus = lambda x: math.log1p(math.exp(x))  # -log sigmoid(-x)  # noqa: E731
    for w, l in pairs:
        hh = logratio[w] - logratio[l]
        z = beta * hh
        if variant == "ipo":
            v, dh = (hh - 1 / (2 * beta)) ** 2, 2 * (hh - 1 / (2 * beta))
        elif smoothing == "robust":
            v = ((1 - eps) * softplus(-z) - eps * softplus(z)) / (1 - 2 * eps)
            dh = (-(1 - eps) * beta * sig(-z) - eps * beta * sig(z)) / (1 - 2 * eps)
        else:
            v = (1 - eps) * softplus(-z) + eps * softplus(z)
            dh = -(1 - eps) * beta * sig(-z) + eps * beta * sig(z)
        value += v / n_pairs
        for t in range(n_tok):
            if mask[w][t]:
                grad[w, t] += dh * scale[w] / n_pairs
            if mask[l][t]:
                grad[l, t] -= dh * scale[l] / n_pairs
    return value, grad


def reference(name, b, h):
    """(value, grad [N, T]) in float64 from plain-Python lists."""
    if name == "dpo":
        return ref_dpo(b, h)
    terms = ref_token_terms(name, b, h)
    return ref_aggregate(terms, b["logps"].shape, h.get("aggregation", "token_mean"))


