"""The hand-written training fast paths equal float64 references, values and gradients, on fresh
random inputs with odd shapes: RMSNorm, q/k norm + RoPE, SwiGLU, fused LoRA projections and the LM-head
log-prob with its Jacobian formed in the forward."""
import sys

import pytest
import torch
import torch.nn.functional as F

from engine.model import frozen, layers, logprobs
from engine.errors import EngineError
from helpers import apply_rope
from triton_kernels.lora_linear import lora_projections_torch
from triton_kernels.qk_norm_rope import norm_rope


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-300))


def _check(fn, ref_fn, inputs, grad_idx, tol):
    """fn(*inputs) vs ref_fn(*float64 inputs): outputs and the gradients w.r.t. inputs[grad_idx]."""
    ins = [t.detach().clone().requires_grad_(i in grad_idx) if t.is_floating_point() else t
           for i, t in enumerate(inputs)]
    ref_ins = [t.detach().double().requires_grad_(i in grad_idx) if t.is_floating_point() else t
               for i, t in enumerate(inputs)]
    out, ref = fn(*ins), ref_fn(*ref_ins)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in refs]
    got = torch.autograd.grad(outs, [ins[i] for i in grad_idx], [g.to(o.dtype) for g, o in zip(grads, outs)])
    want = torch.autograd.grad(refs, [ref_ins[i] for i in grad_idx], grads)
    for o, r in zip(outs, refs):
        assert o.dtype == inputs[0].dtype and _rel(o, r) < tol
    for g, w in zip(got, want):
        assert _rel(g, w) < tol, (_rel(g, w), tol)


def _ref_norm(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rms_norm_and_norm_rope(dtype, tol):
    B, T, H, D = 2, 7, 3, 18
    x = torch.randn(B, T, H, D).to(dtype)
    w = 1 + 0.3 * torch.randn(D)
    cos, sin = layers.RotaryEmbedding(D, 1e4).cos_sin(torch.randint(0, 99, (B, T)), dtype)
    _check(lambda x, w: layers.rms_norm(x, w, 1e-6), _ref_norm, [x, w], (0, 1), tol)

    def ref(x, w):
        return apply_rope(_ref_norm(x, w), cos.double(), sin.double())
    _check(lambda x, w: norm_rope(x, w, cos, sin, 1e-6), ref, [x, w], (0, 1), tol)


def test_norm_backward_leaves_the_incoming_grad_alone():
    x = torch.randn(5, 8, requires_grad=True)
    g = torch.randn(5, 8)
    g_copy = g.clone()
    layers.rms_norm(x, torch.randn(8), 1e-6).backward(g)
    assert torch.equal(g, g_copy)


def test_swiglu():
    gate, up = torch.randn(3, 11), torch.randn(3, 11)
    _check(layers.swiglu, lambda g, u: F.silu(g) * u, [gate, up], (0, 1), 1e-5)


@pytest.mark.parametrize("outs", [(13,), (10, 6, 6)])
@pytest.mark.parametrize("with_norm", [False, True])
def test_lora_projections(outs, with_norm):
    """With the input RMSNorm fused in: the gradient reaches h through the norm, and the norm's weight."""
    r, d_in = 3, 9
    x = torch.randn(2, 5, d_in) * (3.0 if with_norm else 1.0)
    ws = [torch.randn(o, d_in) for o in outs]
    As = [torch.randn(r, d_in) for _ in outs]
    Bs = [torch.randn(o, r) for o in outs]
    norm_w = [1.0 + 0.3 * torch.randn(d_in)] if with_norm else []
    K, eps = len(outs), 1e-5

    def fn(x, *p):
        norm = (p[2 * K], eps) if with_norm else None
        return lora_projections_torch(x, tuple(ws), p[:K], p[K:2 * K], 1.7, norm=norm)

    def ref(x, *p):
        if with_norm:
            x = _ref_norm(x, p[2 * K], eps)
        return tuple(x @ w.double().t() + 1.7 * (x @ a.t()) @ b.t() for w, a, b in zip(ws, p[:K], p[K:2 * K]))
    _check(fn, ref, [x, *As, *Bs, *norm_w], tuple(range(1 + 2 * K + len(norm_w))), 1e-5)


@pytest.mark.parametrize("N,V,H,buffer", [(7, 1000, 24, 2**20), (37, 9000, 16, 4 * 4096 * 5), (3, 4097, 8, 4)])
def test_head_logprob_with_jacobian(N, V, H, buffer):
    """One vocabulary block; several blocks and row chunks (online rescaling); a ragged last block."""
    W = 0.5 * torch.randn(V, H)
    W[-1] += 3.0  # a large logit in the last block: the running max must be rescaled
    h = torch.randn(N, H)
    t = torch.randint(0, V, (N,))
    t[0] = V - 1

    def ref(h):
        return torch.log_softmax(h @ W.double().t(), -1).gather(1, t[:, None])[:, 0]
    _check(lambda h: logprobs.head_logprob(h, W, t, buffer), ref, [h], (0,), 1e-5)


@pytest.mark.parametrize("N,V,H,buffer", [(7, 1000, 24, 2**20), (37, 9000, 16, 4 * 4096 * 5)])
def test_head_logprob_without_grad_on_a_compacted_head(N, V, H, buffer, monkeypatch):
    """Reference log-probs with a bf16-stored head and float32 compute: the blockwise loop (one cast
    vocabulary block at a time, no whole-head cast), equal to float64 log_softmax."""
    W = (0.5 * torch.randn(V, H)).bfloat16()
    W[-1] += 3.0
    h = torch.randn(N, H)
    t = torch.randint(0, V, (N,))
    t[0] = V - 1
    monkeypatch.setattr(sys.modules["triton_kernels.linear_logprob"], "linear_logprob",
                        lambda *a: pytest.fail("the whole head was cast"))
    with torch.no_grad():
        got = logprobs.head_logprob(h, W, t, buffer)
    want = torch.log_softmax(h.double() @ W.double().t(), -1).gather(1, t[:, None])[:, 0]
    assert got.dtype == torch.float32 and _rel(got, want) < 1e-5


def test_head_logprob_rejects_bad_ids():
    h = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(EngineError):
        logprobs.head_logprob(h, torch.randn(10, 4), torch.tensor([1, 10, 2]))


def test_serial_restores_the_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(4, 8, requires_grad=True)
        with layers.serial(x):
            assert torch.get_num_threads() == 1
        layers.rms_norm(x, torch.randn(8), 1e-6).sum().backward()
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), layers.serial(x):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_no_grad_paths_equal_the_autograd_ones():
    """Generation and reference log-probs skip the autograd.Functions: same forward math, same bits."""
    x, w = torch.randn(3, 5, 4, 10), 1 + 0.3 * torch.randn(10)
    cos, sin = layers.RotaryEmbedding(10, 1e4).cos_sin(torch.randint(0, 50, (3, 5)), torch.float32)
    g, u = torch.randn(3, 17), torch.randn(3, 17)
    h, ws = torch.randn(2, 6, 9), tuple(torch.randn(o, 9) for o in (8, 4, 4))
    As, Bs = tuple(torch.randn(3, 9) for _ in ws), tuple(torch.randn(o, 3) for o in (8, 4, 4))
    wide, narrow = torch.randn(2, 7, 9), torch.randn(11, 9).bfloat16()
    cases = [
        lambda t: layers.rms_norm(x * t, w, 1e-6),
        lambda t: norm_rope(x * t, w, cos, sin, 1e-6),
        lambda t: layers.swiglu(g * t, u),
        lambda t: lora_projections_torch(h * t, ws, As, Bs, 1.3)[1],
        lambda t: lora_projections_torch(h * t, ws, As, Bs, 1.3, norm=(w[:9], 1e-6))[0],
        lambda t: frozen.linear(wide * t, narrow),
    ]
    for case in cases:
        with torch.no_grad():
            fast = case(torch.ones(()))
        recorded = case(torch.ones((), requires_grad=True))
        assert recorded.requires_grad and torch.equal(fast, recorded.detach())


@pytest.mark.parametrize("H,KV,S,padded", [(6, 2, 13, True), (4, 4, 1, False), (5, 1, 30, True)])
def test_decode_attention_matches_sdpa(H, KV, S, padded):
    from engine.model.attention import decode_attention
    B, D = 3, 8
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, KV, S, D), torch.randn(B, KV, S, D)
    mask = None
    if padded:
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        mask[0, ..., : S // 2] = False
    ref = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(H // KV, 1),
                                         v.double().repeat_interleave(H // KV, 1), attn_mask=mask)
    assert _rel(decode_attention(q, k, v, mask), ref) < 1e-6
