"""report.md from the metrics.json dict: tables a reader can set beside the study's headline numbers
(protocol.md section 1). Every number printed here is also in metrics.json.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .base_alignment_report import render_base_alignment
from .verdicts import render_verdicts

# The study's headline numbers (protocol.md section 1), keyed by method pair (unordered).
HEADLINE_COSINE = {("sft", "rft"): 0.977, ("sft", "rift"): 0.967, ("sft", "dft"): 0.57, ("sft", "grpo"): 0.74,
                   ("sft", "dpo"): 0.06}
HEADLINE_ANGLE = {("sft", "rft"): 6.7, ("sft", "rift"): 8.2, ("sft", "grpo"): 18.5, ("sft", "dft"): 26.7,
                  ("sft", "dpo"): 54.6}


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _p(x) -> str:
    return "n/a" if x is None else (f"{x:.2e}" if x < 1e-3 else f"{x:.4f}")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _path_accuracy(acc: dict | None) -> str:
    """'0.41 / 0.38 / 0.44' at alpha = 0, 1/2, 1 (whichever were measured), 'n/a' when none were."""
    if not acc:
        return "n/a"
    return " / ".join(_f(a, 2) for a in acc["accuracy"])


def _angle_controls(geo: dict, names: list[str]) -> list[str]:
    """The two controls beside the principal angles: random subspaces of the same size and dimension, and
    each run's right subspace against its (shared, seeded) initial A."""
    pa, lines = geo["principal_angles"], []
    if pa.get("random"):
        rnd = pa["random"]
        lines += ["", f"Random floor: two independent random top-{pa['k']} subspaces of each module's dimension give "
                  f"a median smallest / {pa['k']}-th angle of {_f(rnd['left']['smallest'], 1)} / "
                  f"{_f(rnd['left']['kth'], 1)} deg on the left (output) side and {_f(rnd['right']['smallest'], 1)} / "
                  f"{_f(rnd['right']['kth'], 1)} deg on the right (input) side ({rnd['left']['trials']} draws)."]
    init = geo.get("init_alignment")
    if init and any(init["runs"]):
        lines += ["", f"Right subspace vs the initial A (every run of a seed starts from the same A; small angles "
                  f"here mean the right-side angles between runs reflect the shared init, not the losses). Random "
                  f"{init['k']}- vs {init['r']}-dimensional subspaces: {_f(init['random']['smallest'], 1)} / "
                  f"{_f(init['random']['kth'], 1)} deg.", ""]
        lines += _table(["run", "seed", "smallest", f"{init['k']}-th"],
                        [[n, str(r["seed"]), f"{_f(r['smallest']['median'], 1)} [{_f(r['smallest']['q25'], 1)}, "
                          f"{_f(r['smallest']['q75'], 1)}]", f"{_f(r['kth']['median'], 1)} [{_f(r['kth']['q25'], 1)}, "
                          f"{_f(r['kth']['q75'], 1)}]"] for n, r in zip(names, init["runs"]) if r])
    return lines


def method_of(name: str) -> str:
    """'sft', 'runs/sft/step-1000' -> 'sft': the first path component, lower-cased."""
    return name.split("/")[0].lower()


def _headline(metrics: dict) -> list[str]:
    names = [r["name"] for r in metrics["runs"]]
    geo = metrics["geometry"]
    index = {method_of(n): i for i, n in enumerate(names)}
    pair_index = {tuple(p): k for k, p in enumerate(metrics["pairs"])}
    rows = []
    for (a, b), study in HEADLINE_COSINE.items():
        if a in index and b in index:
            rows.append([f"cosine {a}-{b}", _f(study), _f(geo["cosine"]["global"][index[a]][index[b]])])
    for (a, b), study in HEADLINE_ANGLE.items():
        if a in index and b in index:
            ia, ib = sorted((index[a], index[b]))
            k = pair_index[(names[ia], names[ib])]
            rows.append([f"median smallest left angle {a}-{b} (deg)", _f(study, 1),
                         _f(geo["principal_angles"]["left"]["smallest"]["median"][k], 1)])
    if "dpo" in index and "sft" in index:
        n = geo["norms"]["global"]
        rows.append(["norm ratio sft / dpo", "about 13", _f(n[index["sft"]] / n[index["dpo"]], 1)])
    of = geo.get("orthogonal_fraction")
    if of and "grpo" in index and method_of(of["reference"]) == "sft":
        rows.append(["orthogonal fraction grpo vs sft (global)", "0.67", _f(of["vector"]["global"][index["grpo"]])])
    cka = (metrics.get("function_space") or {}).get("cka")
    if cka:
        by_pair = {frozenset(map(method_of, p)): v for p, v in zip(cka["pairs"], cka["per_layer"])}
        if frozenset(("sft", "rift")) in by_pair:
            vals = [v for v in by_pair[frozenset(("sft", "rift"))] if v is not None]
            rows.append(["min per-layer CKA sft-rift", "above 0.99", _f(min(vals)) if vals else "n/a"])
        for other in ("grpo", "dft"):
            key = frozenset(("dpo", other))
            late = [v for layer, v in zip(cka["layers"], by_pair.get(key, [])) if layer >= 25 and v is not None]
            if late:
                rows.append([f"mean CKA dpo-{other}, layers 25 on", "about 0.45", _f(sum(late) / len(late))])
    if not rows:
        return []
    return ["## Against the study's headline numbers", "",
            *_table(["quantity", "study", "this analysis"], rows), ""]


def render(metrics: dict) -> str:
    """report.md's text: one section after another, each from its part of metrics.json."""
    lines = _runs_section(metrics)
    lines += _headline(metrics)
    lines += render_verdicts(metrics) + render_base_alignment(metrics)
    lines += _cosine_section(metrics)
    lines += _norms_section(metrics)
    lines += _function_space_section(metrics.get("function_space"))
    lines += _evaluation_section(metrics.get("evaluation"))
    if metrics.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in metrics["plots"]]
    return "\n".join(lines) + "\n"


def _shown(path) -> str:
    """A path as a reader of the report wants it: relative to the working directory when inside it (a
    report copied elsewhere then carries no machine's temporary or home directories)."""
    if path is None:
        return "None"
    p = Path(str(path))
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve())) if p.is_absolute() else str(p)
    except ValueError:
        return str(p)


def _runs_section(metrics: dict) -> list[str]:
    lines = ["# LoRA update geometry report", ""]

    def trained(r: dict, key: str, fmt: str) -> str:
        info = r.get("training") or {}
        return "n/a" if info.get(key) is None else format(info[key], fmt)
    lines += _table(["run", "adapter", "r", "alpha", "scale", "loss", "lr", "seed", "step", "epochs", "base"],
                    [[r["name"], f"`{_shown(r['adapter_dir'])}`", str(r["r"]), f"{r['lora_alpha']:g}",
                      f"{r['scale']:g}", trained(r, "loss", ""), trained(r, "lr", "g"), trained(r, "seed", "d"),
                      trained(r, "step", "d"), trained(r, "epochs", ".2f"), _shown(r["base_model"])]
                     for r in metrics["runs"]])
    lines += ["", "Epochs = passes over the rows the loss trains on (RFT: the correct rollouts; DPO: the pairs) "
              "through the analysed step."]
    lines += ["", f"{len(metrics['modules'])} adapted modules over {len(metrics['layers'])} layers; "
              f"schema: docs/analysis.md.", ""]
    return lines


def _cosine_section(metrics: dict) -> list[str]:
    """Cosine of the updates (global, then per module type) and the principal angles of each pair."""
    names = [r["name"] for r in metrics["runs"]]
    geo = metrics["geometry"]
    lines = ["## Cosine similarity of Delta W (all modules)", ""]
    lines += _table(["", *names], [[a, *[_f(c) for c in row]] for a, row in zip(names, geo["cosine"]["global"])])
    pairs = metrics["pairs"]
    if pairs:
        types = list(geo["cosine"]["per_type"])
        lines += ["", "Per module type:", ""]
        idx = {n: i for i, n in enumerate(names)}
        lines += _table(["pair", *types], [[f"{a}-{b}", *[_f(geo["cosine"]["per_type"][t][idx[a]][idx[b]]) for t in types]]
                                           for a, b in pairs])
        lines += _angles_section(geo, pairs)
        lines += _angle_controls(geo, names)
    return lines


def _angles_section(geo: dict, pairs: list) -> list[str]:
    pa = geo["principal_angles"]
    lines = ["", f"## Principal angles between top-{pa['k']} singular subspaces (degrees, median [IQR] over modules)",
             ""]

    def cell(side: str, which: str, k: int) -> str:
        q = pa[side][which]
        return f"{_f(q['median'][k], 1)} [{_f(q['q25'][k], 1)}, {_f(q['q75'][k], 1)}]"
    lines += _table(["pair", "left smallest", f"left {pa['k']}-th", "right smallest", f"right {pa['k']}-th",
                     "median abs(<u1, u1'>)", "median abs(<v1, v1'>)"],
                    [[f"{a}-{b}", cell("left", "smallest", k), cell("left", "kth", k), cell("right", "smallest", k),
                      cell("right", "kth", k), _f(geo["alignment"]["u1"]["median"][k]),
                      _f(geo["alignment"]["v1"]["median"][k])] for k, (a, b) in enumerate(pairs)])
    return lines


def _norms_section(metrics: dict) -> list[str]:
    """Norms, effective ranks and (with a reference run) the orthogonal fraction, overall and per layer."""
    names = [r["name"] for r in metrics["runs"]]
    geo = metrics["geometry"]
    lines = ["", "## Norms and effective ranks", ""]
    norms = geo["norms"]
    of = geo.get("orthogonal_fraction")
    header = ["run", "Frobenius norm (global)", "median module norm", "median effective rank"]
    if of:
        header += [f"orthogonal fraction vs {of['reference']} (global)", "last quarter of layers (mean)",
                   f"subspace form, top-{of['subspace']['k']} (global)"]
    rows = []
    quarter = max(1, len(metrics["layers"]) // 4)
    for i, name in enumerate(names):
        row = [name, _f(norms["global"][i]), _f(statistics.median(norms["per_module"][i])),
               _f(geo["effective_rank"]["median"][i], 2)]
        if of:
            last = [v for v in of["vector"]["per_layer"][i][-quarter:] if v is not None]
            row += [_f(of["vector"]["global"][i]), _f(sum(last) / len(last) if last else None),
                    _f(of["subspace"]["global"][i])]
        rows.append(row)
    lines += _table(header, rows)

    if of:
        ref = names.index(of["reference"])
        others = [i for i in range(len(names)) if i != ref]
        lines += ["", f"Per layer, cosine with {of['reference']} / orthogonal fraction:", ""]
        lines += _table(["layer", *[names[i] for i in others]],
                        [[str(layer), *[f"{_f(geo['cosine']['per_layer'][li][ref][i])} / "
                                        f"{_f(of['vector']['per_layer'][i][li])}" for i in others]]
                         for li, layer in enumerate(metrics["layers"])])
    return lines


def _function_space_section(fs: dict | None) -> list[str]:
    """Linear mode connectivity and per-layer CKA, when the analysis ran the models."""
    if not fs:
        return []
    lines = ["", f"## Function space ({fs['task']}/{fs['split']}, {fs['n_items']} items, answer style "
             f"{fs['style']})", ""]
    if fs.get("lmc"):
        lines += ["Linear mode connectivity, W(alpha) = W0 + alpha Delta_a + (1 - alpha) Delta_b; loss = mean "
                  "token cross-entropy (nats/token), teacher-forced, of the gold worked solution and the stop "
                  "token after the prompt (the format the model writes). Barrier = the largest height of the "
                  "curve above the straight line between its endpoints (0 when the path is convex). "
                  "Accuracy = greedy pass@1 on the same items at b, the midpoint and a."
                  + (f" The base model's loss on the same tokens: {_f(fs['base_loss'], 4)}." if "base_loss" in fs else ""),
                  ""]
        lines += _table(["a", "b", "L(b)", "L(mid)", "L(a)", "barrier above line", "midpoint - mean ends",
                         "acc b / mid / a"],
                        [[c["a"], c["b"], _f(c["loss"][c["alphas"].index(0.0)], 4),
                          _f(c["loss"][c["alphas"].index(0.5)], 4) if 0.5 in c["alphas"] else "n/a",
                          _f(c["loss"][c["alphas"].index(1.0)], 4), _f(c["barrier"], 4),
                          _f(c["barrier_midpoint"], 4), _path_accuracy(c.get("accuracy"))] for c in fs["lmc"]])
        lines += [""]
    if fs.get("cka"):
        cka = fs["cka"]
        third = max(1, len(cka["layers"]) // 3)
        rows = []
        for (a, b), vals in zip(cka["pairs"], cka["per_layer"]):
            v = [x for x in vals if x is not None]
            low = min(range(len(vals)), key=lambda i: vals[i] if vals[i] is not None else math.inf)
            tail = [x for x in vals[-third:] if x is not None]
            rows.append([f"{a}-{b}", _f(min(v) if v else None), str(cka["layers"][low]), _f(sum(v) / len(v) if v else None),
                         _f(sum(tail) / len(tail) if tail else None)])
        lines += [f"Per-layer CKA ({cka['mode']}; per-layer values in metrics.json and cka_per_layer.png):", ""]
        lines += _table(["pair", "min", "layer of min", "mean", f"mean over last {third} layers"], rows)
        lines += [""]
    return lines


def _evaluation_section(ev: dict | None) -> list[str]:
    """Accuracy with its Wilson interval, and McNemar's test between runs, per evaluated task."""
    lines: list[str] = []
    for task, res in (ev or {}).items():
        lines += ["", f"## Accuracy: {task}", ""]
        lines += _table(["run", "accuracy", "95% interval (Wilson)", "correct / n"],
                        [[n, _f(a["accuracy"], 4), f"[{_f(a['ci95'][0], 4)}, {_f(a['ci95'][1], 4)}]",
                          f"{a['correct']} / {a['n']}"] for n, a in res["accuracy"].items()])
        lines += ["", "McNemar (b = a right and b wrong, c = the reverse):", ""]
        lines += _table(["run a", "run b", "b", "c", "p exact", "p mid"],
                        [[m["run_a"], m["run_b"], str(m["b"]), str(m["c"]), _p(m["p_exact"]), _p(m["p_mid"])]
                         for m in res["mcnemar"]])
    return lines
