"""Backend choice (ENGINE_KERNELS, CUDA or not, Triton present or not) and output poisoning."""
from __future__ import annotations

import pytest
import torch

from engine.errors import EngineError
from triton_kernels import _triton, dispatch, lora_linear
from triton_kernels.testing import module

CPU = torch.zeros(1)


def test_auto_uses_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("ENGINE_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is opt-in through ENGINE_KERNELS only
    assert dispatch.use_triton(CPU) is False


def test_forced_backends(monkeypatch):
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    assert dispatch.use_triton(CPU) is False
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_triton(CPU) is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(EngineError, match="ENGINE_KERNELS"):
        dispatch.use_triton(CPU)  # CPU tensors cannot reach a GPU kernel
    monkeypatch.setenv("ENGINE_KERNELS", "cuda")
    with pytest.raises(EngineError, match="auto, triton, torch"):
        dispatch.use_triton(CPU)


def test_missing_triton_leaves_torch_path_working(monkeypatch):
    monkeypatch.setattr(_triton, "triton", None)
    monkeypatch.delenv("ENGINE_KERNELS", raising=False)
    assert dispatch.use_triton(CPU) is False
    x, w, a, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    torch.testing.assert_close(lora_linear(x, w, a, b, 2.0), x @ w.T + 2.0 * (x @ a.T) @ b.T)
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    with pytest.raises(EngineError, match="cannot be imported"):
        dispatch.use_triton(CPU)


def test_env_is_read_at_call_time(monkeypatch):
    """The same call switches path when the variable changes: the Triton side is seen by its launch."""
    launches = []
    lora = module("lora_linear")
    monkeypatch.setattr(lora, "launch_lowrank_gemm", lambda *args: launches.append(args) or
                        args[4][0].zero_())
    x, w, a, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    lora_linear(x, w, a, b, 1.0)
    assert launches == []
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    lora_linear(x, w, a, b, 1.0)
    assert len(launches) == 1


def test_poisoned_outputs_start_as_nan(monkeypatch):
    monkeypatch.setenv("ENGINE_KERNELS_POISON", "1")
    assert dispatch.new_output((2, 3), torch.float32, CPU.device).isnan().all()
    monkeypatch.setenv("ENGINE_KERNELS_POISON", "0")
    assert dispatch.new_output((2, 3), torch.bfloat16, CPU.device).shape == (2, 3)
