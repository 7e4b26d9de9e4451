"""adamw_step_: the fused Triton step (interpreter) and the torch path against torch.optim.AdamW."""
from __future__ import annotations

import pytest
import torch

from triton_kernels import adamw_step_
from helpers import kernel_device, use_small_tiles, use_triton_path

HP = {"lr": 3e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def _run_against_torch_optim(n: int, steps: int, seed: int, device: torch.device | str = "cpu") -> float:
    """Max |param - torch.optim.AdamW's param| after `steps` steps on fresh random grads."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(n, generator=gen).to(device)
    ref = torch.nn.Parameter(start.clone())
    opt = torch.optim.AdamW([ref], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], foreach=False)
    param, exp_avg, exp_avg_sq = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    for step in range(1, steps + 1):
        grad = torch.randn(n, generator=gen).to(device) * (1 + step)
        ref.grad = grad.clone()
        opt.step()
        adamw_step_(param, grad, exp_avg, exp_avg_sq, step=step, **HP)
    state = opt.state[ref]
    torch.testing.assert_close(exp_avg, state["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], rtol=1e-6, atol=1e-7)
    assert not torch.equal(param, start)
    return (param - ref.detach()).abs().max().item()


@pytest.mark.parametrize("n", [1, 1000])
def test_torch_path_matches_torch_optim_exactly(monkeypatch, n):
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    assert _run_against_torch_optim(n, steps=4, seed=n) == 0.0


@pytest.mark.parametrize("n", [1, 129, 1000])
def test_triton_matches_torch_optim(monkeypatch, n):
    use_triton_path(monkeypatch)
    use_small_tiles(monkeypatch)  # 128-element blocks: 1000 leaves a ragged last block
    assert _run_against_torch_optim(n, steps=4, seed=n, device=kernel_device()) < 1e-6


def test_triton_production_block(monkeypatch):
    use_triton_path(monkeypatch)
    assert _run_against_torch_optim(5000, steps=2, seed=0, device=kernel_device()) < 1e-6


def test_rejects_mismatched_buffers():
    p = torch.zeros(4)
    with pytest.raises(ValueError):
        adamw_step_(p, torch.zeros(5), torch.zeros(4), torch.zeros(4), step=1, **HP)
    with pytest.raises(ValueError):
        adamw_step_(p, torch.zeros(4, dtype=torch.float64), torch.zeros(4), torch.zeros(4), step=1, **HP)
    with pytest.raises(ValueError):
        adamw_step_(p, torch.zeros(4), torch.zeros(4), torch.zeros(4), step=0, **HP)
