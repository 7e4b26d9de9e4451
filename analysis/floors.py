"""Controls for the principal angles: what random subspaces give, and how much of each run's right
subspace is still the shared initial A (protocol section 4, "Noise floors").

- `random_angle_floor`: the median over modules of the smallest and k-th principal angle between two
  independent uniformly random k-dimensional subspaces of each module's dimension, averaged over trials.
  An observed median angle near it means "no more aligned than chance".
- `init_alignment`: each run's top-k right singular subspace against the row space of its initial A
  (regenerated from the run's seed exactly as `engine.model.lora.apply_lora` drew it). Every run of one seed
  starts from the same A, and A moves little at small learning rates, so right-side angles between two
  runs of one seed can be small because of the shared init rather than the losses; this shows how much.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from engine.model.lora import initial_lora_a

from .adapters import AdapterSet
from .linalg import factored_svd, principal_angles
from .run_info import training_info

DEG = 180 / math.pi


def random_orthonormal(shape: tuple[int, ...], n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[*shape, n, k] float64 orthonormal bases of uniformly random (Haar) k-dimensional subspaces of R^n:
    QR of a Gaussian matrix (the span of a Gaussian matrix is Haar-distributed whatever the sign fix)."""
    Q, _ = torch.linalg.qr(torch.randn(*shape, n, k, generator=gen, dtype=torch.float64))
    return Q


def random_angle_floor(dims: list[int], k: int, *, other_k: int | None = None, trials: int = 64,
                       seed: int = 0) -> dict:
    """{smallest, kth}: the mean over `trials` of the median over modules (one module per entry of `dims`,
    its dimension n) of the smallest / k-th principal angle (degrees) between random subspaces of
    dimensions k and `other_k` (default k) of R^n. Modules of one dimension are drawn together."""
    other_k = k if other_k is None else other_k
    gen = torch.Generator().manual_seed(seed)
    per_module = torch.empty(trials, len(dims), min(k, other_k), dtype=torch.float64)
    for n in sorted(set(dims)):
        idx = [i for i, d in enumerate(dims) if d == n]
        if min(k, other_k) > n or max(k, other_k) > n:
            raise ValueError(f"subspaces of dimension {max(k, other_k)} do not fit in R^{n}")
        a = random_orthonormal((trials, len(idx)), n, k, gen)
        b = random_orthonormal((trials, len(idx)), n, other_k, gen)
        per_module[:, idx] = principal_angles(a, b) * DEG
    medians = per_module.median(1).values                                  # [trials, min(k, k')]
    return {"smallest": float(medians[:, 0].mean()), "kth": float(medians[:, -1].mean()), "trials": trials}


def principal_angle_floors(aset: AdapterSet, k: int, trials: int = 64, seed: int = 0) -> dict:
    """The random floor of both sides' angles for this adapter set's module shapes (left: out, right: in)."""
    outs, ins = (list(side) for side in zip(*aset.shapes))
    return {"left": random_angle_floor(outs, k, trials=trials, seed=seed),
            "right": random_angle_floor(ins, k, trials=trials, seed=seed + 1)}


def run_seed(adapter_dir: Path | None) -> int | None:
    """The seed a run was trained with (None for an adapter this engine's trainer did not write)."""
    info = training_info(adapter_dir)
    return None if info is None else info["seed"]


def init_alignment(aset: AdapterSet, k: int, trials: int = 64) -> dict:
    """Per run: median over modules [q25, q75] of the smallest and k-th angle (degrees) between the run's
    top-k right singular subspace and the row space of its initial A, and the random floor of a k- vs an
    r-dimensional subspace. `runs[i]` is None where the seed is unknown."""
    r = aset.rank
    ins = [n for _, n in aset.shapes]
    out = {"k": k, "r": r, "runs": [], "random": random_angle_floor(ins, k, other_k=r, trials=trials, seed=7)}
    for i, run in enumerate(aset.runs):
        seed = run_seed(run.adapter_dir)
        if seed is None:
            out["runs"].append(None)
            continue
        a0 = initial_lora_a(ins, r, seed)                    # [r, in] per module, in model (= aset) order
        angles = torch.empty(len(aset.modules), k, dtype=torch.float64)
        for b in aset.buckets:
            _, _, V = factored_svd(b.A[i], b.B[i], run.scale, k=k)             # [Mb, in, k]
            rows = torch.stack([a0[m] for m in b.index.tolist()]).double()     # [Mb, r, in]
            Q0, _ = torch.linalg.qr(rows.mT)                                    # [Mb, in, r]
            angles[b.index] = principal_angles(V, Q0) * DEG
        q = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
        small, kth = torch.quantile(angles[:, 0], q), torch.quantile(angles[:, -1], q)
        out["runs"].append({"name": run.name, "seed": seed,
                            "smallest": {"median": float(small[1]), "q25": float(small[0]), "q75": float(small[2])},
                            "kth": {"median": float(kth[1]), "q25": float(kth[0]), "q75": float(kth[2])}})
    return out
