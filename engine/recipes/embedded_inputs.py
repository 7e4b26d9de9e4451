"""The embedded models' inputs, written from the synthetic task: their shapes and `config.json`s, one
tokenizer trained on the task's text, and the SFT rows (gold worked solutions) both are pretrained on.
`engine.recipes.embedded` runs the whole build on top of this."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

from engine.fsio import atomic_file, write_json
from engine.tasks.registry import TaskItem, load_task
from engine.tasks.synthetic import DEFAULT_SEED, DEFAULT_SIZES, Difficulty, generate_problems

# Qwen3 shapes (GQA, qk-norm, tied embeddings). The student (`base/`, the model every loss trains) has
# enough layers for per-layer claims (early vs late); the teacher is wider, so trained longer it writes
# mostly right rollouts.
STUDENT_MODEL = {"hidden_size": 192, "intermediate_size": 576, "num_hidden_layers": 6, "num_attention_heads": 6,
                 "num_key_value_heads": 2, "head_dim": 32}
TEACHER_MODEL = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 8,
                 "num_key_value_heads": 2, "head_dim": 32}
MODELS = {"base": STUDENT_MODEL, "teacher": TEACHER_MODEL}
ROLLOUT_PROMPTS = 512       # synthetic/train's first items: the teacher's rollout prompts
CALIBRATION_PROMPTS = 256   # the next ones: what the teacher checkpoint is chosen on
# Neither model pretrains on these (the study's rollouts are off-policy for its student).
HELD_OUT_PROMPTS = ROLLOUT_PROMPTS + CALIBRATION_PROMPTS
TINY_VOCAB = 768
TINY_CONTEXT = 512


def tiny_model_config(vocab_size: int, eos_token_id: int, bos_token_id: int, **overrides: int) -> dict:
    """An HF Qwen3 `config.json` dict; the vocabulary rounded up to a multiple of 64 (as Qwen pads its
    151669 tokens to 151936) so embedding rows past the tokenizer are simply never used."""
    dims = {**STUDENT_MODEL, **overrides}
    return {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "head_dim": dims["head_dim"],
        "hidden_act": "silu", "hidden_size": dims["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": dims["intermediate_size"], "max_position_embeddings": TINY_CONTEXT,
        "max_window_layers": dims["num_hidden_layers"], "model_type": "qwen3",
        "num_attention_heads": dims["num_attention_heads"], "num_hidden_layers": dims["num_hidden_layers"],
        "num_key_value_heads": dims["num_key_value_heads"], "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 10000.0, "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "float32",
        "use_cache": True, "use_sliding_window": False, "vocab_size": -(-vocab_size // 64) * 64,
    }


def sft_rows(items: list[TaskItem]) -> list[dict]:
    """Rollout rows (engine.train.rollouts's format) whose completions are the gold worked solutions. The prompt is
    the bare question as one user turn: the tiny model's context is short, and the task's format is fixed."""
    return [{"prompt": [{"role": "user", "content": it.question}], "completion": it.solution, "reward": 1.0,
             "group": it.id} for it in items]


def tokenizer_corpus(items: list[TaskItem]) -> list[str]:
    """What the tiny tokenizer learns from: each prompt and solution, and the chat role names."""
    texts = []
    for row in sft_rows(items):
        texts += [row["prompt"][0]["content"], row["completion"], "user", "assistant"]
    return texts


def arithmetic(item: TaskItem) -> tuple[str, ...]:
    """The calculator annotations of a worked solution (`<<12+5=17>>` ...): its arithmetic, whatever the
    names and wording."""
    return tuple(re.findall(r"<<([^>]*)>>", item.solution or ""))


def pretraining_items(items: Sequence[TaskItem], held_out: Sequence[TaskItem]) -> tuple[list[TaskItem], int]:
    """`items` without the held-out prompts and without any problem doing the same arithmetic as one of
    them. Returns (kept items, how many were removed)."""
    questions = {it.question for it in held_out}
    chains = {arithmetic(it) for it in held_out}
    kept = [it for it in items if it.question not in questions and arithmetic(it) not in chains]
    return kept, len(items) - len(kept)


def build_embedded(out_dir: str | os.PathLike, seed: int = DEFAULT_SEED, n_train: int = DEFAULT_SIZES["train"],
                   vocab_size: int = TINY_VOCAB, difficulty: Difficulty | None = None,
                   held_out: Sequence[TaskItem] | None = None, models: dict[str, dict] | None = None) -> dict:
    """Write the embedded models' inputs: for each of `models` (name -> shape; default `MODELS`) a
    directory with tokenizer.json, tokenizer_config.json, config.json and generation_config.json (the
    trainer adds model.safetensors), and `sft_train.jsonl`: the first n_train train problems less the
    `held_out` ones (default: the first HELD_OUT_PROMPTS of synthetic/train) and their arithmetic.
    Returns a summary (tokenizer sizes and token lengths, data counts). Same arguments -> same bytes."""
    from engine.recipes.tokenizer_training import token_stats, train_tokenizer  # tokenizers' trainer is only needed here
    out = Path(out_dir)
    if held_out is None:
        held_out = load_task("synthetic", "train", limit=HELD_OUT_PROMPTS)
    items, removed = pretraining_items(generate_problems(n_train, seed, "train", difficulty), held_out)
    models = MODELS if models is None else models
    first = out / next(iter(models))
    tok = train_tokenizer(tokenizer_corpus(items), vocab_size, first, model_max_length=TINY_CONTEXT)
    eos, bos = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    for name, shape in models.items():
        d = out / name
        if d != first:
            d.mkdir(parents=True, exist_ok=True)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                (d / f).write_bytes((first / f).read_bytes())
        write_json(d / "config.json", tiny_model_config(tok.get_vocab_size(), eos, bos, **shape))
        write_json(d / "generation_config.json",
                   {"bos_token_id": bos, "eos_token_id": [eos, bos], "pad_token_id": bos, "do_sample": False})
    rows = sft_rows(items)
    with atomic_file(out / "sft_train.jsonl") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"tokenizer": {"vocab_size": tok.get_vocab_size(),
                          "prompt_tokens": token_stats(tok, [r["prompt"][0]["content"] for r in rows]),
                          "completion_tokens": token_stats(tok, [r["completion"] for r in rows])},
            "data": {"rows": len(rows), "drawn": n_train, "held_out_prompts": len(held_out),
                     "removed_as_held_out_or_same_arithmetic": removed}}
