"""lora_linear and qkv_proj: Triton (interpreter, NaN-poisoned outputs) vs torch reference vs float64."""
from __future__ import annotations

import pytest
import torch

from triton_kernels import lora_linear, lora_linear_torch, qkv_proj, qkv_proj_torch
from helpers import kernel_device, leaf, randn_like, rel_err, use_small_tiles, use_triton_path

SCALE = 1.7
DEV = kernel_device()  # Triton-path tests: CUDA if present, else CPU through the interpreter


@pytest.fixture
def triton_path(monkeypatch):
    use_triton_path(monkeypatch)
    use_small_tiles(monkeypatch)


def _float64_lora(x, w, a, b, scale):
    """Hand formula in float64: y = x W^T + scale (x A^T) B^T, with autograd for the grads."""
    return x.double() @ w.double().T + scale * (x.double() @ a.double().T) @ b.double().T


def _inputs(lead, in_f, out_f, r, dtype, seed, device=DEV):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    w = (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(dtype)
    a = torch.randn(r, in_f, generator=g) / in_f ** 0.5
    b = torch.randn(out_f, r, generator=g)  # nonzero B so the LoRA term and dA are exercised
    return [t.to(device) for t in (x, w, a, b)]


def _run(fn, x, w, a, b, grad_seed):
    xs, as_, bs = leaf(x), leaf(a), leaf(b)
    y = fn(xs, w, as_, bs, SCALE)
    gy = randn_like(y, grad_seed)
    y.backward(gy)
    return y, xs.grad, as_.grad, bs.grad, gy


def _check_against_float64(fn, x, w, a, b, tol):
    """Runs fn forward and backward, compares with float64; returns (y, dx, dA, dB)."""
    y, dx, da, db, gy = _run(fn, x, w, a, b, grad_seed=7)
    x64, a64, b64 = leaf(x, torch.float64), leaf(a, torch.float64), leaf(b, torch.float64)
    y64 = _float64_lora(x64, w, a64, b64, SCALE)
    y64.backward(gy.double())
    for name, got, want in (("y", y, y64), ("dx", dx, x64.grad), ("dA", da, a64.grad), ("dB", db, b64.grad)):
        assert rel_err(got, want) < tol, (name, rel_err(got, want))
    assert da.dtype == a.dtype and db.dtype == b.dtype and dx.dtype == x.dtype
    return y, dx, da, db


@pytest.mark.parametrize("lead,in_f,out_f,r", [((1,), 5, 3, 1), ((3, 29), 37, 23, 8), ((97,), 64, 48, 32)])
def test_torch_reference_matches_float64(lead, in_f, out_f, r):
    x, w, a, b = _inputs(lead, in_f, out_f, r, torch.float32, seed=r, device="cpu")
    _check_against_float64(lora_linear_torch, x, w, a, b, tol=1e-5)


@pytest.mark.parametrize("lead,in_f,out_f,r", [
    ((1,), 19, 21, 1), ((2, 23), 37, 45, 8), ((61,), 20, 33, 16), ((3, 17), 40, 35, 32)])
def test_triton_float32_matches_reference(triton_path, lead, in_f, out_f, r):
    # tiles are 32x32 with K steps of 16: these sizes leave ragged edges in every dimension
    x, w, a, b = _inputs(lead, in_f, out_f, r, torch.float32, seed=100 + r)
    got = _check_against_float64(lora_linear, x, w, a, b, tol=1e-5)
    ref = _run(lora_linear_torch, x, w, a, b, grad_seed=7)
    for g, e in zip(got, ref[:4]):
        assert rel_err(g, e) < 1e-5


def test_triton_bfloat16_activations_with_float32_adapters(triton_path):
    x, w, a, b = _inputs((2, 21), 48, 40, 16, torch.bfloat16, seed=5)
    # bf16 operands, float32 accumulation: one bf16 rounding of y and of the [M, r] intermediates.
    _check_against_float64(lora_linear, x, w, a, b, tol=2e-2)


def test_triton_production_tiles(monkeypatch):
    use_triton_path(monkeypatch)  # default (production) tile sizes: one ragged 128x128 tile
    x, w, a, b = _inputs((70,), 72, 136, 32, torch.float32, seed=9)
    _check_against_float64(lora_linear, x, w, a, b, tol=1e-5)


def test_rejects_bad_shapes_and_trainable_weight():
    x, w, a, b = _inputs((4,), 8, 6, 2, torch.float32, seed=1, device="cpu")
    with pytest.raises(ValueError):
        lora_linear(x, w, a.t(), b, 1.0)
    with pytest.raises(ValueError):
        lora_linear(x, w.requires_grad_(), a, b, 1.0)


def _qkv_inputs(tokens, in_f, outs, r, dtype, seed, device=DEV):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, in_f, generator=g).to(dtype)
    ws = [(torch.randn(n, in_f, generator=g) / in_f ** 0.5).to(dtype) for n in outs]
    as_ = [torch.randn(r, in_f, generator=g) / in_f ** 0.5 for _ in outs]
    bs = [torch.randn(n, r, generator=g) for n in outs]
    return x.to(device), [w.to(device) for w in ws], [a.to(device) for a in as_], [b.to(device) for b in bs]


def _qkv_run(fn, x, ws, as_, bs):
    xs, al, bl = leaf(x), [leaf(a) for a in as_], [leaf(b) for b in bs]
    outs = fn(xs, ws, al, bl, SCALE)
    grads = [randn_like(o, 11 + i) for i, o in enumerate(outs)]
    torch.autograd.backward(outs, grads)
    return list(outs) + [xs.grad] + [t.grad for t in al + bl], grads


@pytest.mark.parametrize("dtype,r,tol", [(torch.float32, 1, 1e-5), (torch.float32, 32, 1e-5),
                                         (torch.bfloat16, 8, 2e-2)])
def test_qkv_triton_matches_float64_and_reference(triton_path, dtype, r, tol):
    # Qwen3 layout: q wider than k = v; sizes not multiples of the tiles
    x, ws, as_, bs = _qkv_inputs((2, 13), 41, (40, 24, 24), r, dtype, seed=r)
    got, grads = _qkv_run(qkv_proj, x, ws, as_, bs)
    x64, a64, b64 = leaf(x, torch.float64), [leaf(a, torch.float64) for a in as_], [leaf(b, torch.float64) for b in bs]
    outs64 = [_float64_lora(x64, w, a, b, SCALE) for w, a, b in zip(ws, a64, b64)]
    torch.autograd.backward(outs64, [g.double() for g in grads])
    want = outs64 + [x64.grad] + [t.grad for t in a64 + b64]
    for i, (g, e) in enumerate(zip(got, want)):
        assert rel_err(g, e) < tol, (i, rel_err(g, e))
    if dtype == torch.float32:
        ref, _ = _qkv_run(qkv_proj_torch, x, ws, as_, bs)
        for g, e in zip(got, ref):
            assert rel_err(g, e) < 1e-5


def test_qkv_outputs_are_contiguous_and_shaped():
    x, ws, as_, bs = _qkv_inputs((2, 3), 16, (12, 8, 8), 4, torch.float32, seed=2, device="cpu")
    q, k, v = qkv_proj(x, ws, as_, bs, 2.0)
    assert q.shape == (2, 3, 12) and k.shape == (2, 3, 8) and v.shape == (2, 3, 8)
    with pytest.raises(ValueError):
        qkv_proj(x, ws, [as_[0], as_[1], as_[2][:2]], bs, 2.0)  # ranks differ
