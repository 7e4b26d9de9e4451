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
