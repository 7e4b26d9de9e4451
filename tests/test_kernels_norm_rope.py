"""qk_norm_rope: Triton (NaN-poisoned outputs) vs torch reference vs float64 vs HF Qwen3."""
from __future__ import annotations

import pytest
import torch

from triton_kernels import qk_norm_rope, qk_norm_rope_torch
from helpers import kernel_device, leaf, randn_like, rel_err, use_small_tiles, use_triton_path

EPS = 1e-6
DEV = kernel_device()  # Triton-path tests: CUDA if present, else CPU through the interpreter


@pytest.fixture
def triton_path(monkeypatch):
    use_triton_path(monkeypatch)
    use_small_tiles(monkeypatch)


def _float64_norm_rope(x, w, cos, sin):
    """Hand formula in float64: RMSNorm (weight multiplies) then x*cos + rotate_half(x)*sin."""
    x = x.double()
    n = x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * w.double()
    half = x.shape[-1] // 2
    rotated = torch.cat((-n[..., half:], n[..., :half]), dim=-1)
    return n * cos.double().unsqueeze(-2) + rotated * sin.double().unsqueeze(-2)


def _inputs(B, T, HQ, HK, D, dtype, per_batch_cos, seed, device=DEV):
    g = torch.Generator().manual_seed(seed)
    q = (3 * torch.randn(B, T, HQ, D, generator=g)).to(dtype)  # not unit scale: the norm matters
    k = torch.randn(B, T, HK, D, generator=g).to(dtype)
    wq = 1 + 0.3 * torch.randn(D, generator=g)
    wk = 1 + 0.3 * torch.randn(D, generator=g)
    angles = torch.randn((B, T, D) if per_batch_cos else (T, D), generator=g) * 3
    return [t.to(device) for t in (q, k, wq, wk, angles.cos(), angles.sin())]


def _run(fn, q, k, wq, wk, cos, sin, dq_strided=False):
    leaves = [leaf(t) for t in (q, k, wq, wk)]
    oq, ok = fn(*leaves, cos, sin, EPS)
    gq, gk = randn_like(oq, 3), randn_like(ok, 4)
    if dq_strided:  # upstream grads arriving as a transposed view, as attention's backward gives them
        gq = gq.transpose(1, 2).contiguous().transpose(1, 2)
    torch.autograd.backward([oq, ok], [gq, gk])
    return [oq, ok] + [t.grad for t in leaves], (gq, gk)


def _check(fn, q, k, wq, wk, cos, sin, tol, dq_strided=False):
    got, (gq, gk) = _run(fn, q, k, wq, wk, cos, sin, dq_strided)
    l64 = [leaf(t, torch.float64) for t in (q, k, wq, wk)]
    o64 = [_float64_norm_rope(l64[0], l64[2], cos, sin), _float64_norm_rope(l64[1], l64[3], cos, sin)]
    torch.autograd.backward(o64, [gq.double(), gk.double()])
    want = o64 + [t.grad for t in l64]
    for name, a, e in zip(("q", "k", "dq", "dk", "dwq", "dwk"), got, want):
        assert rel_err(a, e) < tol, (name, rel_err(a, e))
    return got


@pytest.mark.parametrize("B,T,HQ,HK,D,per_batch", [(1, 1, 1, 1, 2, False), (2, 7, 3, 1, 12, True),
                                                   (1, 9, 4, 2, 64, False)])
def test_torch_reference_matches_float64(B, T, HQ, HK, D, per_batch):
    _check(qk_norm_rope_torch, *_inputs(B, T, HQ, HK, D, torch.float32, per_batch, seed=D, device="cpu"),
           tol=1e-5)


@pytest.mark.parametrize("B,T,HQ,HK,D,per_batch", [(1, 1, 1, 1, 2, False), (2, 7, 3, 1, 12, True),
                                                   (2, 5, 4, 2, 24, False)])
def test_triton_float32_matches_float64_and_reference(triton_path, B, T, HQ, HK, D, per_batch):
    inputs = _inputs(B, T, HQ, HK, D, torch.float32, per_batch, seed=10 + D)
    got = _check(qk_norm_rope, *inputs, tol=1e-5)
    ref, _ = _run(qk_norm_rope_torch, *inputs)
    for a, e in zip(got, ref):
        assert rel_err(a, e) < 1e-5


def test_triton_bfloat16_and_strided_inputs(triton_path):
    q, k, wq, wk, cos, sin = _inputs(2, 6, 4, 2, 16, torch.bfloat16, True, seed=4)
    # q and k as column slices of one projection buffer, the layout a fused qkv output would give
    buf = torch.cat([q.reshape(12, 64), k.reshape(12, 32)], dim=1)
    q_view, k_view = buf[:, :64].view(2, 6, 4, 16), buf[:, 64:].view(2, 6, 2, 16)
    assert not q_view.is_contiguous()
    # one bf16 rounding of the outputs and input grads; the weight grads accumulate in float32
    got = _check(qk_norm_rope, q_view, k_view, wq, wk, cos, sin, tol=1e-2, dq_strided=True)
    assert got[0].dtype == torch.bfloat16 and got[4].dtype == torch.float32


def test_triton_production_block(monkeypatch):
    use_triton_path(monkeypatch)  # default rows per program, Qwen3's head_dim
    _check(qk_norm_rope, *_inputs(1, 5, 4, 2, 128, torch.float32, False, seed=1), tol=1e-5)


def test_torch_reference_matches_hf_qwen3():
    """Independent reference: HF's Qwen3RMSNorm and apply_rotary_pos_emb with its rotary cos/sin."""
    modeling = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    from transformers import Qwen3Config

    config = Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         rope_theta=10000.0, rms_norm_eps=EPS)
    rotary = modeling.Qwen3RotaryEmbedding(config=config)
    q, k, wq, wk, _, _ = _inputs(2, 7, 4, 2, 16, torch.float32, False, seed=8, device="cpu")
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9]])
    cos, sin = rotary(q, position_ids)  # [B, T, D]
    q_norm, k_norm = modeling.Qwen3RMSNorm(16, eps=EPS), modeling.Qwen3RMSNorm(16, eps=EPS)
    with torch.no_grad():
        q_norm.weight.copy_(wq)
        k_norm.weight.copy_(wk)
        # HF works in [B, H, T, D]
        hq, hk = modeling.apply_rotary_pos_emb(q_norm(q).transpose(1, 2), k_norm(k).transpose(1, 2), cos, sin)
        ours = qk_norm_rope_torch(q, k, wq, wk, cos, sin, EPS)
    assert rel_err(ours[0], hq.transpose(1, 2)) < 1e-6
    assert rel_err(ours[1], hk.transpose(1, 2)) < 1e-6


def test_rejects_bad_shapes():
    q, k, wq, wk, cos, sin = _inputs(1, 3, 2, 1, 8, torch.float32, False, seed=0, device="cpu")
    with pytest.raises(ValueError):
        qk_norm_rope(q, k[:, :2], wq, wk, cos, sin, EPS)
    with pytest.raises(ValueError):
        qk_norm_rope(q, k, wq, wk, cos[:2], sin[:2], EPS)
