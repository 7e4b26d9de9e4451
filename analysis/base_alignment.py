"""Where each LoRA update sits relative to the base weights it perturbs (beyond the study).

Per module and run, with W0 = U0 diag(S0) V0^T (thin, n = min(out, in)) and Delta W = s B A (rank r):
- principal overlap at k: |U0_k^T dW V0_k|_F^2 / |dW|_F^2 (random expectation k^2 / (out in)), and each
  side alone, |U0_k^T dW|^2 / |dW|^2 (k / out) and |dW V0_k|^2 / |dW|^2 (k / in);
- principal rotation: principal angles between the top-k singular subspaces of W0 + dW and of W0;
  spectrum drift: (sigma_j(W0 + dW) - sigma_j(W0)) / sigma_j(W0), j <= k (arXiv 2511.08567);
- intruder dimensions: among the top-K left singular vectors of W0 + dW, those whose largest |cos| with
  every left singular vector of W0 is below epsilon (arXiv 2410.21228, Algorithm 1).

Nothing of size out x in is formed. With B = U0 (U0^T B) + Q_b R_b and A^T = V0 (V0^T A^T) + Q_a R_a,
W0 + dW = [U0 Q_b] K [V0 Q_a]^T with the (n + r) square core K = diag(S0, 0) + X Y^T, X = s [U0^T B; R_b],
Y = [V0^T A^T; R_a]. The bases are orthonormal, so the SVD of K gives that of W0 + dW, and a left singular
vector's cosines with U0's columns are simply its first n coordinates. K's top singular triplets come from
subspace iteration with cheap matvecs (diagonal + rank r); a module that does not converge falls back to a
dense SVD of K, so the result is exact to `tol` either way.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from engine.errors import EngineError
from triton_kernels.torch_path import serial

from .linalg import principal_angles

EPS_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
HEADLINE_EPSILON = 0.5   # see docs/analysis.md: the default of the reference implementation of Algorithm 1


def _orth_residual_r(M: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """R factor [..., r, r] of the part of M [..., d, r] outside span(Q) (Q [d, n] orthonormal). Zero when
    Q spans the whole space (n = d), where the residual is round-off only."""
    if Q.shape[-1] >= Q.shape[-2]:
        return torch.zeros(*M.shape[:-2], M.shape[-1], M.shape[-1], dtype=M.dtype)
    res = M - Q @ (Q.mT @ M)
    return torch.linalg.qr(res).R


def core_factors(A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, U0: torch.Tensor, V0: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A [R, r, in], B [R, out, r], scale [R], U0 [out, n], V0 [in, n] (float64) ->
    UB = U0^T B [R, n, r], AV = A V0 [R, r, n], X [R, n + r, r] (scale applied), Y [R, n + r, r]."""
    UB = U0.mT @ B
    AV = A @ V0
    X = scale[:, None, None] * torch.cat([UB, _orth_residual_r(B, U0)], dim=-2)
    Y = torch.cat([AV.mT, _orth_residual_r(A.mT, V0)], dim=-2)
    return UB, AV, X, Y


def _core_mv(d: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """K Z with K = diag(d) + X Y^T: d [N], X, Y [R, N, r], Z [R, N, b]."""
    return d[:, None] * Z + X @ (Y.mT @ Z)


def top_svd_core(S0: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, m: int, *, tol: float = 1e-11,
                 max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-m singular triplets of K = diag(S0, 0) + X Y^T, batched over runs.

    S0 [n] descending, X, Y [R, N, r] (N = n + r). Returns P [R, N, m], sigma [R, m], Q [R, N, m]
    (K Q = P diag(sigma)) and the residual [R] = max_j |K^T p_j - sigma_j q_j| / sigma_1. Subspace
    iteration on a block of b > m vectors started at the base's top right directions plus the update's
    (the top subspace of W0 + dW is close to their span); runs whose residual stays above `tol` get a
    dense SVD of K instead."""
    R, N, r = X.shape
    d = torch.cat([S0, S0.new_zeros(N - S0.shape[0])])
    b = min(N, max(2 * m, m + r + 8))
    E = torch.eye(N, b - min(r, b - m), dtype=X.dtype).expand(R, -1, -1)
    V = torch.linalg.qr(torch.cat([E, Y[..., : b - E.shape[-1]]], dim=-1)).Q
    resid = torch.full((R,), math.inf, dtype=X.dtype)
    # Many small products: on CPU one thread avoids OpenMP wake-up cost, which dominates on a loaded
    # machine (measured 30x on the embedded model's 200 x 32 blocks).
    with serial(X):
        for _ in range(max_iter):
            P, sig, Qh = torch.linalg.svd(_core_mv(d, X, Y, V), full_matrices=False)    # K V = P sig Qh
            Vr = V @ Qh.mT                                                               # Ritz right vectors
            KtP = _core_mv(d, Y, X, P)                                                   # K^T P
            err = (KtP[..., :m] - Vr[..., :m] * sig[:, None, :m]).norm(dim=-2).amax(-1)
            resid = err / sig[:, 0].clamp(min=torch.finfo(X.dtype).tiny)
            if bool((resid <= tol).all()):
                break
            V = torch.linalg.qr(KtP).Q
    P, sig, Vr = P[..., :m], sig[:, :m], Vr[..., :m]
    bad = (resid > tol).nonzero().flatten()
    if len(bad):
        # Dense fallback: exact, (n + r)^3 per run, no larger than the base's own SVD.
        K = torch.diag_embed(d.expand(len(bad), -1)) + X[bad] @ Y[bad].mT
        Ud, Sd, Vdh = torch.linalg.svd(K)
        P, sig, Vr = P.clone(), sig.clone(), Vr.clone()
        P[bad], sig[bad], Vr[bad] = Ud[..., :m], Sd[:, :m], Vdh[:, :m].mT
        resid = resid.clone()
        resid[bad] = 0.0
    return P, sig, Vr, resid


@dataclasses.dataclass
class ModuleAlignment:
    """One module, R runs. ks: the k values (e.g. 16 and r); kr: the rotation / drift k; K intruder top."""
    norm_sq: torch.Tensor            # [R] |dW|_F^2
    overlap: dict[int, torch.Tensor]  # k -> [R, 3] (both, left, right) numerators |.|_F^2
    expect: dict[int, list[float]]   # k -> [k^2/(out in), k/out, k/in]
    angles_left: torch.Tensor        # [R, kr] degrees, ascending
    angles_right: torch.Tensor       # [R, kr]
    sigma: torch.Tensor              # [R, kr] top singular values of W0 + dW
    sigma0: torch.Tensor             # [kr] of W0
    max_cos: torch.Tensor            # [R, K] largest |cos| of each top-K left vector of W0 + dW with U0
    residual: torch.Tensor           # [R] accuracy of the merged top SVD (relative to sigma_1)


def module_alignment(A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, U0: torch.Tensor, S0: torch.Tensor,
                     V0: torch.Tensor, ks: tuple[int, ...], kr: int, K: int, *, tol: float = 1e-11,
                     max_iter: int = 200) -> ModuleAlignment:
    """Every per-module number for R runs of one module (float64; the base factors may be float32)."""
    A, B, scale = A.double(), B.double(), torch.as_tensor(scale, dtype=torch.float64)
    U0, S0, V0 = U0.double(), S0.double(), V0.double()
    out, inn, n = B.shape[-2], A.shape[-1], S0.shape[0]
    UB, AV, X, Y = core_factors(A, B, scale, U0, V0)
    s2 = scale.square()
    gram_B, gram_A = B.mT @ B, A @ A.mT                                  # [R, r, r]
    norm_sq = s2 * (gram_B * gram_A).sum((-2, -1))
    overlap, expect = {}, {}
    for k in ks:
        ub, av = UB[:, :k], AV[..., :k]                                  # [R, k, r], [R, r, k]
        both = (ub @ av).square().sum((-2, -1))
        left = ((ub.mT @ ub) * gram_A).sum((-2, -1))                     # |U0_k^T B A|^2
        right = (gram_B * (av @ av.mT)).sum((-2, -1))                    # |B A V0_k|^2
        overlap[k] = s2[:, None] * torch.stack([both, left, right], -1)
        expect[k] = [k * k / (out * inn), k / out, k / inn]
    m = max(kr, K)
    P, sig, Q, resid = top_svd_core(S0, X, Y, m, tol=tol, max_iter=max_iter)
    N = P.shape[-2]
    E = torch.eye(N, kr, dtype=P.dtype)
    deg = 180 / math.pi
    angles_left = principal_angles(E.expand(P.shape[0], -1, -1), P[..., :kr]) * deg
    angles_right = principal_angles(E.expand(Q.shape[0], -1, -1), Q[..., :kr]) * deg
    max_cos = P[:, :n, :K].abs().amax(-2)
    return ModuleAlignment(norm_sq=norm_sq, overlap=overlap, expect=expect, angles_left=angles_left,
                           angles_right=angles_right, sigma=sig[:, :kr], sigma0=S0[:kr], max_cos=max_cos,
                           residual=resid)


def intruder_counts(max_cos: torch.Tensor, eps: tuple[float, ...]) -> torch.Tensor:
    """[..., K] largest cosines -> [..., E] number of intruders (max |cos| < epsilon) per epsilon."""
    return (max_cos[..., None, :] < torch.tensor(eps, dtype=max_cos.dtype)[:, None]).sum(-1)


# ---- every module of a run set ---------------------------------------------------------------------

@dataclasses.dataclass
class BaseAlignment:
    """Stacked per-module results: R runs, M modules (aset order), E epsilons."""
    names: list[str]
    modules: list[str]
    layer_of: list[int]
    type_of: list[str]
    shapes: list[tuple[int, int]]
    ks: tuple[int, ...]
    k: int                            # rotation / drift / default-overlap k (after capping)
    k_rank: int                       # k = r (capped the same way)
    k_requested: int
    K: int
    eps: tuple[float, ...]
    epsilon: float
    norm_sq: torch.Tensor             # [R, M]
    base_norm_sq: torch.Tensor        # [M] |W0|_F^2 (the sum of the base's squared singular values)
    overlap: dict[int, torch.Tensor]  # k -> [R, M, 3] numerators (both, left, right)
    expect: dict[int, torch.Tensor]   # k -> [M, 3]
    angles_left: torch.Tensor         # [R, M, k] degrees
    angles_right: torch.Tensor
    sigma: torch.Tensor               # [R, M, k]
    sigma0: torch.Tensor              # [M, k]
    max_cos: torch.Tensor             # [R, M, K]
    residual: torch.Tensor            # [R, M]


def capped_ks(k: int, r: int, K: int, min_dim: int) -> tuple[int, int, int]:
    """k, r and K capped so no subspace is the whole space: k <= min(out, in) - 1 over the modules (at
    k = min(out, in) one side's overlap is 1 for any update). Returns (k, k at rank r, K)."""
    return max(1, min(k, min_dim - 1)), max(1, min(r, min_dim - 1)), max(1, min(K, min_dim))


def compute_base_alignment(aset, base_svd, *, k: int = 16, K: int = 10, epsilon: float = HEADLINE_EPSILON,
                           progress: bool = True, tol: float = 1e-11) -> BaseAlignment:
    """Loop over modules (one base SVD in memory at a time), batched over runs."""
    from tqdm import tqdm
    shape_list = aset.shapes
    min_dim = min(min(s) for s in shape_list)
    k_eff, k_rank, K_eff = capped_ks(k, aset.rank, K, min_dim)
    ks = tuple(sorted({k_eff, k_rank}))
    eps = tuple(sorted(set(EPS_GRID) | {float(epsilon)}))
    res: list[ModuleAlignment] = []
    base_sq: list[float] = []
    for m, name in enumerate(tqdm(aset.modules, desc="base alignment", unit="module", disable=not progress)):
        A, B = aset.factors(name)
        U0, S0, V0 = base_svd.get(name)
        if (U0.shape[0], V0.shape[0]) != shape_list[m]:
            raise EngineError(f"module {name!r}: base weight is {[U0.shape[0], V0.shape[0]]} but the adapters' "
                              f"Delta W is {list(shape_list[m])}", field="base")
        res.append(module_alignment(A, B, aset.scales, U0, S0, V0, ks, k_eff, K_eff, tol=tol))
        base_sq.append(float(S0.double().square().sum()))
    st = lambda f: torch.stack([f(x) for x in res], 1)   # noqa: E731  [R, M, ...]
    return BaseAlignment(
        names=aset.names, modules=aset.modules, layer_of=aset.layer_of, type_of=aset.type_of, shapes=shape_list,
        ks=ks, k=k_eff, k_rank=k_rank, k_requested=k, K=K_eff, eps=eps, epsilon=float(epsilon),
        norm_sq=st(lambda x: x.norm_sq), base_norm_sq=torch.tensor(base_sq, dtype=torch.float64), overlap={kk: st(lambda x, kk=kk: x.overlap[kk]) for kk in ks},
        expect={kk: torch.tensor([x.expect[kk] for x in res], dtype=torch.float64) for kk in ks},
        angles_left=st(lambda x: x.angles_left), angles_right=st(lambda x: x.angles_right),
        sigma=st(lambda x: x.sigma), sigma0=torch.stack([x.sigma0 for x in res]),
        max_cos=st(lambda x: x.max_cos), residual=st(lambda x: x.residual))
