"""PNG plots of an analysis (matplotlib, Agg backend), drawn from the metrics.json dict.

Each figure is saved through engine.fsio.atomic_file, so a reader never sees half a PNG.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from engine.fsio import atomic_file  # noqa: E402
from engine.outputs import claim  # noqa: E402


def _save(fig, path: Path) -> Path:
    claim(path, "plot")
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _nan(x) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in x], dtype=float) \
        if isinstance(x[0], list) else np.array([np.nan if v is None else v for v in x], dtype=float)


def cosine_heatmap(metrics: dict, path: Path) -> Path:
    names = [r["name"] for r in metrics["runs"]]
    cos = _nan(metrics["geometry"]["cosine"]["global"])
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.1 * n + 2.5, 1.0 * n + 1.5))
    im = ax.imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{cos[i, j]:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(cos[i, j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="cosine of Delta W (all modules)")
    ax.set_title("Global cosine similarity of the updates")
    return _save(fig, path)


def per_layer(metrics: dict, path: Path) -> Path:
    """Cosine with the reference and orthogonal fraction per layer, one line per other run."""
    geo = metrics["geometry"]
    names = [r["name"] for r in metrics["runs"]]
    ref = names.index(geo["orthogonal_fraction"]["reference"])
    layers = metrics["layers"]
    cos = _nan([[row[ref] for row in mat] for mat in geo["cosine"]["per_layer"]])   # [L, R]
    frac = _nan(geo["orthogonal_fraction"]["vector"]["per_layer"])                   # [R, L]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    for i, name in enumerate(names):
        if i == ref:
            continue
        a1.plot(layers, cos[:, i], marker=".", label=name)
        a2.plot(layers, frac[i], marker=".", label=name)
    a1.set(xlabel="layer", ylabel=f"cosine with {names[ref]}", title="Per-layer cosine", ylim=(-1.05, 1.05))
    a2.set(xlabel="layer", ylabel="orthogonal fraction", title=f"Orthogonal fraction relative to {names[ref]}",
           ylim=(-0.02, 1.02))
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return _save(fig, path)


def angle_distributions(metrics: dict, path: Path) -> Path:
    """Box plots over modules of the smallest and k-th principal angle, left and right, per pair."""
    pa = metrics["geometry"]["principal_angles"]
    labels = [f"{p[0]}-{p[1]}" for p in metrics["pairs"]]
    fig, axes = plt.subplots(2, 2, figsize=(max(8, 0.7 * len(labels) + 4), 8), sharey=True)
    for row, side in enumerate(("left", "right")):
        per_module = np.array(pa[side]["per_module"], dtype=float)                     # [P, M, k]
        for col, (which, idx) in enumerate((("smallest", 0), (f"k-th (k={pa['k']})", -1))):
            ax = axes[row, col]
            if per_module.size:
                ax.boxplot([per_module[p, :, idx] for p in range(len(labels))], showfliers=False)
                ax.set_xticks(range(1, len(labels) + 1), labels, rotation=60, ha="right", fontsize=8)
            ax.set(title=f"{side} singular subspaces: {which} angle", ylabel="degrees", ylim=(0, 92))
            ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path)


def lmc_curves(metrics: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in metrics["function_space"]["lmc"]:
        ax.plot(c["alphas"], c["loss"], marker="o", label=f"{c['b']} (0) -> {c['a']} (1)")
    ax.set(xlabel="alpha  (W0 + alpha Delta_a + (1 - alpha) Delta_b)", ylabel="answer cross-entropy",
           title="Linear mode connectivity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def cka_per_layer(metrics: dict, path: Path) -> Path:
    cka = metrics["function_space"]["cka"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for p, vals in zip(cka["pairs"], cka["per_layer"]):
        ax.plot(cka["layers"], _nan(vals), marker=".", label=f"{p[0]}-{p[1]}")
    ax.set(xlabel="layer", ylabel="CKA", title=f"Per-layer CKA ({cka['mode']})", ylim=(None, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def draw_all(metrics: dict, out_dir: str | os.PathLike) -> list[str]:
    """Every plot the metrics support; returns the file names written (relative to out_dir)."""
    out_dir = Path(out_dir)
    written = [cosine_heatmap(metrics, out_dir / "cosine_heatmap.png")]
    if "orthogonal_fraction" in metrics["geometry"] and len(metrics["runs"]) > 1:
        written.append(per_layer(metrics, out_dir / "per_layer_cosine_orthogonal.png"))
    if metrics["pairs"]:
        written.append(angle_distributions(metrics, out_dir / "principal_angles.png"))
    fs = metrics.get("function_space") or {}
    if fs.get("lmc"):
        written.append(lmc_curves(metrics, out_dir / "lmc.png"))
    if fs.get("cka"):
        written.append(cka_per_layer(metrics, out_dir / "cka_per_layer.png"))
    if metrics.get("base_alignment"):
        from .base_alignment_report import principal_overlap_plot
        written.append(principal_overlap_plot(metrics, out_dir / "principal_overlap_per_layer.png"))
    return [p.name for p in written]
