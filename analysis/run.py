"""`run_analysis`: geometry of N adapters, optional function-space comparisons and eval statistics,
written as metrics.json (schema: docs/analysis.md), report.md and PNG plots.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

from engine.errors import EngineError
from engine.fsio import write_json, write_text
from engine.outputs import claim, claim_dir

from .adapters import AdapterSet, load_adapters
from .floors import init_alignment, principal_angle_floors
from .run_info import training_info
from .geometry import compute_geometry, summarize
from .report import method_of, render

REPORT_DIR = "reports/analysis"
SCHEMA_VERSION = 2   # 2: LMC on the gold worked solution, headline barrier above the chord, path accuracy, k < r
K_OVER_R = 10 / 32   # the study's top-k at rank 32 (protocol section 4): k scales with r and never equals it


def default_k(r: int) -> int:
    """The study's k / r = 10 / 32 at any rank, rounded half up, at least 1 and below r (r = 1 leaves k = 1)."""
    return max(1, min(r - 1, int(r * K_OVER_R + 0.5)))


def check_k(k: int | None, r: int) -> int:
    """k for principal angles: `default_k(r)` when None; an explicit k must lie in [1, r)."""
    if k is None:
        return default_k(r)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise EngineError(f"expected a positive integer, got {k!r}", field="k")
    if k >= r and r > 1:
        raise EngineError(f"k = {k} is not below the adapters' rank {r}: at k >= r the principal angles are "
                          f"angles between whole adapter spans, not top-k directions (protocol section 4); "
                          f"the study's ratio gives k = {default_k(r)}", field="k")
    return k


def resolve_reference(reference: str | None, names: list[str]) -> int:
    """Index of the reference run: exact name, else the unique run whose method (first path
    component) matches; None means the first run."""
    if reference is None:
        return 0
    if reference in names:
        return names.index(reference)
    hits = [i for i, n in enumerate(names) if method_of(n) == reference.lower()]
    if len(hits) == 1:
        return hits[0]
    raise EngineError(f"reference run {reference!r} is not one of the runs {names}; pass --reference NAME",
                      field="reference")


def _has_weights(base: str | os.PathLike | None) -> bool:
    return base is not None and Path(base).is_dir() and any(Path(base).glob("*.safetensors"))


def _clean(x):
    """NaN / inf -> None, so metrics.json is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def lmc_pair_list(lmc_pairs: str | Sequence[tuple[str, str]], names: list[str], ref: int) -> list[tuple[int, int]]:
    """(a, b) index pairs: 'reference' = every other run against the reference (b = reference, so
    alpha = 0 is the reference), 'all' = every pair, or explicit (name_a, name_b) pairs."""
    if lmc_pairs == "reference":
        return [(i, ref) for i in range(len(names)) if i != ref]
    if lmc_pairs == "all":
        return [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    out = []
    for a, b in lmc_pairs:
        out.append((resolve_reference(a, names), resolve_reference(b, names)))
    return out


def function_space_section(aset: AdapterSet, base, ref: int, *, task: str, split: str, style: str | None,
                           n_items: int, lmc_points: int, lmc_pairs, cka_mode: str, batch_size: int, device,
                           dtype, data_dir, tokenizer, enable_thinking, progress: bool,
                           path_accuracy_alphas: Sequence[float] = (0.0, 0.5, 1.0),
                           max_new_tokens: int = 1024) -> dict:
    from engine import load_tokenizer
    from engine.tasks.registry import default_style, load_task

    from .function_space import (PathAccuracy, layer_cka, lmc_curve, load_function_model, prompt_batches,
                                 scored_loss, solution_batches)
    if lmc_points < 2:
        raise EngineError(f"expected at least 2 grid points, got {lmc_points}", field="lmc_points")
    style = style or default_style(task)
    items = load_task(task, split, data_dir=data_dir, limit=n_items)
    if not items:
        raise EngineError(f"task {task}/{split} has no items", field="task")
    setter = load_function_model(base, aset, device=device, dtype=dtype)
    tok = load_tokenizer(tokenizer or base)
    dev = setter.model.device
    solutions = solution_batches(tok, items, style=style, enable_thinking=enable_thinking, batch_size=batch_size,
                                 device=dev)
    prompts = prompt_batches(tok, items, style=style, enable_thinking=enable_thinking, batch_size=batch_size,
                             device=dev)
    alphas = [i / (lmc_points - 1) for i in range(lmc_points)]
    pair_list = lmc_pair_list(lmc_pairs, aset.names, ref)
    lmc = [lmc_curve(setter, a, b, solutions, alphas, progress) for a, b in pair_list]
    setter.set([0.0] * len(aset.names))
    base_loss = scored_loss(setter.model, solutions)   # the yardstick for every endpoint's loss
    if path_accuracy_alphas:
        # Greedy accuracy along the path: a loss barrier matters when it costs answers too.
        acc = PathAccuracy(setter, tok, items, style=style, enable_thinking=enable_thinking,
                           max_new_tokens=max_new_tokens, batch_size=max(batch_size, 32))
        for curve, (a, b) in zip(lmc, pair_list):
            curve["accuracy"] = acc.along(a, b, path_accuracy_alphas)
    cka = layer_cka(setter, prompts, cka_mode, progress)                       # [R, R, L]
    pairs = [(i, j) for i in range(len(aset.names)) for j in range(i + 1, len(aset.names))]
    layers = list(range(cka.shape[-1]))    # decoder layer index; the embeddings are left out
    return {"task": task, "split": split, "n_items": len(items), "style": style, "base_loss": base_loss, "lmc": lmc,
            "cka": {"mode": cka_mode, "layers": layers, "pairs": [[aset.names[i], aset.names[j]] for i, j in pairs],
                    "per_layer": [cka[i, j].tolist() for i, j in pairs]}}


def run_analysis(run_dirs: Sequence[str | os.PathLike], base: str | os.PathLike | None = None,
                 reference: str | None = "sft", eval_dir: str | os.PathLike | None = None,
                 out: str | os.PathLike = REPORT_DIR, *, k: int | None = None, checkpoint: str = "final",
                 function_space: bool | None = None, task: str = "gsm8k", split: str = "test",
                 style: str | None = None, n_items: int = 100, lmc_points: int = 11,
                 lmc_pairs: str | Sequence[tuple[str, str]] = "reference", cka_mode: str = "mean",
                 batch_size: int = 8, device=None, dtype=None, data_dir=None, tokenizer=None,
                 enable_thinking: bool | None = None, plots: bool = True, progress: bool = True,
                 path_accuracy_alphas: Sequence[float] = (0.0, 0.5, 1.0), max_new_tokens: int = 1024,
                 echo: Callable[[str], None] = print, base_alignment: dict | None = None) -> dict:
    """Analyse N runs; write OUT/metrics.json, OUT/report.md and OUT/*.png. Returns the metrics dict.

    function_space: None runs LMC and CKA when `base` is a local model directory with weights,
    True requires it, False skips them (geometry needs only the adapters). k: top-k for principal angles,
    None = the study's k / r (`default_k`). path_accuracy_alphas: where greedy accuracy along each LMC
    path is measured (empty: not at all), with `max_new_tokens` per answer."""
    claim(claim_dir(out) / "metrics.json", "metrics")  # refused before the work, not after it
    claim(Path(out) / "report.md", "report")
    if function_space is None:
        function_space = _has_weights(base)
    if function_space and base is None:
        raise EngineError("function-space comparisons (LMC, CKA) need the base model: pass --base", field="base")
    aset = load_adapters(list(run_dirs), base, checkpoint)
    names = aset.names
    ref = resolve_reference(reference, names)
    k = check_k(k, aset.rank)
    echo(f"geometry: {len(names)} runs x {len(aset.modules)} modules (rank {aset.rank}), reference {names[ref]}")
    geo = compute_geometry(aset, k=k, reference=ref)
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "runs": [{"name": r.name, "adapter_dir": str(r.adapter_dir), "r": r.r, "lora_alpha": r.alpha,
                  "use_rslora": r.use_rslora, "scale": r.scale, "base_model": r.base_model,
                  "target_modules": list(r.target_modules), "training": training_info(r.adapter_dir)}
                 for r in aset.runs],
        "base": None if base is None else str(base),
        "reference": names[ref], "checkpoint": checkpoint,
        "modules": aset.modules, "layers": sorted(set(aset.layer_of)), "module_types": list(dict.fromkeys(aset.type_of)),
        "pairs": [[names[i], names[j]] for i, j in geo.pairs],
        "geometry": summarize(geo),
        "function_space": None, "evaluation": None,
    }
    if function_space:
        echo(f"function space: {task}/{split}, {n_items} items, LMC {lmc_points} points, CKA {cka_mode}")
        metrics["function_space"] = function_space_section(
            aset, base, ref, task=task, split=split, style=style, n_items=n_items, lmc_points=lmc_points,
            lmc_pairs=lmc_pairs, cka_mode=cka_mode, batch_size=batch_size, device=device, dtype=dtype,
            data_dir=data_dir, tokenizer=tokenizer, enable_thinking=enable_thinking, progress=progress,
            path_accuracy_alphas=path_accuracy_alphas, max_new_tokens=max_new_tokens)
    if eval_dir is not None:
        from .stats import evaluation
        # The base model's results, when evaluated beside the runs, join the accuracy table and McNemar.
        extra = ["base"] if (Path(eval_dir) / "base").is_dir() and "base" not in names else []
        metrics["evaluation"] = evaluation(eval_dir, extra + names)
    metrics["geometry"]["principal_angles"]["random"] = principal_angle_floors(aset, k)
    metrics["geometry"]["init_alignment"] = init_alignment(aset, k)
    from .base_alignment_summary import base_alignment_section
    from .verdicts import verdict_rows
    metrics["base_alignment"] = base_alignment_section(aset, base, out, base_alignment, device=device,
                                                       progress=progress, echo=echo)
    metrics["verdicts"] = verdict_rows(metrics)
    metrics = _clean(metrics)
    out = Path(out)
    metrics["plots"] = []
    if plots:
        from .plots import draw_all
        metrics["plots"] = draw_all(metrics, out)
    write_json(claim(out / "metrics.json", "metrics"), metrics)
    write_text(claim(out / "report.md", "report"), render(metrics))
    echo(f"wrote {out / 'metrics.json'}, {out / 'report.md'} and {len(metrics['plots'])} plots")
    return metrics
