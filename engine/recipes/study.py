"""The whole study on one command (`make demo` / `cli.py demo`): every loss on identical rollouts and
seed -> greedy evaluation of the base and every adapter -> the analysis report, for several seeds.

The study's design at toy scale:
- seven runs per seed: the six losses and `dpo_lr_matched`, DPO at the other losses' learning rate (the
  study's open question: is DPO's separation from the others its loss or its 10x smaller learning rate?);
- the analysed and evaluated checkpoint is the one at two thirds of the steps (the study's step 1000 of
  1500), `analysis_step`;
- seeds: one shared initial A and data order within a seed, different ones across seeds; the summary
  over seeds sets the same-loss cross-seed floor beside every cross-loss number;
- seeds run in parallel worker processes (one per core, each on its share of the threads).

Runs on the embedded default (a tiny Qwen3 and its K = 4 rollouts, shipped in embedded/) on a CPU in
minutes; `configs/paper.toml` holds the same pipeline at the study's scale.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import losses

from engine.train.train_config import REPO_ROOT, TrainConfig, load_config

ANALYSIS_FRACTION = 2 / 3   # the study analyses step 1000 of 1500


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One trained adapter of a seed: its directory / report name and the loss it trains."""
    name: str
    loss: str


def study_runs(loss_names: Sequence[str]) -> list[StudyRun]:
    """The losses asked for, plus `dpo_lr_matched` whenever DPO is among them."""
    runs = [StudyRun(n, n) for n in loss_names]
    if "dpo" in loss_names:
        runs.append(StudyRun("dpo_lr_matched", "dpo"))
    return runs


def analysis_step(steps: int) -> int:
    """The checkpoint every analysis and evaluation uses: two thirds of the way (at least step 1)."""
    return max(1, round(steps * ANALYSIS_FRACTION))


def checkpoint_name(steps: int) -> str:
    step = analysis_step(steps)
    return "final" if step >= steps else f"step-{step}"


def run_config(config: str | Path, run: StudyRun, seed: int, out: Path, steps: int | None) -> TrainConfig:
    """The run's training config: the preset, its seed, the analysed checkpoint kept, and for
    `dpo_lr_matched` the preset's per-loss learning rate for DPO dropped (so it trains at `lr`)."""
    cfg = load_config(config, loss=run.loss, seed=seed, out=str(out), steps=steps)
    step = analysis_step(cfg.steps)
    # The preset's own checkpoints past a shortened run (--steps) would never be reached: keep those inside.
    cfg.checkpoint_steps = sorted({s for s in cfg.checkpoint_steps if s < cfg.steps} | ({step} - {cfg.steps}))
    if run.name != run.loss:
        cfg.lr_per_loss = {k: v for k, v in cfg.lr_per_loss.items() if k != run.loss}
    return cfg


@dataclasses.dataclass(frozen=True)
class _SeedJob:
    """Everything one seed's worker needs (picklable: it crosses into a spawned process)."""
    seed: int
    out: Path
    config: str
    runs: tuple[StudyRun, ...]
    base: str
    task: str
    splits: tuple[str, ...]
    style: str
    eval_limit: int | None
    max_new_tokens: int
    eval_batch_size: int
    function_space: bool
    n_items: int
    steps: int | None
    resume: bool
    report: Path
    threads: int | None = None


def run_study(out: str | Path = "runs/demo", *, config: str | Path = REPO_ROOT / "configs" / "cpu.toml",
              seeds: Sequence[int] = (42, 43), loss_names: Sequence[str] | None = None, task: str = "synthetic",
              splits: Sequence[str] = ("test", "hard"), style: str = "plain", eval_limit: int | None = None,
              max_new_tokens: int = 256, eval_batch_size: int = 64, function_space: bool = True,
              n_items: int = 100, steps: int | None = None, resume: bool = True, workers: int | None = None,
              echo: Callable[[str], None] = print) -> Path:
    """Train every run for every seed, evaluate, analyse. Returns the report directory.

    Finished pieces are reused on a rerun (trainings resume from their checkpoints; evaluations whose
    per-item file exists are kept), so an interrupted demo continues where it stopped. `workers`:
    processes the seeds run in (default: one per core, at most one per seed). `splits`: every run is
    evaluated on each (synthetic: the easy test split, the GSM8K analogue, and the hard one, the AIME
    analogue); the first is also the one the function-space analysis scores."""
    out = Path(out)
    runs = tuple(study_runs(list(loss_names or losses.names())))
    t0 = time.perf_counter()
    base = load_config(config).model
    eval_dir = out / "eval"
    from engine.generate.rollout import run_eval
    splits = tuple(splits)
    _evaluate(run_eval, base, None, eval_dir / "base", task, splits, style, eval_limit, max_new_tokens,
              eval_batch_size, echo)
    workers = max(1, min(len(seeds), workers or os.cpu_count() or 1))
    jobs = [_SeedJob(seed=seed, out=out, config=str(config), runs=runs, base=str(base), task=task, splits=splits,
                     style=style, eval_limit=eval_limit, max_new_tokens=max_new_tokens,
                     eval_batch_size=eval_batch_size, function_space=function_space, n_items=n_items,
                     steps=steps, resume=resume,
                     report=out / f"report-seed-{seed}" if len(seeds) > 1 else out / "report",
                     threads=None if workers == 1 else max(1, (os.cpu_count() or 1) // workers))
            for seed in seeds]
    echo(f"[{time.perf_counter() - t0:6.0f}s] {len(seeds)} seed(s) x {len(runs)} runs "
         f"({', '.join(r.name for r in runs)}) in {workers} process(es)")
    if workers == 1:
        reports = [_seed_study(job, echo) for job in jobs]
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            reports = list(pool.map(_seed_study, jobs))
    if len(seeds) > 1:
        from analysis.seeds import write_seed_summary
        build = Path(base).parent / "BUILD.json"  # the embedded default's teacher / student numbers
        write_seed_summary(reports, out / "report",
                           build=json.loads(build.read_text()) if build.is_file() else None)
    echo(f"[{time.perf_counter() - t0:6.0f}s] done")
    return out / "report"


def _seed_study(job: _SeedJob, echo: Callable[[str], None] | None = None) -> Path:
    """One seed: train its runs, evaluate the analysed checkpoints, analyse. Returns its report dir."""
    if job.threads is not None:
        import torch
        torch.set_num_threads(job.threads)
    echo = echo or (lambda msg: print(f"[seed {job.seed}] {msg}", flush=True))
    from analysis import run_analysis

    from engine.generate.rollout import run_eval
    from engine.train.trainer import train
    seed_dir, eval_dir = job.out / f"seed-{job.seed}", job.out / "eval"
    dirs = []
    for run in job.runs:
        cfg = run_config(job.config, run, job.seed, seed_dir / run.name, job.steps)
        if not (seed_dir / run.name / "final").is_dir():
            echo(f"train {run.name} (seed {job.seed}, loss {run.loss}, lr {cfg.lr_for(run.loss):g})")
            train(cfg, resume=job.resume and (seed_dir / run.name).is_dir())
        checkpoint = checkpoint_name(cfg.steps)
        dirs.append(seed_dir / run.name)
        _evaluate(run_eval, job.base, seed_dir / run.name / checkpoint, eval_dir / f"seed-{job.seed}" / run.name,
                  job.task, job.splits, job.style, job.eval_limit, job.max_new_tokens, job.eval_batch_size, echo)
    _link_base_eval(eval_dir, job.seed)
    echo(f"analyse seed {job.seed} at {checkpoint}")
    names = [r.name for r in job.runs]
    run_analysis(dirs, base=job.base, reference="sft" if "sft" in names else names[0], checkpoint=checkpoint,
                 eval_dir=eval_dir / f"seed-{job.seed}", out=job.report, task=job.task, split=job.splits[0],
                 style=job.style, function_space=job.function_space, n_items=job.n_items,
                 max_new_tokens=job.max_new_tokens, echo=echo)
    return job.report


def _evaluate(run_eval, base, adapter, out_dir: Path, task, splits, style, limit, max_new_tokens, batch_size,
              echo) -> None:
    for split in splits:
        if (out_dir / f"{task}_{split}.jsonl").is_file():
            continue
        run_eval(str(base), adapter=None if adapter is None else str(adapter), task=task, split=split,
                 limit=limit, out=str(out_dir), max_new_tokens=max_new_tokens, batch_size=batch_size,
                 style=style, echo=echo)


def _link_base_eval(eval_dir: Path, seed: int) -> None:
    """The base model's evaluation is shared by every seed: place it beside that seed's runs."""
    import shutil
    dst = eval_dir / f"seed-{seed}" / "base"
    if not dst.exists():
        shutil.copytree(eval_dir / "base", dst)
