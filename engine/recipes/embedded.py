"""Build the embedded default from scratch: the synthetic task's tokenizer, a tiny Qwen3 trained by the
engine itself (full-parameter mode of the same training loop), and its K = 4 rollouts.

    python cli.py build-embedded            # writes embedded/base/ and embedded/rollouts.jsonl

Every step is seeded, so a rebuild on the same software gives the same files.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from engine.model.weights import save_model
from engine.model.qwen3_config import Qwen3Config
from engine.fsio import jsonl_objects, write_json
from engine.outputs import claim
from engine.model.qwen3 import Qwen3ForCausalLM
from engine.train.train_config import REPO_ROOT, load_config

# Found by sweeping model size, data and steps on a 2-core CPU (see README, "The embedded default").
PRETRAIN = dict(steps=300, lr=3e-3, batch_size=32, micro_batch_size=32, warmup_ratio=0.05, min_lr_ratio=0.1,
                weight_decay=0.0, adam_betas=[0.9, 0.95], max_len=512, seed=0)
ROLLOUT_PROMPTS = 256
K = 4


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


def build(out: str | Path = REPO_ROOT / "embedded", *, seed: int = 0, pretrain_steps: int | None = None,
          rollout_prompts: int = ROLLOUT_PROMPTS, work: str | Path | None = None,
          echo: Callable[[str], None] = print) -> dict:
    from engine.generate.rollout import run_eval, run_rollout
    from engine.generate.sampler import SamplingParams
    from engine.recipes.embedded_inputs import build_embedded
    from engine.train.trainer import train

    out = Path(out)
    work = Path(work) if work else out.parent / "runs" / "build-embedded"
    base, rollouts = out / "base", out / "rollouts.jsonl"
    for path, kind in ((work, "embedded-work"), (base, "embedded-base"), (rollouts, "rollouts"),
                       (out / "sft_train.jsonl", "sft-data"), (out / "BUILD.json", "build")):
        claim(path, kind)  # every path this build replaces or deletes, refused up front unless it is ours
    if work.exists():
        shutil.rmtree(work)
    t0 = time.perf_counter()
    info = build_embedded(work, seed=seed)
    init_dir = work / "init"
    save_model(init_model(Qwen3Config.from_json(work / "base" / "config.json"), seed), init_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(work / "base" / f, init_dir / f)
    cfg = load_config(None, loss="sft", model=str(init_dir), rollouts=str(work / "sft_train.jsonl"),
                      out=str(work / "pretrain"), full_finetune=True,
                      **{**PRETRAIN, **({"steps": pretrain_steps} if pretrain_steps else {})})
    echo(f"pretraining a tiny Qwen3 ({sum(p.numel() for p in cfg_model(init_dir).parameters()) / 1e6:.2f}M "
         f"parameters) for {cfg.steps} steps")
    final = train(cfg)
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(final / f, base / f)
    shutil.copyfile(work / "base" / "generation_config.json", base / "generation_config.json")
    shutil.copyfile(work / "sft_train.jsonl", out / "sft_train.jsonl")  # the pretraining data, for audit
    pretrain_s = time.perf_counter() - t0
    acc = run_eval(str(base), task="synthetic", split="test", out=str(work / "eval"), max_new_tokens=160,
                   batch_size=64, style="plain", echo=echo)
    if rollouts.exists():
        rollouts.unlink()
    run_rollout(str(base), task="synthetic", split="train", out=str(rollouts), k=K, limit=rollout_prompts,
                params=SamplingParams(max_new_tokens=160, temperature=1.0), batch_size=64, seed=seed,
                style="plain", echo=echo)
    groups: dict[str, list[float]] = {}
    for _, row in jsonl_objects(rollouts, "rollouts file"):
        groups.setdefault(row["group"], []).append(row["reward"])
    mixed = sum(1 for r in groups.values() if 0 < sum(r) < len(r))
    summary = {"parameters": sum(p.numel() for p in cfg_model(base).parameters()), "tokenizer": info,
               "pretrain_steps": cfg.steps, "pretrain_seconds": round(pretrain_s, 1),
               "greedy_test_accuracy": acc["accuracy"], "test_items": acc["n"],
               "rollout_groups": len(groups), "rollouts": sum(len(r) for r in groups.values()),
               "rollout_mean_reward": sum(map(sum, groups.values())) / sum(len(r) for r in groups.values()),
               "groups_with_both_outcomes": mixed, "total_seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "BUILD.json", summary)
    echo(json.dumps(summary, indent=2))
    return summary


def cfg_model(model_dir: Path) -> Qwen3ForCausalLM:
    with torch.device("meta"):
        return Qwen3ForCausalLM(Qwen3Config.from_json(Path(model_dir) / "config.json"))
