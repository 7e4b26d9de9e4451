"""The embedded tiny model's inputs, written from the synthetic task: its shape and `config.json`, a
tokenizer trained on the task's text, and the SFT rows (the gold worked solutions) it is pretrained on.
`engine.recipes.embedded` runs the whole build on top of this."""
from __future__ import annotations

import json
import os
from pathlib import Path

from engine.fsio import atomic_file, write_json
from engine.tasks.registry import TaskItem
from engine.tasks.synthetic import DEFAULT_SEED, DEFAULT_SIZES, Difficulty, generate_problems

# A ~1.9M-parameter Qwen3 (GQA, qk-norm, tied embeddings). Trained from scratch on the 4000 train rows
# (weights N(0, 0.02); AdamW lr 3e-3, betas (0.9, 0.95), no weight decay, 5% warmup then cosine to 10%,
# grad clip 1.0, batch 32, 300 steps = 2.4 epochs; 10-15 CPU minutes on 2 cores in fp32) it reaches about
# 36% greedy accuracy on the test split (52% with max_ops=3).
TINY_MODEL = {"hidden_size": 192, "intermediate_size": 576, "num_hidden_layers": 4, "num_attention_heads": 6,
              "num_key_value_heads": 2, "head_dim": 32}
TINY_VOCAB = 768
TINY_CONTEXT = 512


def tiny_model_config(vocab_size: int, eos_token_id: int, bos_token_id: int, **overrides: int) -> dict:
    """An HF Qwen3 `config.json` dict; the vocabulary rounded up to a multiple of 64 (as Qwen pads its
    151669 tokens to 151936) so embedding rows past the tokenizer are simply never used."""
    dims = {**TINY_MODEL, **overrides}
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


def build_embedded(out_dir: str | os.PathLike, seed: int = DEFAULT_SEED, n_train: int = DEFAULT_SIZES["train"],
                   vocab_size: int = TINY_VOCAB, difficulty: Difficulty | None = None) -> dict:
    """Write the embedded default's inputs: `base/` (tokenizer.json, tokenizer_config.json, config.json,
    generation_config.json; the trainer adds model.safetensors) and `sft_train.jsonl` (n_train rows).
    Returns a summary (sizes and token lengths). Same arguments -> byte-identical files."""
    from engine.recipes.tokenizer_training import token_stats, train_tokenizer  # tokenizers' trainer is only needed here
    out = Path(out_dir)
    items = generate_problems(n_train, seed, "train", difficulty)
    tok = train_tokenizer(tokenizer_corpus(items), vocab_size, out / "base", model_max_length=TINY_CONTEXT)
    eos, bos = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    write_json(out / "base" / "config.json", tiny_model_config(tok.get_vocab_size(), eos, bos))
    write_json(out / "base" / "generation_config.json",
               {"bos_token_id": bos, "eos_token_id": [eos, bos], "pad_token_id": bos, "do_sample": False})
    rows = sft_rows(items)
    with atomic_file(out / "sft_train.jsonl") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"n_train": len(rows), "vocab_size": tok.get_vocab_size(),
            "prompt_tokens": token_stats(tok, [r["prompt"][0]["content"] for r in rows]),
            "completion_tokens": token_stats(tok, [r["completion"] for r in rows])}
