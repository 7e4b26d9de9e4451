"""metrics.json section `base_alignment`: aggregates of analysis.base_alignment over modules (global, per
layer, per module type), per-loss means with the seed noise floor, and the `analyze` entry points (schema:
docs/analysis.md).
"""
from __future__ import annotations

import os
import re
import statistics
from typing import Callable

import torch

from engine.errors import EngineError

from .base_alignment import HEADLINE_EPSILON, BaseAlignment, compute_base_alignment, intruder_counts

DEFAULTS = {"enabled": None, "k": 16, "top": 10, "epsilon": HEADLINE_EPSILON}
_SEED = re.compile(r"^seed[-_]?(\d+)$")
KNOWN_LOSSES = ("sft", "rft", "dft", "rift", "grpo", "dpo")


def loss_of(name: str) -> str:
    """The loss a run name belongs to: a known loss among its path components ('seed-42/sft' -> 'sft'),
    else the first component that is not a seed ('sft/step-1000' -> 'sft')."""
    parts = name.lower().split("/")
    known = [p for p in parts if p in KNOWN_LOSSES]
    if known:
        return known[-1]
    rest = [p for p in parts if not _SEED.match(p)]
    return rest[0] if rest else parts[0]


def _groups(ba: BaseAlignment) -> dict[str, tuple[list, list]]:
    """grouping -> (labels, label of each module)."""
    return {"global": (["all"], ["all"] * len(ba.modules)),
            "per_layer": (sorted(set(ba.layer_of)), ba.layer_of),
            "per_type": (list(dict.fromkeys(ba.type_of)), ba.type_of)}


def _gsum(x: torch.Tensor, of: list, labels: list) -> torch.Tensor:
    """Sum dim 1 of x [R, M, ...] over modules with the same label -> [R, G, ...]."""
    idx = torch.tensor([labels.index(g) for g in of])
    out = torch.zeros(x.shape[0], len(labels), *x.shape[2:], dtype=x.dtype)
    return out.index_add_(1, idx, x)


def _gmedian(x: torch.Tensor, of: list, labels: list) -> torch.Tensor:
    """Median over the modules of each group of x [R, M] -> [R, G] (NaN ignored)."""
    return torch.stack([x[:, [i for i, g in enumerate(of) if g == lab]].nanmedian(-1).values for lab in labels], 1)


def _by_group(fn, ba: BaseAlignment) -> dict:
    out = {}
    for grouping, (labels, of) in _groups(ba).items():
        v = fn(of, labels)                                   # [R, G, ...]
        out[grouping] = v[:, 0].tolist() if grouping == "global" else (
            {str(t): v[:, g].tolist() for g, t in enumerate(labels)} if grouping == "per_type" else v.tolist())
    return out


def summarize_base_alignment(ba: BaseAlignment) -> dict:
    """JSON-ready section; [R] lists in runs order, per_layer [R][L], per_type {type: [R]}, per_module [R][M]."""
    overlap = {}
    for k in ba.ks:
        num, den = ba.overlap[k], ba.norm_sq                  # [R, M, 3], [R, M]
        weighted = den[..., None] * ba.expect[k][None]        # expectation weighted by |dW|^2
        sec = {}
        for j, side in enumerate(("both", "left", "right")):
            ratio = lambda of, lab, j=j: _gsum(num[..., j], of, lab) / _gsum(den, of, lab)          # noqa: E731
            expect = lambda of, lab, j=j: _gsum(weighted[..., j], of, lab) / _gsum(den, of, lab)   # noqa: E731
            sec[side] = {**_by_group(ratio, ba), "per_module": (num[..., j] / den).tolist(),
                         "expectation": {**_by_group(expect, ba), "per_module": ba.expect[k][:, j].tolist()}}
        overlap[str(k)] = sec
    rot = {}
    for side, a in (("left", ba.angles_left), ("right", ba.angles_right)):
        largest, mean = a[..., -1], a.mean(-1)
        rot[side] = {"largest": {**_by_group(lambda of, lab, x=largest: _gmedian(x, of, lab), ba),
                                 "per_module": largest.tolist()},
                     "mean": {**_by_group(lambda of, lab, x=mean: _gmedian(x, of, lab), ba),
                              "per_module": mean.tolist()},
                     "per_module_angles": a.tolist()}
    rel = (ba.sigma - ba.sigma0[None]) / ba.sigma0[None]                               # [R, M, k]
    drift = (ba.sigma - ba.sigma0[None]).norm(dim=-1) / ba.sigma0[None].norm(dim=-1)   # [R, M]
    counts = intruder_counts(ba.max_cos, ba.eps)                                      # [R, M, E]
    h = ba.eps.index(ba.epsilon)
    return {
        "k": ba.k, "k_rank": ba.k_rank, "k_requested": ba.k_requested, "ks": list(ba.ks), "K": ba.K,
        "epsilon": ba.epsilon, "epsilons": list(ba.eps), "unit": "degrees",
        "norm_sq": {"per_module": ba.norm_sq.tolist()},
        # |dW|_F / |W0|_F over each group's modules: how large the update is against what it perturbs.
        "relative_update_norm": _by_group(lambda of, lab: (_gsum(ba.norm_sq, of, lab) / _gsum(
            ba.base_norm_sq.expand_as(ba.norm_sq), of, lab)).sqrt(), ba),
        "principal_overlap": overlap,
        "rotation": rot,
        "spectrum_drift": {"relative_norm": {**_by_group(lambda of, lab: _gmedian(drift, of, lab), ba),
                                             "per_module": drift.tolist()},
                           "relative_change": rel.tolist(), "sigma0": ba.sigma0.tolist()},
        "intruders": {"max_cos": ba.max_cos.tolist(),
                      "curve": _by_group(lambda of, lab: _gsum(counts.double(), of, lab), ba),
                      "at_epsilon": {**_by_group(lambda of, lab: _gsum(counts[..., h].double(), of, lab), ba),
                                     "per_module": counts[..., h].tolist()}},
        "merged_svd_residual_max": ba.residual.amax().item(),
        "by_loss": by_loss(ba.names, headline_numbers(ba, overlap, rot, drift, counts[..., h])),
    }


def headline_numbers(ba: BaseAlignment, overlap: dict, rot: dict, drift: torch.Tensor,
                     intr: torch.Tensor) -> dict[str, list[float]]:
    """Per-run scalars the per-loss table, the noise floor and the verdicts use: name -> [R]."""
    k, r = str(ba.k), str(ba.k_rank)
    both = overlap[k]["both"]
    out = {f"overlap_k{k}": both["global"], f"overlap_k{k}_over_random":
           [o / e if o is not None and e else None for o, e in zip(both["global"], both["expectation"]["global"])],
           f"overlap_k{r}_r": overlap[r]["both"]["global"], f"left_k{k}": overlap[k]["left"]["global"],
           f"right_k{k}": overlap[k]["right"]["global"], "intruders_total": intr.sum(-1).double().tolist(),
           "rotation_left_largest_median": rot["left"]["largest"]["global"],
           "spectrum_drift_median": drift.nanmedian(-1).values.tolist()}
    return out


def by_loss(names: list[str], numbers: dict[str, list[float]]) -> dict:
    """Group runs by loss; mean, sample std, min, max over seeds and the noise floor (max - min over seeds
    of the same loss; null with a single seed)."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(loss_of(n), []).append(i)
    out = {}
    for loss, idx in groups.items():
        entry: dict = {"runs": [names[i] for i in idx], "n_seeds": len(idx)}
        for key, vals in numbers.items():
            v = [vals[i] for i in idx if vals[i] is not None and vals[i] == vals[i]]
            entry[key] = {"mean": statistics.fmean(v) if v else None,
                          "std": statistics.stdev(v) if len(v) > 1 else None,
                          "min": min(v) if v else None, "max": max(v) if v else None,
                          "noise_floor": (max(v) - min(v)) if len(v) > 1 else None}
        out[loss] = entry
    return out


# ---- entry points for run_analysis and the CLI ------------------------------------------------------

def base_alignment_section(aset, base: str | os.PathLike | None, out: str | os.PathLike, opts: dict | None, *,
                           device=None, progress: bool = True, echo: Callable[[str], None] = print) -> dict | None:
    """The section, or None when switched off or (by default) when `base` has no local weights."""
    from .run import _has_weights
    o = {**DEFAULTS, **(opts or {})}
    for key, flag in (("k", "principal_k"), ("top", "intruder_top")):
        if isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < 1:
            raise EngineError(f"expected a positive integer, got {o[key]!r}", field=flag)
    if isinstance(o["epsilon"], bool) or not isinstance(o["epsilon"], (int, float)) or not 0 < o["epsilon"] <= 1:
        raise EngineError(f"expected a number 0 < epsilon <= 1, got {o['epsilon']!r}", field="intruder_epsilon")
    if o["enabled"] is False or (o["enabled"] is None and not _has_weights(base)):
        return None
    if not _has_weights(base):
        raise EngineError("base alignment needs the base model's weights: pass --base MODEL_DIR", field="base")
    from .base_svd import load_base_svd
    svd = load_base_svd(base, aset.modules, out, device=device, progress=progress)
    ba = compute_base_alignment(aset, svd, k=o["k"], K=o["top"], epsilon=float(o["epsilon"]), progress=progress)
    if ba.k != o["k"]:
        echo(f"base alignment: k={o['k']} capped to {ba.k} (smallest module dimension {min(map(min, ba.shapes))})")
    echo(f"base alignment: k={ba.k} and {list(ba.ks)}, top-{ba.K} intruders at epsilon {ba.epsilon}")
    section = summarize_base_alignment(ba)
    section["cache"] = {"path": str(svd.path), "base_sha256": svd.key}
    return section
