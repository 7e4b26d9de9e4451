"""Backend choice (ENGINE_KERNELS, CUDA or not, Triton present or not) and output poisoning."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.errors import EngineError
from triton_kernels import _triton, dispatch, lora_linear
from helpers import module

CPU = torch.zeros(1)
ROOT = Path(__file__).resolve().parents[1]


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
    monkeypatch.setattr(_triton, "_loaded", {"triton": None, "tl": None, "error": ImportError("no triton")})
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


def test_package_imports_and_runs_without_triton():
    """A fresh interpreter where `import triton` fails: the package imports and the torch paths run."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, triton_kernels as tk\n"
        "from triton_kernels import _triton\n"
        "assert not _triton.available()\n"
        "x, w, a, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)\n"
        "torch.testing.assert_close(tk.lora_linear(x, w, a, b, 2.0), x @ w.T + 2.0 * (x @ a.T) @ b.T)\n"
        "lp = tk.linear_logprob(x, w, torch.tensor([0, 4, 2]))\n"
        "torch.testing.assert_close(lp, torch.log_softmax(x @ w.T, -1)[[0, 1, 2], [0, 4, 2]])\n"
        "print('ok')\n"
    )
    _run_fresh_python(code)


def test_cpu_training_never_imports_triton():
    """Triton is imported on first use only: a CPU training step leaves it out of the process."""
    code = (
        "import sys, torch, engine\n"
        "from engine.model.logprobs import token_logprobs\n"
        "from engine.model.lora import LoRAConfig, apply_lora\n"
        "from engine.model.qwen3_config import Qwen3Config\n"
        "cfg = Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,\n"
        "                  num_attention_heads=2, num_key_value_heads=1, head_dim=8)\n"
        "m = apply_lora(engine.Qwen3ForCausalLM(cfg), LoRAConfig(r=2, alpha=4.0)).train()\n"
        "with torch.device('meta'):\n"
        "    engine.Qwen3ForCausalLM(cfg)  # how load_model builds: must not import torch._dynamo\n"
        "token_logprobs(m, torch.randint(0, 50, (2, 7))).sum().backward()\n"
        "assert 'triton' not in sys.modules and 'torch._dynamo' not in sys.modules, 'triton was imported'\n"
        "print('ok')\n"
    )
    _run_fresh_python(code)


def _run_fresh_python(code: str) -> None:
    """Run `code` in a new interpreter (no kernel env overrides); it must print 'ok' and exit 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("ENGINE_KERNELS", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
