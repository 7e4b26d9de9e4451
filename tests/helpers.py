"""Shared test builders: random-weight HF Qwen3 checkpoints written to disk, tiny configs."""
from __future__ import annotations

import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
QWEN3_TOKENIZER = SHARED / "data" / "qwen3-tokenizer"
QWEN3_CONFIGS = SHARED / "data" / "qwen3-configs"


def tiny_config(**overrides) -> dict:
    """An HF config.json dict for a small Qwen3 with head_dim != hidden/heads and GQA."""
    cfg = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 211,
        "hidden_size": 48, "intermediate_size": 72, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": False, "attention_bias": False,
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def hf_model(cfg: dict, seed: int = 0):
    """A transformers Qwen3ForCausalLM with random weights, norm weights not all ones."""
    from transformers import Qwen3Config as HFConfig, Qwen3ForCausalLM as HFModel
    torch.manual_seed(seed)
    hf_cfg = HFConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "eager"
    model = HFModel(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model


def save_hf(model, path: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(path), **kwargs)
    return path


def write_config(path: Path, cfg: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))


def tiny_model_dir(path: Path, seed: int = 0, weights_dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A random-weight tiny Qwen3 with a small byte-level BPE tokenizer (Qwen chat tokens included),
    trained on addition texts like those of `write_rollouts`: small vocab keeps training tests fast.
    weights_dtype=torch.bfloat16 writes the checkpoint as Qwen3's ship (bf16)."""
    from engine.recipes.tokenizer_training import train_tokenizer
    texts = [f"What is {a} + {b}? We add {a} and {b}. Then #### {a + b}" for a in range(1, 60) for b in (3, 17, 42)]
    tok = train_tokenizer(texts, 300, path)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    cfg = tiny_config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, **overrides)
    save_hf(hf_model(cfg, seed=seed).to(weights_dtype), path)
    return path


def write_rollouts(path: Path, n_groups: int = 12, k: int = 4, seed: int = 0, behavior: bool = False,
                   tokenizer=None) -> Path:
    """Synthetic addition rollouts: K completions per prompt, reward 1 when the sum is right."""
    import random
    rng = random.Random(seed)
    lines = []
    for g in range(n_groups):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        for j in range(k):
            guess = a + b if (j + g) % 3 != 1 else a + b + rng.randint(1, 9)
            completion = f"We add {a} and {b}." + " Then" * rng.randint(0, 6) + f" #### {guess}"
            row = {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "completion": completion,
                   "reward": float(guess == a + b), "group": f"g{g}"}
            if behavior:
                n = len(tokenizer.encode(completion)) + 1
                row["behavior_logps"] = [-rng.uniform(0.05, 3.0) for _ in range(n)]
            lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Reference RoPE as HF writes it (x * cos + rotate_half(x) * sin): x [B, T, H, D], cos/sin [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)
