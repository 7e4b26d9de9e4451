"""Spread across seeds: several analyses of the same six methods, one per seed, summarised as
mean +- standard deviation (global cosine, smallest principal angle, norms, accuracy), beside the noise
floor: the same loss trained with another seed (another shared initial A and data order). A cross-loss
cosine or angle means something only where it stands apart from its two losses' floors."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.errors import EngineError
from engine.fsio import write_json, write_text
from engine.outputs import claim

from .adapters import load_adapters
from .geometry import compute_geometry, summarize


def _pm(values: list[float], digits: int = 3) -> str:
    v = np.array([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return "n/a"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.{digits}f}"


def same_loss_floor(metrics: list[dict]) -> dict[str, dict]:
    """Per run name: the global cosine and the median smallest principal angles (left, right) between its
    adapters of different seeds, as lists over seed pairs (the analyses' own k)."""
    k = metrics[0]["geometry"]["principal_angles"]["k"]
    floor = {}
    for i, run in enumerate(metrics[0]["runs"]):
        aset = load_adapters([m["runs"][i]["adapter_dir"] for m in metrics])
        geo = summarize(compute_geometry(aset, k=k))
        cos = geo["cosine"]["global"]
        pairs = [(a, b) for a in range(len(metrics)) for b in range(a + 1, len(metrics))]
        floor[run["name"]] = {
            "cosine": [cos[a][b] for a, b in pairs],
            "smallest_angle_median_deg": {side: geo["principal_angles"][side]["smallest"]["median"]
                                          for side in ("left", "right")}}
    return floor


def write_seed_summary(report_dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Read each report's metrics.json (same runs in the same order) and write OUT/report.md and
    OUT/seeds.json with mean +- sample std over seeds."""
    metrics = []
    for d in report_dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise EngineError("metrics.json not found", path=path)
        metrics.append(json.loads(path.read_text()))
    names = [r["name"] for r in metrics[0]["runs"]]
    for m, d in zip(metrics, report_dirs):
        if [r["name"] for r in m["runs"]] != names:
            raise EngineError(f"runs differ from the first report's {names}", path=Path(d) / "metrics.json")
    pairs = [tuple(p) for p in metrics[0]["pairs"]]
    cos = [[m["geometry"]["cosine"]["global"][names.index(a)][names.index(b)] for m in metrics] for a, b in pairs]
    angle = [[m["geometry"]["principal_angles"]["left"]["smallest"]["median"][i] for m in metrics]
             for i in range(len(pairs))]
    norms = [[m["geometry"]["norms"]["global"][i] for m in metrics] for i in range(len(names))]
    floor = same_loss_floor(metrics)
    random_angle = (metrics[0]["geometry"]["principal_angles"].get("random") or {}).get("left", {}).get("smallest")
    summary: dict = {"seeds": len(metrics), "runs": names, "reports": [str(d) for d in report_dirs],
                     "pairs": [{"a": a, "b": b, "cosine": c, "smallest_angle_median_deg": g}
                               for (a, b), c, g in zip(pairs, cos, angle)],
                     "norms": dict(zip(names, norms)), "same_loss_floor": floor,
                     "random_smallest_angle_deg": random_angle, "accuracy": {}}
    lines = [f"# Spread over {len(metrics)} seeds", "",
             "Mean ± sample standard deviation over seeds; per-seed reports: "
             + ", ".join(f"[{Path(d).name}]({os.path.relpath(d, out)}/report.md)" for d in report_dirs), "",
             "## Update geometry", "",
             "Beside each pair, its noise floor: the same loss with another seed (cosine between a run and its "
             "own re-run, for a and for b; a cross-loss number inside that range says nothing about the losses). "
             "Random subspaces of the same size give a median smallest angle of "
             f"{'n/a' if random_angle is None else f'{random_angle:.1f}'} deg.", "",
             "| pair | global cosine | floor: cosine a, b across seeds | median smallest angle (deg, left) | "
             "floor: angle a, b across seeds |", "|---|---|---|---|---|"]
    lines += [f"| {a} - {b} | {_pm(c)} | {_pm(floor[a]['cosine'])}, {_pm(floor[b]['cosine'])} | {_pm(g, 1)} | "
              f"{_pm(floor[a]['smallest_angle_median_deg']['left'], 1)}, "
              f"{_pm(floor[b]['smallest_angle_median_deg']['left'], 1)} |" for (a, b), c, g in zip(pairs, cos, angle)]
    lines += ["", "| run | Frobenius norm of the update |", "|---|---|"]
    lines += [f"| {n} | {_pm(v, 4)} |" for n, v in zip(names, norms)]
    evals = [m.get("evaluation") or {} for m in metrics]
    for key in evals[0]:
        acc = {run: [e[key]["accuracy"][run]["accuracy"] for e in evals if key in e]
               for run in evals[0][key]["accuracy"]}
        summary["accuracy"][key] = acc
        lines += ["", f"## Accuracy ({key})", "", "| run | accuracy |", "|---|---|"]
        lines += [f"| {run} | {_pm(v)} |" for run, v in acc.items()]
    out = Path(out)
    write_json(claim(out / "seeds.json", "seeds"), summary)
    write_text(claim(out / "report.md", "report"), "\n".join(lines) + "\n")
    return summary
