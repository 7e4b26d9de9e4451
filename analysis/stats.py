"""Paired accuracy statistics: exact McNemar (and mid-p), accuracy with its Wilson 95% interval, and
the per-item eval files that `cli.py eval` writes (`<task>_<split>.jsonl`, one object per item).

Binomial tails are summed in exact integer arithmetic (b + c is at most a few thousand items), so
the p-values need no special functions and no scipy.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Sequence

from engine.errors import EngineError
from engine.fsio import jsonl_objects
from engine.generate.rollout import wilson_interval


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Exact McNemar test on paired correctness.

    b = items a got right and b wrong, c = the reverse. p_exact = min(1, 2 BinomCDF(min(b, c); b + c, 1/2)),
    p_mid = p_exact - BinomPMF(min(b, c); b + c, 1/2); both 1 when b + c = 0.
    Returns {'n', 'b', 'c', 'p_exact', 'p_mid'}."""
    a, bb = [bool(x) for x in correct_a], [bool(x) for x in correct_b]
    if len(a) != len(bb):
        raise EngineError(f"McNemar needs paired items: {len(a)} vs {len(bb)} results")
    b = sum(x and not y for x, y in zip(a, bb))
    c = sum(y and not x for x, y in zip(a, bb))
    n, k = b + c, min(b, c)
    if n == 0:
        return {"n": len(a), "b": b, "c": c, "p_exact": 1.0, "p_mid": 1.0}
    pmf_k = Fraction(math.comb(n, k), 2 ** n)
    cdf = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n)
    p_exact = min(Fraction(1), 2 * cdf)
    return {"n": len(a), "b": b, "c": c, "p_exact": float(p_exact), "p_mid": float(p_exact - pmf_k)}


def read_items(path: str | os.PathLike) -> dict[str, bool]:
    """Per-item eval JSONL ({'id', 'correct', ...} per line) -> {id: correct}. A summary line (a
    'summary' key, or 'accuracy' without 'id') is skipped."""
    path = Path(path)
    out: dict[str, bool] = {}
    for no, obj in jsonl_objects(path, "eval file"):
        if "summary" in obj or ("id" not in obj and "accuracy" in obj):
            continue                       # a summary line, not an item
        if "id" not in obj:
            raise EngineError("missing field", path=path, line=no, field="id")
        if not isinstance(obj.get("correct"), bool):
            raise EngineError(f"expected a boolean, got {obj.get('correct')!r}", path=path, line=no, field="correct")
        key = str(obj["id"])
        if key in out:
            raise EngineError(f"duplicate item id {key!r}", path=path, line=no, field="id")
        out[key] = obj["correct"]
    if not out:
        raise EngineError("no per-item results (lines with 'id' and 'correct') in eval file", path=path)
    return out


def paired(items_a: dict[str, bool], items_b: dict[str, bool], path_a: str, path_b: str
           ) -> tuple[list[bool], list[bool]]:
    """Align two runs' per-item results by id; refuse when they do not cover the same items."""
    if items_a.keys() != items_b.keys():
        only_a, only_b = sorted(items_a.keys() - items_b.keys()), sorted(items_b.keys() - items_a.keys())
        detail = (f"{len(only_a)} ids only in {path_a} (e.g. {only_a[0]!r})" if only_a else "") + \
                 ("; " if only_a and only_b else "") + \
                 (f"{len(only_b)} ids only in {path_b} (e.g. {only_b[0]!r})" if only_b else "")
        raise EngineError(f"McNemar needs both runs evaluated on the same items: {detail}", path=path_b)
    ids = sorted(items_a)
    return [items_a[i] for i in ids], [items_b[i] for i in ids]


def accuracy(items: dict[str, bool]) -> dict:
    n, k = len(items), sum(items.values())
    lo, hi = wilson_interval(k, n)
    return {"n": n, "correct": k, "accuracy": k / n, "ci95": [lo, hi], "ci_method": "wilson"}


def evaluation(eval_dir: str | os.PathLike, names: list[str]) -> dict:
    """Accuracy per run and McNemar per pair of runs, for every eval file the runs share.

    Layout: EVAL_DIR/<run name>/<task>_<split>.jsonl (what `cli.py eval --out EVAL_DIR/<run name>`
    writes). Every run must have the same eval files, each covering the same item ids."""
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise EngineError("eval directory not found", path=eval_dir)
    files: dict[str, dict[str, Path]] = {}
    for name in names:
        d = eval_dir / name
        found = {p.stem: p for p in sorted(d.glob("*.jsonl"))} if d.is_dir() else {}
        if not found:
            raise EngineError(f"no eval results for run {name!r}: expected <task>_<split>.jsonl files "
                              f"(from `cli.py eval --out {d}`)", path=d)
        files[name] = found
    evals = sorted(files[names[0]])
    for name in names[1:]:
        if sorted(files[name]) != evals:
            diff = sorted(set(evals) ^ set(files[name]))[0]
            has = names[0] if diff in files[names[0]] else name
            raise EngineError(f"runs were evaluated on different tasks: {diff}.jsonl exists for {has!r} only",
                              path=eval_dir / name)
    out = {}
    for ev in evals:
        items = {name: read_items(files[name][ev]) for name in names}
        pairs = []
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                ca, cb = paired(items[a], items[b], str(files[a][ev]), str(files[b][ev]))
                pairs.append({"run_a": a, "run_b": b, **mcnemar(ca, cb)})
        out[ev] = {"accuracy": {name: accuracy(items[name]) for name in names}, "mcnemar": pairs}
    return out
