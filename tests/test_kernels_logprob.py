"""linear_logprob / head_logprob: Triton (NaN-poisoned outputs) vs the torch paths CPU runs vs float64 log_softmax."""
from __future__ import annotations

import pytest
import torch

from engine.errors import EngineError
from triton_kernels import linear_logprob
from helpers import kernel_device, leaf, module, randn_like, rel_err, use_small_tiles, use_triton_path

DEV = kernel_device()  # Triton-path tests: CUDA if present, else CPU through the interpreter


@pytest.fixture
def triton_path(monkeypatch):
    use_triton_path(monkeypatch)
    use_small_tiles(monkeypatch)


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("ENGINE_KERNELS", "torch")


def _inputs(lead, H, V, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 2 / H ** 0.5).to(dtype)  # peaked softmax, |z| up to ~8
    targets = torch.randint(0, V, lead, generator=g)
    return hidden.to(device), weight.to(device), targets.to(device)


def _float64(hidden, weight, targets):
    """(logp, entropy) from a plain float64 log_softmax over the full [N, V] logits."""
    logits = hidden.double() @ weight.double().T
    logsm = torch.log_softmax(logits, dim=-1)
    return logsm.gather(-1, targets[..., None]).squeeze(-1), -(logsm.exp() * logsm).sum(-1)


def _check(hidden, weight, targets, tol, **kwargs):
    """Forward (logp, entropy, prob) and d(sum g*logp + sum g2*prob)/dhidden against float64."""
    h = leaf(hidden)
    logp, entropy, prob = linear_logprob(h, weight, targets, return_entropy=True, return_prob=True, **kwargs)
    g1, g2 = randn_like(logp, 5), randn_like(logp, 6)
    ((logp * g1).sum() + (prob * g2).sum()).backward()
    h64 = leaf(hidden, torch.float64)
    logp64, entropy64 = _float64(h64, weight, targets)
    ((logp64 * g1.double()).sum() + (logp64.exp() * g2.double()).sum()).backward()
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert not entropy.requires_grad and prob.requires_grad
    for name, got, want in (("logp", logp, logp64), ("entropy", entropy, entropy64),
                            ("prob", prob, logp64.exp()), ("grad", h.grad, h64.grad)):
        assert rel_err(got, want) < tol, (name, rel_err(got, want))
    return logp, entropy, h.grad


@pytest.mark.parametrize("lead,H,V,chunk", [((1,), 8, 5, None), ((37,), 24, 101, 10), ((3, 17), 40, 64, 16)])
def test_torch_reference_matches_float64(torch_path, lead, H, V, chunk):
    _check(*_inputs(lead, H, V, torch.float32, seed=V), tol=1e-5, chunk_size=chunk)


def test_torch_reference_chunking_does_not_change_results(torch_path):
    hidden, weight, targets = _inputs((50,), 16, 77, torch.float32, seed=2)
    one = _check(hidden, weight, targets, tol=1e-5, chunk_size=50)
    many = _check(hidden, weight, targets, tol=1e-5, chunk_size=7)
    for a, b in zip(one, many):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("lead,H,V,chunk", [((1,), 20, 37, None), ((45,), 40, 101, 20), ((2, 19), 33, 150, 16)])
def test_triton_float32_matches_float64_and_reference(triton_path, monkeypatch, lead, H, V, chunk):
    # vocab 101/150 with 32-wide vocab tiles over 2 splits: ragged tiles, several tiles per split
    inputs = _inputs(lead, H, V, torch.float32, seed=H, device=DEV)
    got = _check(*inputs, tol=1e-5, chunk_size=chunk)
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    ref = _check(*inputs, tol=1e-5, chunk_size=chunk)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("N,H,V,buffer", [(45, 40, 101, 2**20), (7, 24, 5000, 4 * 4096 * 5)])
def test_triton_matches_the_cpu_training_path(triton_path, monkeypatch, N, H, V, buffer):
    """The Triton path against what CPU training runs for the LM head, `head_logprob`'s float32 torch
    path (blockwise over the vocabulary, the Jacobian formed in the forward): values and d/dhidden."""
    hidden, weight, targets = _inputs((N,), H, V, torch.float32, seed=N, device=DEV)
    runs = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("ENGINE_KERNELS", backend)
        h = leaf(hidden)
        logp = module("linear_logprob").head_logprob(h, weight, targets, buffer)
        (logp * randn_like(logp, 5)).sum().backward()
        runs.append((logp, h.grad))
    for got, want in zip(*runs):
        assert rel_err(got, want) < 1e-5


def test_triton_bfloat16(triton_path):
    hidden, weight, targets = _inputs((40,), 48, 90, torch.bfloat16, seed=3, device=DEV)
    # log-sum-exp in float32: the forward is exact up to float32 rounding of bf16 products; the
    # gradient goes through bf16 dlogits and a bf16 GEMM output
    logp, _, grad = _check(hidden, weight, targets, tol=1e-2, chunk_size=16)
    logp64, _ = _float64(hidden, weight, targets)
    assert rel_err(logp, logp64) < 1e-5
    assert grad.dtype == torch.bfloat16


def test_triton_production_tiles(monkeypatch):
    use_triton_path(monkeypatch)  # default 128-wide tiles: V=300 spans 3 vocab tiles, H=72 is ragged
    _check(*_inputs((20,), 72, 300, torch.float32, seed=4, device=DEV), tol=1e-5)


def test_default_chunk_fits_budget(monkeypatch, torch_path):
    lp = module("linear_logprob")
    monkeypatch.setattr(lp, "CHUNK_BYTES", 5 * 4 * 40)  # 5 rows of float32 [*, 40] logits per chunk
    hidden, weight, targets = _inputs((23,), 8, 40, torch.float32, seed=6)
    calls = []
    real_stats = lp._chunk_stats
    monkeypatch.setattr(lp, "_chunk_stats", lambda h, *a: calls.append(h.shape[0]) or real_stats(h, *a))
    _check(hidden, weight, targets, tol=1e-5)
    assert calls == [5, 5, 5, 5, 3]


def test_rejects_out_of_vocabulary_targets_and_bad_shapes():
    hidden, weight, targets = _inputs((4,), 8, 10, torch.float32, seed=1)
    with pytest.raises(EngineError, match="targets"):
        linear_logprob(hidden, weight, targets + 10)
    with pytest.raises(EngineError):
        linear_logprob(hidden, weight, targets - 11)
    with pytest.raises(ValueError):
        linear_logprob(hidden, weight.t(), targets)


def test_empty_input():
    hidden, weight, _ = _inputs((0,), 8, 10, torch.float32, seed=1)
    out = linear_logprob(leaf(hidden), weight, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
