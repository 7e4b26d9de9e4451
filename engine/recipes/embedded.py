"""Build the embedded default from scratch, the study's regime at toy scale: a tokenizer for the
synthetic task, a teacher and a student Qwen3 both pretrained by the engine (full-parameter mode of the
same training loop), and the teacher's K = 4, T = 1 rollouts on training prompts neither model saw.

    python cli.py build-embedded     # writes embedded/{base,teacher}/, rollouts.jsonl, sft_train.jsonl, BUILD.json

- The rollout prompts are the first `ROLLOUT_PROMPTS` items of the task's train split and the next
  `CALIBRATION_PROMPTS` choose the teacher; both models pretrain on the rest of the split
  (`sft_train.jsonl`), with any problem sharing a held-out prompt's arithmetic removed, so the rollouts
  are off-policy for the student as the study's are.
- The teacher is wider and trained longer, so its rollouts are mostly right (the study's are ~87%
  correct); the student (`base/`, the model every loss trains) is well below it on the easy split and
  rarely right on the hard one, so there is something to learn.
Every step is seeded, so a rebuild on the same software gives the same files.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from engine.fsio import jsonl_objects, write_json
from engine.model.qwen3 import Qwen3ForCausalLM
from engine.model.qwen3_config import Qwen3Config
from engine.model.weights import save_model
from engine.outputs import claim
from engine.recipes.embedded_inputs import CALIBRATION_PROMPTS, ROLLOUT_PROMPTS
from engine.train.train_config import REPO_ROOT, load_config

# Pretraining (AdamW, 5% warmup then cosine to 10%, grad clip 1.0, fp32), on a 2-core CPU.
PRETRAIN = dict(lr=3e-3, batch_size=32, micro_batch_size=32, warmup_ratio=0.05, min_lr_ratio=0.1,
                weight_decay=0.0, adam_betas=[0.9, 0.95], max_len=512)
STUDENT_STEPS = 400
# The teacher is trained on a TEACHER_STEPS schedule with a checkpoint every TEACHER_EVERY steps; the
# teacher is the checkpoint whose T = 1 samples on CALIBRATION_PROMPTS unseen train prompts come closest
# to TEACHER_TARGET (the study's teacher rollouts are ~87% correct), so the regime holds whatever the
# speed of learning on this software (accuracy moves ~5 points per 50 steps in the steep part).
TEACHER_STEPS = 1000
TEACHER_EVERY = 50
TEACHER_FIRST_CHECK = 300
TEACHER_TARGET = 0.85
K = 4
EVAL_SPLITS = ("test", "hard")   # the easy split's held-out problems, and the hard split
MAX_NEW_TOKENS = 256


def init_model(config: Qwen3Config, seed: int, std: float = 0.02) -> Qwen3ForCausalLM:
    """GPT-style init: normal(0, std) matrices and embeddings, norm weights one."""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
    return model


def build(out: str | Path = REPO_ROOT / "embedded", *, seed: int = 0, student_steps: int = STUDENT_STEPS,
          teacher_steps: int = TEACHER_STEPS, rollout_prompts: int = ROLLOUT_PROMPTS,
          work: str | Path | None = None, echo: Callable[[str], None] = print) -> dict:
    """Rebuild `out` (default embedded/) from scratch; returns the BUILD.json summary."""
    from engine.generate.sampler import SamplingParams
    from engine.recipes.embedded_inputs import build_embedded
    from engine.tasks.registry import load_task

    out = Path(out)
    work = Path(work) if work else out.parent / "runs" / "build-embedded"
    student_dir, teacher_dir, rollouts = out / "base", out / "teacher", out / "rollouts.jsonl"
    for path, kind in ((work, "embedded-work"), (student_dir, "embedded-base"), (teacher_dir, "embedded-base"),
                       (rollouts, "rollouts"), (out / "sft_train.jsonl", "sft-data"), (out / "BUILD.json", "build")):
        claim(path, kind)  # every path this build replaces or deletes, refused up front unless it is ours
    if work.exists():
        shutil.rmtree(work)
    t0 = time.perf_counter()
    # train[:rollout_prompts] are the rollout prompts, the next CALIBRATION_PROMPTS choose the teacher;
    # neither model pretrains on either (nor on any problem with the same arithmetic).
    prompts = load_task("synthetic", "train", limit=rollout_prompts + CALIBRATION_PROMPTS)
    calibration = prompts[rollout_prompts:]
    info = build_embedded(work, held_out=prompts)  # writes work/base/ (the student's) and work/teacher/
    sampling = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0)
    every = min(TEACHER_EVERY, teacher_steps)
    teacher, run = _pretrain(work, "teacher", teacher_steps, seed, echo,
                             checkpoint_steps=list(range(every, teacher_steps, every)))
    step, curve = _choose_teacher(run, teacher_steps, calibration, sampling, seed, work / "calibration", echo)
    _install(run / ("final" if step == teacher_steps else f"step-{step}"), work / "teacher", teacher_dir)
    for ckpt in [*run.glob("step-*"), run / "final"]:  # ~1 GB with optimizer states; the chosen one is installed
        shutil.rmtree(ckpt)
    epochs = lambda steps: round(steps * PRETRAIN["batch_size"] / info["data"]["rows"], 2)  # noqa: E731
    teacher.update(pretrain_steps=step, pretrain_epochs=epochs(step),
                   selection={"rule": f"the checkpoint (every {every} steps from step {TEACHER_FIRST_CHECK}) whose "
                              f"T = 1 accuracy on {len(calibration)} unseen train prompts (K = {K}) comes closest to "
                              f"{TEACHER_TARGET}, searched until one reaches it", "target": TEACHER_TARGET,
                              "prompts": f"synthetic/train items {rollout_prompts}-{len(prompts) - 1}", "curve": curve})
    student, run = _pretrain(work, "base", student_steps, seed, echo)
    _install(run / "final", work / "base", student_dir)
    student.update(pretrain_steps=student_steps, pretrain_epochs=epochs(student_steps))
    models = {"teacher": teacher, "student": student}
    shutil.copyfile(work / "sft_train.jsonl", out / "sft_train.jsonl")  # the pretraining data, for audit
    for name, dst in (("teacher", teacher_dir), ("student", student_dir)):
        models[name]["greedy"] = {split: _greedy(dst, split, work / "eval" / name, echo) for split in EVAL_SPLITS}
    if rollouts.exists():
        rollouts.unlink()
    t = time.perf_counter()
    _rollout(teacher_dir, rollout_prompts, rollouts, sampling, seed, echo)
    summary_rollouts = {"model": "teacher", "prompts": f"the first {rollout_prompts} items of synthetic/train",
                        "k": K, "temperature": 1.0, "max_new_tokens": MAX_NEW_TOKENS, **rollout_stats(rollouts),
                        "seconds": round(time.perf_counter() - t, 1)}
    # The student's own samples on the same prompts: the like-for-like gap to the teacher's rollouts.
    student_samples = work / "student-samples.jsonl"
    _rollout(student_dir, rollout_prompts, student_samples, sampling, seed, echo)
    models["student"]["samples_on_rollout_prompts"] = rollout_stats(student_samples)
    summary = {"regime": regime(models, summary_rollouts), "tokenizer": info["tokenizer"],
               "pretraining_data": info["data"], "models": models, "rollouts": summary_rollouts,
               "seed": seed, "total_seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "BUILD.json", summary)
    echo(json.dumps(summary, indent=2))
    return summary


def _pretrain(work: Path, inputs: str, steps: int, seed: int, echo: Callable[[str], None],
              checkpoint_steps: Sequence[int] = ()) -> tuple[dict, Path]:
    """Initialise and pretrain the model whose config.json + tokenizer `build_embedded` wrote to
    work/`inputs`/ on the SFT rows. Returns (its BUILD.json entry so far, the training run directory)."""
    from engine.train.trainer import train
    src = work / inputs
    init_dir = work / f"init-{src.name}"
    config = Qwen3Config.from_json(src / "config.json")
    model = init_model(config, seed)
    params = sum(p.numel() for p in model.parameters())
    save_model(model, init_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(src / f, init_dir / f)
    run = work / f"pretrain-{src.name}"
    cfg = load_config(None, loss="sft", model=str(init_dir), rollouts=str(work / "sft_train.jsonl"), out=str(run),
                      full_finetune=True, steps=steps, seed=seed, checkpoint_steps=list(checkpoint_steps),
                      **PRETRAIN)
    echo(f"pretraining {src.name} ({params / 1e6:.2f}M parameters, {config.num_hidden_layers} layers) "
         f"for {steps} steps")
    t = time.perf_counter()
    train(cfg)
    shape = {k: getattr(config, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                             "num_attention_heads", "num_key_value_heads", "head_dim",
                                             "vocab_size")}
    return ({"path": inputs, "shape": shape, "parameters": params, "schedule_steps": steps,
             "pretrain_seconds": round(time.perf_counter() - t, 1),
             "pretrain": {k: v for k, v in cfg.__dict__.items() if k in PRETRAIN}}, run)


def _install(checkpoint: Path, inputs: Path, dst: Path) -> None:
    """Copy a trained checkpoint's model files (and the build's generation_config.json) to `dst`."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(checkpoint / f, dst / f)
    shutil.copyfile(inputs / "generation_config.json", dst / "generation_config.json")


def _choose_teacher(run: Path, steps: int, prompts, sampling, seed: int, work: Path,
                    echo: Callable[[str], None]) -> tuple[int, list[dict]]:
    """The step whose checkpoint's T = 1 accuracy on `prompts` is closest to TEACHER_TARGET, searching
    upward from TEACHER_FIRST_CHECK until one reaches it. Returns (step, [{step, accuracy}] evaluated)."""
    from engine.generate.rollout import load_for_generation, rollout_items
    candidates = sorted(int(p.name[5:]) for p in run.glob("step-*") if int(p.name[5:]) >= TEACHER_FIRST_CHECK)
    curve: list[dict] = []
    work.mkdir(parents=True, exist_ok=True)
    for step in candidates + [steps]:
        ckpt = run / ("final" if step == steps else f"step-{step}")
        model, tok = load_for_generation(ckpt)
        out = work / f"step-{step}.jsonl"
        rollout_items(model, tok, prompts, out, sampling, k=K, seed=seed, batch_size=64, style="plain")
        acc = rollout_stats(out)["mean_reward"]
        curve.append({"step": step, "accuracy": acc})
        echo(f"teacher candidate step {step}: T = 1 accuracy {acc:.3f} on {len(prompts)} calibration prompts")
        if acc >= TEACHER_TARGET:
            break
    best = min(curve[-2:], key=lambda c: abs(c["accuracy"] - TEACHER_TARGET))
    return best["step"], curve


def _greedy(model_dir: Path, split: str, out: Path, echo: Callable[[str], None]) -> dict:
    from engine.generate.rollout import run_eval
    t = time.perf_counter()
    s = run_eval(str(model_dir), task="synthetic", split=split, out=str(out), max_new_tokens=MAX_NEW_TOKENS,
                 batch_size=64, style="plain", echo=echo)
    return {"n": s["n"], "accuracy": s["accuracy"], "ci95_wilson": s["ci95_wilson"], "truncated": s["truncated"],
            "seconds": round(time.perf_counter() - t, 1)}


def _rollout(model_dir: Path, prompts: int, out: Path, sampling, seed: int, echo: Callable[[str], None]) -> None:
    from engine.generate.rollout import run_rollout
    run_rollout(str(model_dir), task="synthetic", split="train", out=str(out), k=K, limit=prompts,
                params=sampling, batch_size=64, seed=seed, style="plain", echo=echo)


def rollout_stats(path: Path) -> dict:
    """Rows, mean reward (with its Wilson 95% interval), groups with both outcomes (what GRPO's advantage
    and DPO's pairs need) and the DPO pair count (one per such group, the trainer's default; `all`: every
    chosen x rejected pair)."""
    from engine.generate.rollout import wilson_interval
    groups: dict[str, list[float]] = {}
    for _, row in jsonl_objects(path, "rollouts file"):
        groups.setdefault(row["group"], []).append(row["reward"])
    rows = sum(len(r) for r in groups.values())
    correct = sum(map(sum, groups.values()))
    mixed = [r for r in groups.values() if 0 < sum(r) < len(r)]
    return {"groups": len(groups), "rows": rows, "mean_reward": correct / rows,
            "ci95_wilson": list(wilson_interval(int(correct), rows)), "groups_with_both_outcomes": len(mixed),
            "groups_all_correct": sum(1 for r in groups.values() if sum(r) == len(r)),
            "groups_all_wrong": sum(1 for r in groups.values() if sum(r) == 0),
            "dpo_pairs": len(mixed), "dpo_pairs_all": sum(int(sum(r)) * int(len(r) - sum(r)) for r in mixed)}


def regime(models: dict, rollouts: dict) -> dict:
    """The numbers the study's regime is judged by, and whether each lands in the band the build aims at
    (teacher rollouts 80-90% correct; student >= 10 points below them on the easy split; student 5-20% on
    the hard split; student >= 6 layers)."""
    teacher_rollouts = rollouts["mean_reward"]
    student_easy = models["student"]["greedy"]["test"]["accuracy"]
    student_hard = models["student"]["greedy"]["hard"]["accuracy"]
    return {"teacher_rollout_accuracy": teacher_rollouts, "student_easy_greedy": student_easy,
            "student_hard_greedy": student_hard,
            "teacher_easy_greedy": models["teacher"]["greedy"]["test"]["accuracy"],
            "in_band": {"teacher_rollouts_80_90": 0.80 <= teacher_rollouts <= 0.90,
                        "student_10_points_below": student_easy <= teacher_rollouts - 0.10,
                        "student_hard_5_20": 0.05 <= student_hard <= 0.20,
                        "student_at_least_6_layers": models["student"]["shape"]["num_hidden_layers"] >= 6}}
