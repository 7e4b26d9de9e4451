"""The verdict table: one row per claim, with the study's (or the cited paper's) number or expectation,
ours as mean and spread over seeds, the seed noise floor, and held / not held / inconclusive.

A claim is a function metrics -> Row | None (None: the runs it needs are absent); add one to `CLAIMS`.
The shared rule (RULE) compares losses through a per-run number grouped by loss over seeds.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

RULE = ("A difference between two losses counts only when it exceeds the noise floor: the larger of the two "
        "losses' seed spreads (max - min over seeds of the same loss). Held: every loss compared differs in "
        "the claimed direction by more than the floor. Not held: at least one differs the other way by more "
        "than the floor. Inconclusive otherwise, and always with a single seed (no floor).")


@dataclasses.dataclass
class Row:
    claim: str
    source: str          # where the expectation comes from
    expected: str        # the study's number or the expected direction
    ours: str            # mean (± spread) over seeds, per loss
    noise_floor: str
    verdict: str         # 'held' | 'not held' | 'inconclusive'
    detail: dict = dataclasses.field(default_factory=dict)


def _fmt(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    s = f"{stat['mean']:.{digits}f}"
    return s + (f" ± {stat['std']:.{digits}f}" if stat.get("std") is not None else "")


def compare_lower(by_loss: dict, key: str, low: list[str], high: str) -> tuple[str, dict]:
    """Verdict for 'each of `low` has a smaller `key` than `high`' under RULE."""
    ref = by_loss[high][key]
    per, floors = {}, []
    for loss in low:
        st = by_loss[loss][key]
        spread = [x for x in (ref["noise_floor"], st["noise_floor"]) if x is not None]
        floor = max(spread) if len(spread) == 2 else None
        floors.append(floor)
        gap = None if ref["mean"] is None or st["mean"] is None else ref["mean"] - st["mean"]
        per[loss] = {"gap": gap, "floor": floor,
                     "side": None if gap is None or floor is None else
                     ("lower" if gap > floor else "higher" if -gap > floor else "within floor")}
    sides = [p["side"] for p in per.values()]
    if any(s == "higher" for s in sides):
        verdict = "not held"
    elif sides and all(s == "lower" for s in sides):
        verdict = "held"
    else:
        verdict = "inconclusive"
    return verdict, {"per_loss": per, "key": key}


def rl_off_principals(metrics: dict) -> Row | None:
    """'RL-style losses (GRPO, DPO) learn off the principals more than SFT' (arXiv 2511.08567), judged on
    the global principal overlap at the default k, as a multiple of its random expectation."""
    ba = metrics.get("base_alignment")
    if not ba:
        return None
    by_loss = ba["by_loss"]
    rl = [x for x in ("grpo", "dpo") if x in by_loss]
    if "sft" not in by_loss or not rl:
        return None
    key = f"overlap_k{ba['k']}_over_random"
    verdict, detail = compare_lower(by_loss, key, rl, "sft")
    ours = "; ".join(f"{x} {_fmt(by_loss[x][key], 2)}" for x in ["sft", *rl])
    floors = "; ".join(f"{x} {_fmt({'mean': by_loss[x][key]['noise_floor']}, 2)}" for x in ["sft", *rl])
    return Row(claim="RL-style losses (GRPO, DPO) learn off the principals more than SFT",
               source="arXiv 2511.08567 (RLVR vs SFT); the study reports no such number",
               expected="principal overlap (top-k, as a multiple of random) lower for GRPO and DPO than SFT",
               ours=f"overlap/random at k={ba['k']}: {ours}", noise_floor=floors, verdict=verdict, detail=detail)


CLAIMS: list[Callable[[dict], Row | None]] = [rl_off_principals]


def verdict_rows(metrics: dict) -> list[dict]:
    """Every claim whose runs are present, as JSON-ready dicts (metrics['verdicts'])."""
    return [dataclasses.asdict(row) for claim in CLAIMS if (row := claim(metrics)) is not None]


def render_verdicts(metrics: dict) -> list[str]:
    rows = metrics.get("verdicts") or []
    if not rows:
        return []
    lines = ["## Verdicts", "", f"Rule: {RULE}", "",
             "| claim | source | expected | ours (mean ± std over seeds) | noise floor | verdict |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['claim']} | {r['source']} | {r['expected']} | {r['ours']} | {r['noise_floor']} | "
              f"**{r['verdict']}** |" for r in rows]
    return lines + [""]
