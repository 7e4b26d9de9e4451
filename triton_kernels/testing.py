"""Helpers shared by the kernel tests (tests/test_kernels_*.py): environment, small tiles, errors.

The submodules share their public function's name (`triton_kernels.lora_linear` is the function), so
modules are reached through `importlib.import_module`.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

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


def use_interpreter(monkeypatch: Any, backend: str = "triton") -> None:
    """Run the Triton path on CPU (interpreter), with NaN-poisoned outputs."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ENGINE_KERNELS", backend)
    monkeypatch.setenv("ENGINE_KERNELS_POISON", "1")


def use_small_tiles(monkeypatch: Any) -> None:
    for mod_name, configs in SMALL_TILES.items():
        mod = importlib.import_module(mod_name)
        for config_name, values in configs.items():
            for key, value in values.items():
                monkeypatch.setitem(getattr(mod, config_name), key, value)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; inf when actual holds a NaN (unwritten output)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf copy (optionally cast) that requires grad."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)
