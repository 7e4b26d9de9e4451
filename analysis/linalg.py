"""Batched float64 linear algebra for low-rank updates: factored SVD, Frobenius inner products,
principal angles, effective rank. Every function works over arbitrary leading batch dims.
"""
from __future__ import annotations

import torch


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64)


def cosine(a, b, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Cosine similarity <a, b> / (|a| |b|) in float64.

    dim=None flattens both tensors (vec(Delta W) concatenated over whatever they hold) and returns a
    0-d tensor; otherwise the reduction runs over `dim` and the rest is batch. A zero vector gives NaN
    (the direction is undefined)."""
    a, b = _f64(a), _f64(b)
    if a.shape != b.shape:
        raise ValueError(f"cosine: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if dim is None:
        a, b, dim = a.reshape(-1), b.reshape(-1), -1
    dot = (a * b).sum(dim)
    return dot / (a.square().sum(dim).sqrt() * b.square().sum(dim).sqrt())


def factored_svd(A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor | float, k: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of Delta W = scale * B A without forming it.

    A [..., r, in], B [..., out, r], scale broadcastable to [...]. Returns U [..., out, k],
    S [..., r] (descending, all r), V [..., in, k] (k = r unless given) with
    Delta W = U diag(S) V^T when k = r. B = Q_B R_B, A^T = Q_A R_A, and the SVD of the r x r core
    scale * R_B R_A^T = U_c S V_c^T rotates the two orthonormal bases: U = Q_B U_c, V = Q_A V_c."""
    Q_B, R_B = torch.linalg.qr(B)
    Q_A, R_A = torch.linalg.qr(A.mT)
    scale = torch.as_tensor(scale, dtype=R_B.dtype)
    core = scale.reshape(scale.shape + (1, 1)) * (R_B @ R_A.mT)
    U_c, S, V_cT = torch.linalg.svd(core)
    k = S.shape[-1] if k is None else k
    return Q_B @ U_c[..., :k], S, Q_A @ V_cT[..., :k, :].mT


def frobenius_inner(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Pairwise <B_i A_i, B_j A_j>_F over the first (run) dim, without forming any Delta W.

    A [R, ..., r, in], B [R, ..., out, r] -> [R, R, ...] (scales not applied).
    trace((B_i A_i)^T B_j A_j) = trace((B_i^T B_j)(A_j A_i^T)) = sum((B_i^T B_j) * (A_i A_j^T)): two
    batched Gram matrices of all runs' factors side by side, [..., R r, R r] each."""
    R, r = A.shape[0], A.shape[-2]
    batch = A.shape[1:-2]
    A_all = A.movedim(0, -3).reshape(*batch, R * r, A.shape[-1])     # [..., R r, in]
    B_all = B.movedim(0, -3).movedim(-3, -2).reshape(*batch, B.shape[-2], R * r)  # [..., out, R r]
    gram_B = (B_all.mT @ B_all).reshape(*batch, R, r, R, r)
    gram_A = (A_all @ A_all.mT).reshape(*batch, R, r, R, r)
    inner = (gram_B * gram_A).sum((-3, -1))                           # [..., R, R]
    return inner.movedim(-2, 0).movedim(-1, 1)


def principal_angles(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between span(U) and span(V).

    U [..., n, k1], V [..., n, k2] with orthonormal columns (not re-orthonormalised); returns
    [..., min(k1, k2)]. Cosines are the singular values of U^T V; angles whose cosine^2 >= 1/2 come
    from the sine form, the singular values of V - U U^T V (accurate for small angles), exactly as
    scipy.linalg.subspace_angles does but sorted ascending and batched over leading dims."""
    U, V = _f64(U), _f64(V)
    if U.shape[-1] < V.shape[-1]:
        U, V = V, U
    C = U.mT @ V                                                      # [..., k1, k2]
    cos = torch.linalg.svdvals(C).clamp(0.0, 1.0)                     # descending = ascending angle
    sin = torch.linalg.svdvals(V - U @ C).flip(-1).clamp(0.0, 1.0)    # ascending
    return torch.where(cos.square() >= 0.5, torch.arcsin(sin), torch.arccos(cos))


def effective_rank(S: torch.Tensor) -> torch.Tensor:
    """exp(entropy of p_j = sigma_j / sum sigma) over the last dim; 0 log 0 = 0; NaN for S = 0."""
    S = _f64(S)
    p = S / S.sum(-1, keepdim=True)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1))


def pair_indices(R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) for every unordered pair i < j of R runs, in row-major order."""
    i, j = torch.triu_indices(R, R, 1)
    return i, j
