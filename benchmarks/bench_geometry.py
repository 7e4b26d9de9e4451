"""Batched LoRA geometry vs a per-module numpy/scipy loop on the full Delta W (CPU, float64).

Shapes are Qwen3-4B's attention (hidden 2560; q 4096 x 2560, k/v 1024 x 2560, o 2560 x 4096;
36 layers = 144 modules), 6 runs, r = 32, random correlated adapters. The batched path computes every
metric of analysis.geometry (SVDs, all-pairs inner products, principal angles left and right, top
vector alignment, effective ranks, orthogonal fractions) for all 144 modules. The reference loop does
the same per module with numpy.linalg.svd of the full Delta W and scipy.linalg.subspace_angles.

The loop over all 144 modules takes many minutes on a small CPU, so by default it runs on
--loop-layers layers (every module shape) and is extrapolated linearly to 36 layers (all layers
have the same shapes, so per-layer cost is constant); --loop-layers 36 times the full loop.

    .venv/bin/python benchmarks/bench_geometry.py [--runs 6] [--layers 36] [--loop-layers 1] [--threads N]
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--loop-layers", type=int, default=1)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS/LAPACK threads for both paths (default: the libraries' own)")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    # Before numpy/torch load their BLAS, so the loop and the batched path get the same threads.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402

from analysis.adapters import RunInfo, build_adapter_set  # noqa: E402
from analysis.geometry import compute_geometry, summarize  # noqa: E402

SHAPES = {"q_proj": (4096, 2560), "k_proj": (1024, 2560), "v_proj": (1024, 2560), "o_proj": (2560, 4096)}


def random_factors(runs: int, layers: int, r: int, seed: int = 0) -> list[dict]:
    """Runs share a common update plus run-specific parts of different sizes, so both small angles
    (sine form) and large ones (cosine form) occur."""
    g = torch.Generator().manual_seed(seed)
    out = [dict() for _ in range(runs)]
    for i, (kind, (o, n)) in itertools.product(range(layers), SHAPES.items()):
        A0, B0 = torch.randn(r, n, generator=g) / math.sqrt(n), torch.randn(o, r, generator=g) * 1e-2
        for k in range(runs):
            noise = 0.05 * k
            A = A0 + noise * torch.randn(r, n, generator=g) / math.sqrt(n)
            B = B0 + noise * 1e-2 * torch.randn(o, r, generator=g)
            out[k][f"model.layers.{i}.self_attn.{kind}"] = {"A": A, "B": B}
    return out


def loop_reference(factors: list[dict], modules: list[str], scales: list[float], k: int) -> dict:
    """Per module: full SVD of every run's Delta W, then every pair's subspace angles etc."""
    res = {"S": {}, "inner": {}, "left": {}, "right": {}, "u1": {}, "v1": {}, "erank": {}}
    for m in modules:
        svds = []
        deltas = []
        for f, s in zip(factors, scales):
            D = s * (f[m]["B"].double().numpy() @ f[m]["A"].double().numpy())
            U, S, Vt = np.linalg.svd(D, full_matrices=False)
            deltas.append(D.ravel())
            svds.append((U, S, Vt))
            p = S / S.sum()
            res["erank"][(len(svds) - 1, m)] = math.exp(-(p[p > 0] * np.log(p[p > 0])).sum())
            res["S"][(len(svds) - 1, m)] = S[: f[m]["A"].shape[0]]
        for a, b in itertools.combinations(range(len(factors)), 2):
            Ua, Ub = svds[a][0][:, :k], svds[b][0][:, :k]
            Va, Vb = svds[a][2][:k].T, svds[b][2][:k].T
            res["left"][(a, b, m)] = np.sort(scipy.linalg.subspace_angles(Ua, Ub))
            res["right"][(a, b, m)] = np.sort(scipy.linalg.subspace_angles(Va, Vb))
            res["u1"][(a, b, m)] = abs(Ua[:, 0] @ Ub[:, 0])
            res["v1"][(a, b, m)] = abs(Va[:, 0] @ Vb[:, 0])
        for a, b in itertools.product(range(len(factors)), repeat=2):
            res["inner"][(a, b, m)] = float(deltas[a] @ deltas[b])
    return res


def main() -> None:
    args = ARGS
    if args.threads:
        torch.set_num_threads(args.threads)
    factors = random_factors(args.runs, args.layers, args.rank)
    runs = [RunInfo(name=f"run{i}", adapter_dir=None, r=args.rank, alpha=2.0 * args.rank, use_rslora=False,
                    scale=2.0, base_model="bench", target_modules=tuple(sorted(SHAPES))) for i in range(args.runs)]
    aset = build_adapter_set(runs, factors)
    M = len(aset.modules)
    print(f"{args.runs} runs x {M} modules, r={args.rank}, k={args.k}, torch threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    geo = compute_geometry(aset, k=args.k, reference=0)
    summary = summarize(geo)
    t_batched = time.perf_counter() - t0
    print(f"batched geometry (all metrics, {M} modules): {t_batched:.2f} s")

    if args.loop_layers == 0:
        return
    loop_modules = [m for m in aset.modules if aset.layer_of[aset.modules.index(m)] < args.loop_layers]
    t0 = time.perf_counter()
    ref = loop_reference(factors, loop_modules, [r.scale for r in runs], args.k)
    t_loop = time.perf_counter() - t0
    t_loop_all = t_loop * args.layers / args.loop_layers
    note = "" if args.loop_layers == args.layers else f" (measured on {args.loop_layers} layers, x{args.layers / args.loop_layers:g})"
    print(f"per-module numpy/scipy loop ({len(loop_modules)} modules): {t_loop:.2f} s; "
          f"all {M} modules: {t_loop_all:.1f} s{note}")
    print(f"speed-up: {t_loop_all / t_batched:.1f}x")

    err = {"S": 0.0, "cos": 0.0, "left": 0.0, "right": 0.0, "u1": 0.0, "v1": 0.0, "erank": 0.0}
    cos = np.array(summary["cosine"]["per_module"])      # [M, R, R]
    for m in loop_modules:
        mi = aset.modules.index(m)
        for a in range(args.runs):
            err["S"] = max(err["S"], np.abs(ref["S"][(a, m)] - geo.S[a, mi].numpy()).max() / ref["S"][(a, m)][0])
            err["erank"] = max(err["erank"], abs(ref["erank"][(a, m)] - summary["effective_rank"]["per_module"][a][mi]))
            for b in range(args.runs):
                c = ref["inner"][(a, b, m)] / math.sqrt(ref["inner"][(a, a, m)] * ref["inner"][(b, b, m)])
                err["cos"] = max(err["cos"], abs(c - cos[mi, a, b]))
        for p, (a, b) in enumerate(geo.pairs):
            err["left"] = max(err["left"], np.abs(ref["left"][(a, b, m)] - geo.angles_left[p, mi].numpy()).max())
            err["right"] = max(err["right"], np.abs(ref["right"][(a, b, m)] - geo.angles_right[p, mi].numpy()).max())
            err["u1"] = max(err["u1"], abs(ref["u1"][(a, b, m)] - geo.align_u[p, mi].item()))
            err["v1"] = max(err["v1"], abs(ref["v1"][(a, b, m)] - geo.align_v[p, mi].item()))
    print("max abs differences (S relative to sigma_1, angles in radians): "
          + ", ".join(f"{k} {v:.1e}" for k, v in err.items()))
    worst = max(err.values())
    print(f"agreement to 1e-6: {'yes' if worst < 1e-6 else 'NO'}")


if __name__ == "__main__":
    main()
