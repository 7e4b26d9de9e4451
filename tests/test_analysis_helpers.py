"""Builders for the analysis tests (no tests here): PEFT-layout adapter directories with chosen factors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

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
