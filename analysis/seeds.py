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
from .study_claims import render_study_rows, study_rows


def _pm(values: list[float], digits: int = 3) -> str:
    v = np.array([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return "n/a"
    # One value (one seed, or the one cross-seed pair of two seeds) has no spread to show.
    return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if v.size > 1 else "")


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


def write_seed_summary(report_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
                       build: dict | None = None) -> dict:
    """Read each report's metrics.json (same runs in the same order) and write OUT/report.md and
    OUT/seeds.json with mean +- sample std over seeds. `build`: the models' BUILD.json (the embedded
    default's), whose teacher / student numbers join the regime section."""
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
    rows = study_rows(metrics, floor)
    summary["verdicts"] = rows
    lines = [f"# The study over {len(metrics)} seeds", "",
             "Mean ± sample standard deviation over seeds of within-seed numbers; per-seed reports: "
             + ", ".join(f"[{Path(d).name}]({os.path.relpath(d, out)}/report.md)" for d in report_dirs), ""]
    lines += _regime(metrics, names, build)
    lines += render_study_rows(rows)
    lines += ["## Update geometry", "",
              "Beside each pair, its noise floor: the same loss with another seed (cosine between a run and its "
              "own re-run, for a and for b; a cross-loss number inside that range says nothing about the losses). "
              "Random subspaces of the same size give a median smallest angle of "
              f"{'n/a' if random_angle is None else f'{random_angle:.1f}'} deg.", "",
              "| pair | global cosine | floor: cosine a, b across seeds | median smallest angle (deg, left) | "
              "floor: angle a, b across seeds |", "|---|---|---|---|---|"]
    lines += [f"| {a} - {b} | {_pm(c)} | {_pm(floor[a]['cosine'])}, {_pm(floor[b]['cosine'])} | {_pm(g, 1)} | "
              f"{_pm(floor[a]['smallest_angle_median_deg']['left'], 1)}, "
              f"{_pm(floor[b]['smallest_angle_median_deg']['left'], 1)} |" for (a, b), c, g in zip(pairs, cos, angle)]
    relative = [[(m.get("base_alignment") or {}).get("relative_update_norm", {}).get("global", [None] * len(names))[i]
                 for m in metrics] for i in range(len(names))]
    lines += ["", "| run | Frobenius norm of the update | relative to the base weights | epochs at the analysed step |",
              "|---|---|---|---|"]
    lines += [f"| {n} | {_pm(v, 4)} | {_pm(rel, 4)} | {_pm(_training(metrics, i, 'epochs'), 2)} |"
              for i, (n, v, rel) in enumerate(zip(names, norms, relative))]
    lines += _function_space(metrics)
    lines += _base_alignment(metrics)
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


def _training(metrics: list[dict], i: int, key: str) -> list:
    """Run i's training fact `key` (analysis.run_info) in every seed's analysis."""
    return [(m["runs"][i].get("training") or {}).get(key) for m in metrics]


def _regime(metrics: list[dict], names: list[str], build: dict | None = None) -> list[str]:
    """How strong the model, how correct the data, what was analysed: the numbers every result needs."""
    first = metrics[0]
    lines = ["## Regime", ""]
    lines += _build_lines(build) if build and "models" in build else []
    data = next((t.get("data") for t in (r.get("training") or {} for r in first["runs"]) if t.get("data")), None)
    if data:
        lines += [f"- Rollouts: {data['rollouts']} in {data['groups']} groups, {data['positives'] / data['rollouts']:.1%} "
                  f"correct, {data['groups_mixed_reward']} groups with both outcomes."]
    if "dpo" in names:
        pairs = _training(metrics, names.index("dpo"), "examples_per_epoch")
        lines += [f"- DPO pairs: {pairs[0]} (one per mixed group); DPO counts pairs per step, the others rows."]
    ev = first.get("evaluation") or {}
    for key, section in ev.items():
        base = [(m.get("evaluation") or {}).get(key, {}).get("accuracy", {}).get("base", {}).get("accuracy")
                for m in metrics]
        if base[0] is not None:
            n = section["accuracy"]["base"]["n"]
            lo, hi = section["accuracy"]["base"]["ci95"]
            lines += [f"- Base model, greedy on {key}: {base[0]:.1%} [{lo:.1%}, {hi:.1%}] of {n} items."]
    r = first["runs"][0]
    lines += [f"- LoRA rank {r['r']}, alpha {r['lora_alpha']:g}; principal angles at k = "
              f"{first['geometry']['principal_angles']['k']}; analysed checkpoint: {first.get('checkpoint', 'final')}.",
              ""]
    return lines


def _build_lines(build: dict) -> list[str]:
    """The teacher and the student as `engine.recipes.embedded` built them (BUILD.json)."""
    def acc(g: dict) -> str:
        return f"{g['accuracy']:.1%} [{g['ci95_wilson'][0]:.1%}, {g['ci95_wilson'][1]:.1%}]"
    lines = []
    for name, m in build["models"].items():
        sh = m["shape"]
        greedy = "; ".join(f"{split} {acc(g)}" for split, g in m["greedy"].items())
        lines += [f"- {name.capitalize()}: {sh['num_hidden_layers']} layers, hidden {sh['hidden_size']}, "
                  f"{m['parameters'] / 1e6:.2f}M parameters, pretrained {m['pretrain_steps']} steps "
                  f"({m['pretrain_epochs']:g} epochs); greedy accuracy {greedy}."]
    r = build["rollouts"]
    lines += [f"- The rollouts are the {r['model']}'s (K = {r['k']}, T = {r['temperature']:g}, on {r['groups']} "
              f"train prompts neither model was pretrained on): {r['mean_reward']:.1%} correct."]
    own = build["models"].get("student", {}).get("samples_on_rollout_prompts")
    if own:
        lines += [f"- The student's own samples on those prompts (same K and T): {own['mean_reward']:.1%} correct."]
    return lines


def _function_space(metrics: list[dict]) -> list[str]:
    fs = [m.get("function_space") for m in metrics]
    if not all(fs) or not fs[0].get("lmc"):
        return []
    lines = ["", "## Linear mode connectivity and CKA", "",
             "Barrier = height above the chord between the endpoints of the in-format loss (nats/token, the gold "
             "worked solution); accuracy at the midpoint against the endpoints on the same items."
             + (f" The base model's loss on the same tokens: {fs[0]['base_loss']:.4f}." if "base_loss" in fs[0] else ""),
             "",
             "| a | b | L(b) | L(a) | barrier | acc b / mid / a |", "|---|---|---|---|---|---|"]
    for j, c in enumerate(fs[0]["lmc"]):
        curves = [f["lmc"][j] for f in fs]
        acc = [[cv.get("accuracy", {}).get("accuracy", [None] * 3)[t] for cv in curves] for t in range(3)]
        lines += [f"| {c['a']} | {c['b']} | {_pm([cv['loss'][0] for cv in curves], 4)} | "
                  f"{_pm([cv['loss'][-1] for cv in curves], 4)} | {_pm([cv['barrier'] for cv in curves], 4)} | "
                  f"{' / '.join(_pm(a, 2) for a in acc)} |"]
    cka = fs[0].get("cka")
    if cka:
        third = max(1, len(cka["layers"]) // 3)
        lines += ["", f"| pair | CKA, mean over the last {third} layers | CKA, first layer |", "|---|---|---|"]
        for j, (a, b) in enumerate(cka["pairs"]):
            vals = [f["cka"]["per_layer"][j] for f in fs]
            tail = [float(np.mean([x for x in v[-third:] if x is not None])) for v in vals]
            lines += [f"| {a} - {b} | {_pm(tail)} | {_pm([v[0] for v in vals])} |"]
    return lines


def _base_alignment(metrics: list[dict]) -> list[str]:
    bas = [m.get("base_alignment") for m in metrics]
    if not all(bas):
        return []
    k = bas[0]["k"]
    key = f"overlap_k{k}_over_random"
    lines = ["", "## Where each update sits against the base weights", "",
             f"Principal overlap at k = {k} as a multiple of a random update's; spectrum drift (median relative "
             "change of the top singular values); intruders at the headline epsilon.", "",
             "| loss | overlap / random | rotation, largest left angle (deg) | spectrum drift | intruders |",
             "|---|---|---|---|---|"]
    for loss in bas[0]["by_loss"]:
        get = lambda name: [ba["by_loss"][loss][name]["mean"] for ba in bas]  # noqa: E731
        lines += [f"| {loss} | {_pm(get(key), 2)} | {_pm(get('rotation_left_largest_median'), 1)} | "
                  f"{_pm(get('spectrum_drift_median'), 4)} | {_pm(get('intruders_total'), 1)} |"]
    return lines
