"""The whole study on one command (`make demo` / `cli.py demo`): six trainings on identical rollouts
and seed -> greedy evaluation of the base and every adapter -> the analysis report.

Runs on the embedded default (a tiny Qwen3 and its K = 4 rollouts, shipped in embedded/) on a CPU in
minutes; `configs/paper.toml` holds the same pipeline at the study's scale.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import losses

from engine.train.train_config import REPO_ROOT, load_config


def run_study(out: str | Path = "runs/demo", *, config: str | Path = REPO_ROOT / "configs" / "cpu.toml",
              seeds: Sequence[int] = (42,), loss_names: Sequence[str] | None = None, task: str = "synthetic",
              split: str = "test", style: str = "plain", eval_limit: int | None = None,
              max_new_tokens: int = 160, eval_batch_size: int = 64, function_space: bool = True,
              n_items: int = 100, steps: int | None = None, resume: bool = True,
              echo: Callable[[str], None] = print) -> Path:
    """Train every loss for every seed, evaluate, analyse. Returns the report directory.

    Finished pieces are reused on a rerun (trainings resume from their checkpoints; evaluations whose
    per-item file exists are kept), so an interrupted demo continues where it stopped."""
    from analysis import run_analysis

    from engine.generate.rollout import run_eval
    from engine.train.trainer import train

    out = Path(out)
    loss_names = list(loss_names or losses.names())
    t0 = time.perf_counter()
    base = load_config(config).model
    eval_dir = out / "eval"
    _evaluate(run_eval, base, None, eval_dir / "base", task, split, style, eval_limit, max_new_tokens,
              eval_batch_size, echo)
    reports = []
    for seed in seeds:
        seed_dir = out / f"seed-{seed}"
        runs = []
        for name in loss_names:
            cfg = load_config(config, loss=name, seed=seed, out=str(seed_dir / name), steps=steps)
            final = seed_dir / name / "final"
            if not final.is_dir():
                echo(f"[{time.perf_counter() - t0:6.0f}s] train {name} (seed {seed})")
                train(cfg, resume=resume and (seed_dir / name).is_dir())
            runs.append(seed_dir / name)
            _evaluate(run_eval, base, final, eval_dir / f"seed-{seed}" / name, task, split, style, eval_limit,
                      max_new_tokens, eval_batch_size, echo)
        _link_base_eval(eval_dir, seed)
        echo(f"[{time.perf_counter() - t0:6.0f}s] analyse seed {seed}")
        report = out / f"report-seed-{seed}" if len(seeds) > 1 else out / "report"
        run_analysis(runs, base=base, reference="sft" if "sft" in loss_names else loss_names[0],
                     eval_dir=eval_dir / f"seed-{seed}", out=report, task=task, split=split, style=style,
                     function_space=function_space, n_items=n_items, echo=echo)
        reports.append(report)
    if len(seeds) > 1:
        from analysis.seeds import write_seed_summary
        write_seed_summary(reports, out / "report")
    echo(f"[{time.perf_counter() - t0:6.0f}s] done")
    return out / "report"


def _evaluate(run_eval, base, adapter, out_dir: Path, task, split, style, limit, max_new_tokens, batch_size,
              echo) -> None:
    if (out_dir / f"{task}_{split}.jsonl").is_file():
        return
    run_eval(str(base), adapter=None if adapter is None else str(adapter), task=task, split=split, limit=limit,
             out=str(out_dir), max_new_tokens=max_new_tokens, batch_size=batch_size, style=style, echo=echo)


def _link_base_eval(eval_dir: Path, seed: int) -> None:
    """The base model's evaluation is shared by every seed: place it beside that seed's runs."""
    import shutil
    dst = eval_dir / f"seed-{seed}" / "base"
    if not dst.exists():
        shutil.copytree(eval_dir / "base", dst)
