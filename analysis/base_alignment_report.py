"""report.md section and plot for metrics['base_alignment'] (kept apart from report.py / plots.py so
each section renders on its own)."""
from __future__ import annotations

import math
from pathlib import Path


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_base_alignment(metrics: dict) -> list[str]:
    """Markdown lines; empty when the section was not computed."""
    ba = metrics.get("base_alignment")
    if not ba:
        return []
    names = [r["name"] for r in metrics["runs"]]
    k, kr, K, eps = str(ba["k"]), str(ba["k_rank"]), ba["K"], ba["epsilon"]
    po, pr = ba["principal_overlap"][k], ba["principal_overlap"][kr]
    lines = ["## Where the updates sit relative to the base weights", "",
             f"Principal overlap = |U0_k^T dW V0_k|_F^2 / |dW|_F^2 summed over modules (top-k singular vectors of "
             f"the base weight W0; random expectation k^2/(out in), weighted like the overlap); left / right = one "
             f"side alone (expectation k/out, k/in). Rotation: principal angles between the top-{k} left singular "
             f"subspaces of W0 + dW and W0 (median over modules of the largest). Drift: |sigma_1..{k}(W0 + dW) - "
             f"sigma_1..{k}(W0)| / |sigma_1..{k}(W0)| (median over modules). Intruders (arXiv 2410.21228): top-{K} "
             f"left singular vectors of W0 + dW whose largest |cos| with every left singular vector of W0 is below "
             f"epsilon = {eps}, summed over modules. Schema: docs/analysis.md.", ""]
    if ba["k"] != ba["k_requested"]:
        lines += [f"k = {ba['k_requested']} was capped to {ba['k']} (below the smallest module dimension).", ""]
    rows = []
    for i, n in enumerate(names):
        e, er = po["both"]["expectation"]["global"][i], pr["both"]["expectation"]["global"][i]
        o = po["both"]["global"][i]
        rows.append([n, _f(o, 4), _f(e, 4), _f(o / e if o is not None and e else None, 2),
                     _f(pr["both"]["global"][i], 4), _f(er, 4), _f(po["left"]["global"][i], 4),
                     _f(po["right"]["global"][i], 4), _f(ba["rotation"]["left"]["largest"]["global"][i], 2),
                     _f(ba["spectrum_drift"]["relative_norm"]["global"][i], 5),
                     str(int(ba["intruders"]["at_epsilon"]["global"][i]))])
    lines += _table(["run", f"overlap k={k}", "random", "x random", f"overlap k=r={kr}", "random",
                     f"left k={k}", f"right k={k}", "rotation (deg)", "drift", f"intruders (eps {eps})"], rows)
    curve = ba["intruders"]["curve"]["global"]
    lines += ["", f"Intruder count (all modules) against epsilon (top-{K} vectors per module):", ""]
    lines += _table(["run", *[f"{e:g}" for e in ba["epsilons"]]],
                    [[n, *[str(int(c)) for c in curve[i]]] for i, n in enumerate(names)])
    seeded = {loss: v for loss, v in ba["by_loss"].items() if v["n_seeds"] > 1}
    if seeded:
        key = f"overlap_k{k}"
        lines += ["", "Per loss over seeds (mean ± std; noise floor = max - min over seeds of the same loss):", ""]
        cols = [key, f"{key}_over_random", f"overlap_k{kr}_r", "intruders_total", "rotation_left_largest_median"]
        lines += _table(["loss", "seeds", *[f"{c} (floor)" for c in cols]],
                        [[loss, str(v["n_seeds"]), *[f"{_pm(v[c])} ({_f(v[c]['noise_floor'], 4)})" for c in cols]]
                         for loss, v in seeded.items()])
    lines += ["", f"Merged-weight SVD accuracy: max residual {ba['merged_svd_residual_max']:.1e} (relative to "
              f"sigma_1). Base SVD cache: `{ba.get('cache', {}).get('path')}`."]
    return lines + [""]


def _pm(st: dict) -> str:
    if st.get("mean") is None:
        return "n/a"
    return _f(st["mean"], 4) + (f" ± {_f(st['std'], 4)}" if st.get("std") is not None else "")


def principal_overlap_plot(metrics: dict, path: Path) -> Path:
    """Principal overlap per layer at the default k, one line per run, the random expectation dashed."""
    from .plots import _nan, _save, plt
    ba = metrics["base_alignment"]
    po = ba["principal_overlap"][str(ba["k"])]["both"]
    layers = metrics["layers"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, run in enumerate(metrics["runs"]):
        ax.plot(layers, _nan(po["per_layer"][i]), marker=".", label=run["name"])
    # Each run weights its modules' k^2/(out in) by its own |dW|^2; the line is the mean over runs.
    expect = _nan(po["expectation"]["per_layer"]).mean(0)
    ax.plot(layers, expect, "k--", label="random expectation")
    ax.set(xlabel="layer", ylabel=f"|U0_k^T dW V0_k|^2 / |dW|^2, k={ba['k']}", yscale="log",
           title="Principal overlap with the base weights' top singular subspaces")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)
