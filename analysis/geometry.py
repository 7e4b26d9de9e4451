"""Weight-space geometry of N LoRA updates, batched over runs and modules (protocol section 4).

All quantities come from the factors: per shape bucket one batched QR/SVD call for every run and
module, one Gram product for every pair's Frobenius inner products, one batched principal-angle call
for every pair of runs. The only Python loop is over the (few) shape buckets.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .adapters import AdapterSet
from .linalg import effective_rank, factored_svd, frobenius_inner, pair_indices, principal_angles


@dataclasses.dataclass
class Geometry:
    """Per-module results. R runs, M modules, P = R (R - 1) / 2 pairs (i < j), k angles."""
    names: list[str]
    modules: list[str]
    layer_of: list[int]
    type_of: list[str]
    pairs: list[tuple[int, int]]
    k: int
    inner: torch.Tensor          # [R, R, M] <Delta_a, Delta_b>_F (scales applied)
    S: torch.Tensor              # [R, M, r] singular values, descending
    angles_left: torch.Tensor    # [P, M, k] radians, ascending
    angles_right: torch.Tensor   # [P, M, k]
    align_u: torch.Tensor        # [P, M] |<u1_a, u1_b>|
    align_v: torch.Tensor        # [P, M] |<v1_a, v1_b>|
    reference: int | None = None
    proj_sq: torch.Tensor | None = None  # [R, M] |U_s U_s^T Delta V_s V_s^T|_F^2, s = reference, top-k


def compute_geometry(aset: AdapterSet, k: int = 10, reference: int | None = None) -> Geometry:
    """Every per-module quantity for every run and pair of runs, in float64."""
    R, M, r = len(aset.runs), len(aset.modules), aset.rank
    kk = min(k, r)
    ii, jj = pair_indices(R)
    P = len(ii)
    scales = aset.scales
    inner = torch.empty(R, R, M, dtype=torch.float64)
    S = torch.empty(R, M, r, dtype=torch.float64)
    angles_l = torch.empty(P, M, kk, dtype=torch.float64)
    angles_r = torch.empty(P, M, kk, dtype=torch.float64)
    align_u = torch.empty(P, M, dtype=torch.float64)
    align_v = torch.empty(P, M, dtype=torch.float64)
    proj_sq = torch.empty(R, M, dtype=torch.float64) if reference is not None else None
    for b in aset.buckets:
        Uk, Sb, Vk = factored_svd(b.A, b.B, scales[:, None], k=kk)   # [R, Mb, out, k], [R, Mb, r], [R, Mb, in, k]
        S[:, b.index] = Sb
        inner[:, :, b.index] = frobenius_inner(b.A, b.B) * (scales[:, None, None] * scales[None, :, None])
        if P:
            angles_l[:, b.index] = principal_angles(Uk[ii], Uk[jj])
            angles_r[:, b.index] = principal_angles(Vk[ii], Vk[jj])
            align_u[:, b.index] = (Uk[ii, ..., 0] * Uk[jj, ..., 0]).sum(-1).abs()
            align_v[:, b.index] = (Vk[ii, ..., 0] * Vk[jj, ..., 0]).sum(-1).abs()
        if proj_sq is not None:
            # U_s^T Delta_g V_s = scale_g (U_s^T B_g)(A_g V_s): k x k, no Delta formed.
            core = (Uk[reference].mT @ b.B) @ (b.A @ Vk[reference])   # [R, Mb, k, k]
            proj_sq[:, b.index] = (scales[:, None] ** 2) * core.square().sum((-2, -1))
    return Geometry(names=aset.names, modules=aset.modules, layer_of=aset.layer_of, type_of=aset.type_of,
                    pairs=list(zip(ii.tolist(), jj.tolist())), k=kk, inner=inner, S=S, angles_left=angles_l,
                    angles_right=angles_r, align_u=align_u, align_v=align_v, reference=reference,
                    proj_sq=proj_sq)


# ---- summaries over groups of modules -------------------------------------------------------------

def _group_sum(x: torch.Tensor, groups: list, order: list) -> torch.Tensor:
    """Sum the last dim of x [..., M] over modules with the same group label -> [..., G] (G = len(order))."""
    idx = torch.tensor([order.index(g) for g in groups])
    out = torch.zeros(*x.shape[:-1], len(order), dtype=x.dtype)
    return out.index_add_(-1, idx, x)


def cosine_matrix(inner: torch.Tensor) -> torch.Tensor:
    """Inner products [R, R, ...] -> cosines [R, R, ...]; NaN where a run's delta is zero."""
    d = torch.diagonal(inner, dim1=0, dim2=1).movedim(-1, 0).clamp(min=0).sqrt()
    return inner / (d[:, None] * d[None, :])


def grouped(geo: Geometry) -> dict[str, tuple[list, torch.Tensor]]:
    """Inner products summed per grouping: name -> (labels, [R, R, G])."""
    layers = sorted(set(geo.layer_of))
    types = list(dict.fromkeys(geo.type_of))
    return {"global": (["all"], geo.inner.sum(-1, keepdim=True)),
            "per_layer": (layers, _group_sum(geo.inner, geo.layer_of, layers)),
            "per_type": (types, _group_sum(geo.inner, geo.type_of, types)),
            "per_module": (geo.modules, geo.inner)}


def orthogonal_fraction(cos_with_ref: torch.Tensor) -> torch.Tensor:
    """|v_g - <v_g, u_s> u_s| / |v_g| = sqrt(1 - cos^2)."""
    return (1 - cos_with_ref.square()).clamp(min=0).sqrt()


def subspace_orthogonal_fraction(geo: Geometry, labels: list, groups: list) -> torch.Tensor:
    """Fraction of |Delta_g| outside the reference's top-k left x right singular subspaces, per group:
    sqrt(1 - sum |U_s U_s^T Delta_g V_s V_s^T|^2 / sum |Delta_g|^2) -> [R, G]."""
    norm_sq = torch.diagonal(geo.inner, dim1=0, dim2=1).movedim(-1, 0)   # [R, M]
    proj = _group_sum(geo.proj_sq, groups, labels)
    return (1 - proj / _group_sum(norm_sq, groups, labels)).clamp(min=0).sqrt()


def _quantiles(x: torch.Tensor) -> dict[str, list[float]]:
    """x [P, M] -> median / q25 / q75 / iqr over modules, per pair."""
    if x.shape[0] == 0:
        return {"median": [], "q25": [], "q75": [], "iqr": []}
    q = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype), dim=-1)
    return {"median": q[1].tolist(), "q25": q[0].tolist(), "q75": q[2].tolist(), "iqr": (q[2] - q[0]).tolist()}


def summarize(geo: Geometry) -> dict:
    """JSON-ready geometry section of metrics.json (schema in docs/analysis.md). Angles in degrees."""
    groups = grouped(geo)
    cos = {name: cosine_matrix(inner) for name, (_, inner) in groups.items()}
    norm_sq = torch.diagonal(geo.inner, dim1=0, dim2=1).movedim(-1, 0)   # [R, M]
    out: dict = {
        "cosine": {"global": cos["global"][..., 0].tolist(),
                   "per_layer": cos["per_layer"].permute(2, 0, 1).tolist(),
                   "per_type": {t: cos["per_type"][..., g].tolist() for g, t in enumerate(groups["per_type"][0])},
                   "per_module": cos["per_module"].permute(2, 0, 1).tolist()},
        "norms": {"global": norm_sq.sum(-1).sqrt().tolist(), "per_module": norm_sq.sqrt().tolist()},
        "effective_rank": {"per_module": effective_rank(geo.S).tolist(),
                           "median": effective_rank(geo.S).median(-1).values.tolist()},
        "top_singular_value": {"per_module": geo.S[..., 0].tolist()},
    }
    deg = 180 / math.pi
    angles = {"k": geo.k, "unit": "degrees"}
    for side, a in (("left", geo.angles_left), ("right", geo.angles_right)):
        a = a * deg
        angles[side] = {"smallest": _quantiles(a[..., 0]), "kth": _quantiles(a[..., -1]),
                        "per_module": a.tolist()}
    out["principal_angles"] = angles
    out["alignment"] = {"u1": {"per_module": geo.align_u.tolist(), **_quantiles(geo.align_u)},
                        "v1": {"per_module": geo.align_v.tolist(), **_quantiles(geo.align_v)}}
    if geo.reference is not None:
        s = geo.reference
        frac = {name: orthogonal_fraction(c[:, s]) for name, c in cos.items()}    # [R, G]
        sub = {name: subspace_orthogonal_fraction(geo, labels, _labels_of(geo, name))
               for name, (labels, _) in groups.items()}
        out["orthogonal_fraction"] = {
            "reference": geo.names[s],
            "vector": {"global": frac["global"][:, 0].tolist(), "per_layer": frac["per_layer"].tolist(),
                       "per_type": {t: frac["per_type"][:, g].tolist() for g, t in enumerate(groups["per_type"][0])},
                       "per_module": frac["per_module"].tolist()},
            "subspace": {"k": geo.k, "global": sub["global"][:, 0].tolist(), "per_layer": sub["per_layer"].tolist(),
                         "per_type": {t: sub["per_type"][:, g].tolist() for g, t in enumerate(groups["per_type"][0])},
                         "per_module": sub["per_module"].tolist()}}
    return out


def _labels_of(geo: Geometry, grouping: str) -> list:
    return {"global": ["all"] * len(geo.modules), "per_layer": geo.layer_of, "per_type": geo.type_of,
            "per_module": geo.modules}[grouping]
