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
