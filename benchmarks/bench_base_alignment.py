"""Base alignment at Qwen3 shapes with random weights on CPU: the base SVDs, then the metrics of R runs
(factored, analysis.base_alignment) against a plain per-module dense loop (SVD of every W0 + dW), with
the same numbers checked.

    python benchmarks/bench_base_alignment.py --model-config data/qwen3-configs/Qwen3-0.6B.json
    python benchmarks/bench_base_alignment.py --model-config .../Qwen3-4B.json --layers 2 --dense-layers 1

--layers / --dense-layers time a subset of the layers; the totals are extrapolated to every layer (all
layers have the same four shapes). Peak memory is the process's peak RSS after each phase.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.base_alignment import module_alignment  # noqa: E402
from analysis.base_svd import svd_of  # noqa: E402
from analysis.linalg import principal_angles  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def default_config() -> Path:
    """The repository's copy of the Qwen3-0.6B shape (data/SOURCES.md)."""
    return REPO / "data" / "qwen3-configs" / "Qwen3-0.6B.json"


def shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, hd = cfg["hidden_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}


def base_weight(out: int, inn: int, spectrum: str, g: torch.Generator) -> torch.Tensor:
    """float32 W0. 'decay': Gaussian columns scaled by (j + 1)^-1/2, a decaying spectrum like trained
    weights; 'gaussian': plain N(0, 1/in), whose top singular values crowd at the Marchenko-Pastur edge."""
    W = torch.randn(out, inn, generator=g) / math.sqrt(inn)
    if spectrum == "decay":
        W = W * (torch.arange(inn, dtype=torch.float32) + 1).rsqrt()[torch.randperm(inn, generator=g)]
    return W


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def dense_module(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: torch.Tensor, k: int, K: int) -> dict:
    """The plain way: float64 dense SVDs of W0 and of every W0 + dW."""
    W0 = W0.double()
    U0, S0, V0h = torch.linalg.svd(W0, full_matrices=False)
    res = {"overlap": [], "angles": [], "sigma": [], "max_cos": []}
    for i in range(A.shape[0]):
        dW = s[i] * B[i] @ A[i]
        Uw, Sw, _ = torch.linalg.svd(W0 + dW, full_matrices=False)
        res["overlap"].append(((U0[:, :k].T @ dW @ V0h[:k].T).square().sum() / dW.square().sum()).item())
        res["angles"].append(principal_angles(U0[:, :k], Uw[:, :k]) * 180 / math.pi)
        res["sigma"].append(Sw[:k])
        res["max_cos"].append((Uw[:, :K].T @ U0).abs().amax(-1))
    return {key: torch.stack(v) if key != "overlap" else torch.tensor(v) for key, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-config", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=None, help="Layers timed (default all).")
    ap.add_argument("--dense-layers", type=int, default=1, help="Layers the dense loop is timed on.")
    ap.add_argument("--dense-types", default="q_proj,k_proj,v_proj,o_proj",
                    help="Module types the dense loop is timed on; the others are scaled by dense-SVD flops.")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--spectrum", choices=["decay", "gaussian"], default="decay")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg_path = a.model_config or default_config()
    cfg = json.loads(cfg_path.read_text())
    L = cfg["num_hidden_layers"]
    layers = min(a.layers or L, L)
    shp = shapes(cfg)
    g = torch.Generator().manual_seed(a.seed)
    R, r = a.runs, a.rank
    scale = torch.full((R,), 2.0, dtype=torch.float64)
    print(f"{cfg_path.name}: {L} layers x 4 modules {shp}; timing {layers} layer(s), {R} runs, r={r}, k={a.k}, "
          f"K={a.K}, spectrum {a.spectrum}, torch threads {torch.get_num_threads()}")
    dense_types = a.dense_types.split(",")
    t_svd = t_ours = t_dense = 0.0
    cpu = {"svd": 0.0, "ours": 0.0, "dense": 0.0}   # process CPU seconds: robust on a shared machine
    dense_by_type: dict[str, float] = {}
    diffs = {"overlap": 0.0, "angles_deg": 0.0, "sigma_rel": 0.0, "max_cos": 0.0}
    fallbacks = 0
    rss0 = peak_rss_gb()
    rss = {}
    for layer in range(layers):
        for kind, (out, inn) in shp.items():
            W0 = base_weight(out, inn, a.spectrum, g)
            A = torch.randn(R, r, inn, generator=g, dtype=torch.float64) / math.sqrt(inn)
            B = 1e-2 * torch.randn(R, out, r, generator=g, dtype=torch.float64)
            t, c = time.perf_counter(), time.process_time()
            f = svd_of(W0, "cpu")
            t_svd += time.perf_counter() - t
            cpu["svd"] += time.process_time() - c
            rss["svd"] = peak_rss_gb()
            t, c = time.perf_counter(), time.process_time()
            m = module_alignment(A, B, scale, f["U"], f["S"], f["V"], (a.k, r), a.k, a.K)
            t_ours += time.perf_counter() - t
            cpu["ours"] += time.process_time() - c
            rss["ours"] = peak_rss_gb()
            fallbacks += int((m.residual == 0).sum())
            if layer < a.dense_layers and kind in dense_types:
                t, c = time.perf_counter(), time.process_time()
                d = dense_module(W0, A, B, scale, a.k, a.K)
                dt = time.perf_counter() - t
                cpu["dense"] += time.process_time() - c
                t_dense += dt
                dense_by_type[kind] = dense_by_type.get(kind, 0.0) + dt / a.dense_layers
                rss["dense"] = peak_rss_gb()
                ours_overlap = m.overlap[a.k][:, 0] / m.norm_sq
                diffs["overlap"] = max(diffs["overlap"], (ours_overlap - d["overlap"]).abs().max().item())
                diffs["angles_deg"] = max(diffs["angles_deg"], (m.angles_left - d["angles"]).abs().max().item())
                diffs["sigma_rel"] = max(diffs["sigma_rel"], ((m.sigma - d["sigma"]) / d["sigma"]).abs().max().item())
                diffs["max_cos"] = max(diffs["max_cos"], (m.max_cos - d["max_cos"]).abs().max().item())
        print(f"  layer {layer}: base SVD {t_svd:.1f}s, ours {t_ours:.1f}s, dense {t_dense:.1f}s (cumulative)",
              flush=True)
    # Untimed types: the timed types' seconds per dense-SVD flop (out * in * min(out, in)) times theirs.
    flops = {kind: o * i * min(o, i) for kind, (o, i) in shp.items()}
    rate = sum(dense_by_type.values()) / sum(flops[kd] for kd in dense_by_type) if dense_by_type else math.nan
    dense_layer = sum(dense_by_type.get(kd, rate * flops[kd]) for kd in shp)
    per_layer = {"svd": t_svd / layers, "ours": t_ours / layers, "dense": dense_layer}
    full = {key: v * L for key, v in per_layer.items()}
    result = {"config": cfg_path.name, "layers_total": L, "layers_timed": layers, "dense_layers_timed": a.dense_layers,
              "dense_types_timed": sorted(dense_by_type), "dense_seconds_by_type_per_layer": dense_by_type,
              "cpu_seconds_timed": cpu, "wall_seconds_timed": {"svd": t_svd, "ours": t_ours, "dense": t_dense},
              "runs": R, "rank": r, "k": a.k, "K": a.K, "spectrum": a.spectrum, "threads": torch.get_num_threads(),
              "seconds_per_layer": per_layer, "seconds_all_layers": full, "dense_fallbacks": fallbacks,
              "max_abs_diff_vs_dense": diffs, "peak_rss_gb_after": rss, "rss_gb_at_start": rss0}
    print(f"all {L} layers (extrapolated from {layers} / dense from {a.dense_layers} layer(s) of "
          f"{sorted(dense_by_type)}): base SVDs {full['svd']:.1f}s, "
          f"metrics of {R} runs: factored {full['ours']:.1f}s vs dense loop {full['dense']:.1f}s "
          f"(dense/factored {full['dense'] / full['ours']:.1f}x; dense/(SVD+factored) "
          f"{full['dense'] / (full['svd'] + full['ours']):.1f}x)")
    print(f"process CPU seconds over what was timed: {json.dumps({k: round(v, 1) for k, v in cpu.items()})}")
    print(f"same numbers: max |diff| {json.dumps({k: float(f'{v:.2e}') for k, v in diffs.items()})}; "
          f"dense-core fallbacks {fallbacks} of {layers * 4 * R} module-runs; peak RSS GB {json.dumps(rss)}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
