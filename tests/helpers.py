"""Shared test builders: random-weight HF Qwen3 checkpoints written to disk, tiny configs, PEFT-layout
adapter directories with chosen factors (analysis tests), and the kernel tests' environment, small tiles
and error measures (formerly triton_kernels/testing.py: test-only code, kept out of the package)."""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"                      # the repository's own data folder (data/SOURCES.md)
QWEN3_TOKENIZER = DATA / "qwen3-tokenizer"
QWEN3_CONFIGS = DATA / "qwen3-configs"


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


# ---- analysis: PEFT-layout adapters with chosen factors -----------------------------------------
PREFIX = "base_model.model."
# Odd, non-square shapes: hidden 20, q out 24 (heads x head_dim != hidden), k/v out 12.
SHAPES = {"q_proj": (24, 20), "k_proj": (12, 20), "v_proj": (12, 20), "o_proj": (20, 24)}


def random_factors(layers: int, r: int, seed: int, shapes: dict = SHAPES) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        for kind, (o, n) in shapes.items():
            out[f"model.layers.{i}.self_attn.{kind}"] = {"A": torch.randn(r, n, generator=g) / math.sqrt(n),
                                                         "B": torch.randn(o, r, generator=g)}
    return out


def write_adapter(path: Path, factors: dict, *, r: int, alpha: float, base: str = "tiny-base",
                  targets=("q_proj", "k_proj", "v_proj", "o_proj"), use_rslora: bool = False,
                  dtype=torch.float32) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, f in factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = f["A"].to(dtype).contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = f["B"].to(dtype).contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": list(targets), "bias": "none", "use_rslora": use_rslora,
        "base_model_name_or_path": base}))
    return path


def correlated_runs(layers: int, r: int, n_runs: int, seed: int = 0) -> list[dict]:
    """Runs = a shared update + run-specific noise of growing size: small and large angles both occur."""
    base = random_factors(layers, r, seed)
    runs = []
    for k in range(n_runs):
        noise = random_factors(layers, r, seed + 100 + k)
        runs.append({m: {"A": f["A"] + 0.15 * k * noise[m]["A"], "B": f["B"] + 0.15 * k * noise[m]["B"]}
                     for m, f in base.items()})
    return runs


def delta(f: dict, scale: float) -> torch.Tensor:
    return scale * f["B"].double() @ f["A"].double()


# ---- kernel tests: Triton path, small tiles, errors ------------------------------------------------
# The kernel submodules share their public function's name (`triton_kernels.lora_linear` is the function),
# so modules are reached through `importlib.import_module`.
# Tiles small enough that odd test shapes span several programs in every dimension (ragged edges,
# several K steps, several vocab splits), and the interpreter stays quick.
SMALL_TILES: dict[str, dict[str, dict[str, int]]] = {
    "triton_kernels.lora_linear": {
        "GEMM_CONFIG": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2},
        "GEMM_CONFIG_FP32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2},
    },
    "triton_kernels.qk_norm_rope": {"CONFIG": {"BLOCK_ROWS": 4}},
    "triton_kernels.linear_logprob": {
        "FWD_CONFIG": {"BLOCK_N": 32, "BLOCK_V": 32, "BLOCK_H": 16, "SPLITS_MIN": 2},
        "BWD_CONFIG": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2},
    },
    "triton_kernels.adamw": {"CONFIG": {"BLOCK": 128}},
}


def module(name: str) -> Any:
    """A kernel module by short name ('lora_linear', ...), not the same-named function."""
    return importlib.import_module(f"triton_kernels.{name}")


def kernel_device() -> torch.device:
    """Where Triton-path tests run: CUDA when there is one (the compiled kernels), else the CPU interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_triton_path(monkeypatch: Any) -> None:
    """Force the Triton path (through the interpreter on CPU), with NaN-poisoned outputs."""
    if kernel_device().type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    monkeypatch.setenv("ENGINE_KERNELS_POISON", "1")


def use_small_tiles(monkeypatch: Any) -> None:
    for mod_name, configs in SMALL_TILES.items():
        mod = importlib.import_module(mod_name)
        for config_name, values in configs.items():
            for key, value in values.items():
                monkeypatch.setitem(getattr(mod, config_name), key, value)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; inf when actual holds a NaN (unwritten output)."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf copy (optionally cast) that requires grad."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def randn_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded standard normals with t's shape, dtype and device (drawn on CPU, so any device agrees)."""
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)).to(t.device, t.dtype)


# ---- fuzzing (hypothesis): shared settings, awkward JSON values, counts of inputs tried ----------------
MAX_EXAMPLES = 300
TRIED: dict[str, int] = {}
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def tried(name: str) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    """Import into a fuzzing module: prints the inputs tried at its end (run with -s)."""
    yield
    print(f"\nfuzzed inputs tried: {TRIED} (total {sum(TRIED.values())})")


# Any JSON value, including the awkward ones: huge integers, NaN/inf, deep-ish nesting.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from([10 ** 400, -(10 ** 400), "", " ", "\x00"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
