"""The verdict table of a study over seeds: one row per claim of the study (protocol.md section 1), with
the study's number, ours as mean ± standard deviation over seeds (within-seed pairs only), the noise floor
(the same loss with another seed), and a verdict by the rule below. A claim that does not reproduce is a
result: the table says so, nothing is tuned to make it hold.

Rule. Each claim is one or more parts; a part is a number computed per seed and a band it must lie in.
A part holds when mean ± std over seeds lies inside the band, fails when mean ± std lies outside it, and is
inconclusive when the interval straddles a bound; with a single seed there is no spread and every part is
inconclusive. A claim is held when every part holds, not held when any part fails, inconclusive otherwise.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable, Sequence

from .verdicts import rl_off_principals

RULE = ("Each part of a claim is a number computed per seed and a band it must lie in: the part holds when "
        "mean ± std over seeds lies inside the band, fails when it lies outside, and is inconclusive when it "
        "straddles a bound (always with one seed). A claim is held when all its parts hold, not held when any "
        "part fails, inconclusive otherwise.")
INF = math.inf


def _stat(values: Sequence[float | None]) -> dict:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return {"mean": statistics.fmean(v) if v else None, "std": statistics.stdev(v) if len(v) > 1 else None,
            "values": v}


def _fmt(st: dict, digits: int = 3) -> str:
    if st["mean"] is None:
        return "n/a"
    return f"{st['mean']:.{digits}f}" + ("" if st["std"] is None else f" ± {st['std']:.{digits}f}")


class Seeds:
    """Per-seed lookups over the analyses of one study (metrics.json dicts, same runs in each)."""

    def __init__(self, metrics: list[dict], floor: dict[str, dict]) -> None:
        self.metrics, self.floor = metrics, floor
        self.names = [r["name"] for r in metrics[0]["runs"]]

    def has(self, *runs: str) -> bool:
        return all(r in self.names for r in runs)

    def per_seed(self, fn: Callable[[dict], float | None]) -> list[float | None]:
        out = []
        for m in self.metrics:
            try:
                out.append(fn(m))
            except (KeyError, TypeError, ValueError, IndexError):
                out.append(None)
        return out

    def cos(self, a: str, b: str) -> list[float | None]:
        i, j = self.names.index(a), self.names.index(b)
        return self.per_seed(lambda m: m["geometry"]["cosine"]["global"][i][j])

    def ortho(self, run: str, late: bool = False) -> list[float | None]:
        i = self.names.index(run)

        def one(m: dict) -> float:
            of = m["geometry"]["orthogonal_fraction"]["vector"]
            if not late:
                return of["global"][i]
            layers = of["per_layer"][i]
            tail = layers[-max(1, len(layers) // 4):]
            return statistics.fmean(tail)
        return self.per_seed(one)

    def barrier(self, a: str, b: str) -> list[float | None]:
        def one(m: dict) -> float | None:
            for c in m["function_space"]["lmc"]:
                if {c["a"], c["b"]} == {a, b}:
                    return c["barrier"]
            return None
        return self.per_seed(one)

    def cka_late(self, a: str, b: str) -> list[float | None]:
        def one(m: dict) -> float | None:
            cka = m["function_space"]["cka"]
            for pair, vals in zip(cka["pairs"], cka["per_layer"]):
                if set(pair) == {a, b}:
                    tail = [x for x in vals[-max(1, len(vals) // 3):] if x is not None]
                    return statistics.fmean(tail) if tail else None
            return None
        return self.per_seed(one)

    def eval_files(self) -> list[str]:
        """The evaluations every seed has (`<task>_<split>` keys), in the first seed's order."""
        keys = [list((m.get("evaluation") or {})) for m in self.metrics]
        return [k for k in keys[0] if all(k in ks for ks in keys[1:])]

    def accuracy(self, run: str, key: str) -> list[float | None]:
        return self.per_seed(lambda m: m["evaluation"][key]["accuracy"][run]["accuracy"])

    def floor_cos(self, *runs: str) -> str:
        return "; ".join(f"{r} {_fmt(_stat(self.floor[r]['cosine']))}" for r in runs if r in self.floor)


def _diff(xs: list, ys: list) -> list:
    return [None if x is None or y is None else x - y for x, y in zip(xs, ys)]


def _part(label: str, values: list, band: tuple[float, float], digits: int = 3) -> dict:
    st = _stat(values)
    lo, hi = band
    if st["mean"] is None or st["std"] is None:
        verdict = "inconclusive"
    elif lo <= st["mean"] - st["std"] and st["mean"] + st["std"] <= hi:
        verdict = "held"
    elif st["mean"] + st["std"] < lo or st["mean"] - st["std"] > hi:
        verdict = "not held"
    else:
        verdict = "inconclusive"
    return {"label": label, "stat": st, "band": [lo, hi], "verdict": verdict, "shown": f"{label} {_fmt(st, digits)}"}


def _row(claim: str, expected: str, parts: list[dict], floor: str) -> dict:
    verdicts = [p["verdict"] for p in parts]
    verdict = ("not held" if "not held" in verdicts else "held" if verdicts and all(v == "held" for v in verdicts)
               else "inconclusive")
    bands = "; ".join(f"{p['label']} in [{p['band'][0]:g}, {p['band'][1]:g}]" for p in parts)
    return {"claim": claim, "expected": expected, "ours": "; ".join(p["shown"] for p in parts),
            "noise_floor": floor or "n/a", "bands": bands, "verdict": verdict, "parts": parts}


def study_rows(metrics: list[dict], floor: dict[str, dict]) -> list[dict]:
    """Every claim whose runs are present, as JSON-ready rows."""
    s = Seeds(metrics, floor)
    rows = []
    if s.has("sft", "rft", "rift"):
        rows.append(_row("(i) SFT, RFT and RIFT learn colinear updates",
                         "cos SFT-RFT 0.977, SFT-RIFT 0.967; smallest angle 6.7 / 8.2 deg",
                         [_part("cos sft-rft", s.cos("sft", "rft"), (0.9, 1.0)),
                          _part("cos sft-rift", s.cos("sft", "rift"), (0.9, 1.0))],
                         "same loss across seeds, cos: " + s.floor_cos("sft", "rft", "rift")))
    if s.has("sft", "rft", "rift", "dft"):
        nearest = [None if x is None or y is None else max(x, y) for x, y in zip(s.cos("sft", "rft"), s.cos("sft", "rift"))]
        rows.append(_row("(ii) DFT diverges most from SFT among the imitation losses",
                         "cos SFT-DFT 0.57 against 0.97 for RFT / RIFT",
                         [_part("max(cos sft-rft, sft-rift) - cos sft-dft", _diff(nearest, s.cos("sft", "dft")), (0, INF))],
                         "same loss across seeds, cos: " + s.floor_cos("sft", "dft")))
    if s.has("sft", "grpo"):
        rows.append(_row("(iii) GRPO adds an orthogonal component to SFT (more in late layers) and stays in its basin",
                         "orthogonal fraction 0.67 globally, ~0.8 in the last layers; no LMC barrier",
                         [_part("orthogonal fraction", s.ortho("grpo"), (0.5, 0.85)),
                          _part("late - global", _diff(s.ortho("grpo", late=True), s.ortho("grpo")), (0, INF)),
                          _part("LMC barrier grpo-sft (nats/token)", s.barrier("grpo", "sft"), (-INF, 0.05), 4)],
                         "same loss across seeds, cos: " + s.floor_cos("sft", "grpo")))
    if s.has("sft", "grpo", "dpo"):
        others = [n for n in ("sft", "rft", "dft", "rift", "grpo") if n in s.names]
        most = [max((abs(c) for c in cs if c is not None), default=None)
                for cs in zip(*[s.cos("dpo", o) for o in others])]
        parts = [_part("max abs(cos dpo-other)", most, (0, 0.2)),
                 _part("barrier dpo-sft - barrier grpo-sft", _diff(s.barrier("dpo", "sft"), s.barrier("grpo", "sft")), (0, INF), 4)]
        if s.has("rift"):
            parts.append(_part("late CKA sft-rift - dpo-grpo", _diff(s.cka_late("sft", "rift"), s.cka_late("dpo", "grpo")), (0, INF)))
        rows.append(_row("(iv) DPO is near-orthogonal to the others, with an LMC barrier and a late-layer CKA drop",
                         "cos ~0.06; CKA DPO-GRPO ~0.45 from layer 25 on (SFT-RIFT > 0.99)", parts,
                         "same loss across seeds, cos: " + s.floor_cos("dpo")))
    if s.has("dpo") and len(s.names) > 1 and s.eval_files():
        losses = [n for n in ("sft", "rft", "dft", "rift", "grpo") if n in s.names]
        parts = []
        for key in s.eval_files():  # the easy split, and the hard one when it was evaluated
            best = [max((a for a in accs if a is not None), default=None)
                    for accs in zip(*[s.accuracy(n, key) for n in losses])]
            parts.append(_part(f"{key}: acc dpo - best other", _diff(s.accuracy("dpo", key), best), (0, INF)))
        rows.append(_row("(v) DPO is the most accurate, on the easy and the hard split",
                         "GSM8K 93.5% against 87-88%; AIME 2026 30.0% against 3.3-10.0%", parts,
                         "accuracy of each run over seeds is in the accuracy tables"))
    if s.has("sft", "dpo", "dpo_lr_matched"):
        rows.append(_row("(vi, open) DPO's separation is its loss, not its 10x smaller learning rate",
                         "the study leaves it open; DPO at the shared rate stays near-orthogonal to SFT if so",
                         [_part("abs(cos dpo_lr_matched-sft)", [None if c is None else abs(c) for c in s.cos("dpo_lr_matched", "sft")], (0, 0.2)),
                          _part("abs(cos dpo-sft)", [None if c is None else abs(c) for c in s.cos("dpo", "sft")], (0, 0.2))],
                         "same loss across seeds, cos: " + s.floor_cos("dpo", "dpo_lr_matched")))
    principal = _principal_row(metrics)
    if principal:
        rows.append(principal)
    return rows


def _principal_row(metrics: list[dict]) -> dict | None:
    """arXiv 2511.08567's claim (analysis.verdicts) judged over seeds: each seed's run is one sample."""
    bas = [m.get("base_alignment") for m in metrics]
    if not all(bas):
        return None
    k = bas[0]["k"]
    key = f"overlap_k{k}_over_random"
    by_loss: dict = {}
    for loss in bas[0]["by_loss"]:
        vals = [ba["by_loss"][loss][key]["mean"] for ba in bas if loss in ba["by_loss"]]
        st = _stat(vals)
        by_loss[loss] = {key: {**st, "noise_floor": (max(st["values"]) - min(st["values"])) if len(st["values"]) > 1 else None}}
    row = rl_off_principals({"base_alignment": {"by_loss": by_loss, "k": k}})
    if row is None:
        return None
    return {"claim": row.claim, "expected": row.expected, "ours": row.ours, "noise_floor": row.noise_floor,
            "bands": "the gap to SFT beyond the larger seed spread (analysis.verdicts.RULE)", "verdict": row.verdict,
            "parts": [row.detail]}


def render_study_rows(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["## Verdicts: the study's claims at this scale", "", f"Rule: {RULE}", "",
             "| claim | the study | ours (mean ± std over seeds) | noise floor | bands | verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['claim']} | {r['expected']} | {r['ours']} | {r['noise_floor']} | {r['bands']} | **{r['verdict']}** |"
              for r in rows]
    return lines + [""]

