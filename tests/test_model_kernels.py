"""The model on the Triton path (fused q/k/v LoRA projection, fused q/k norm + RoPE, fused LoRA o_proj,
fused linear log-prob), run by the Triton interpreter on CPU, equals the torch path: logits, per-token
log-probs and every LoRA gradient."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import engine  # noqa: E402
from engine.model.logprobs import token_logprobs  # noqa: E402
from engine.model.lora import LoRAConfig, apply_lora, lora_modules  # noqa: E402
from helpers import hf_model, save_hf, tiny_config  # noqa: E402


def _run(model, ids, backend, monkeypatch):
    monkeypatch.setenv("ENGINE_KERNELS", backend)
    for p in model.parameters():
        p.grad = None
    lp = token_logprobs(model, ids)
    lp[:, 1:].sum().backward()
    grads = {n: m.lora_A.grad.clone() for n, m in lora_modules(model).items()}
    grads.update({n + ".B": m.lora_B.grad.clone() for n, m in lora_modules(model).items()})
    return lp.detach(), grads


def test_triton_path_equals_torch_path(tmp_path, monkeypatch):
    cfg = tiny_config(num_hidden_layers=1, vocab_size=97, hidden_size=40, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=56)
    model = engine.load_model(save_hf(hf_model(cfg), tmp_path / "m"), device="cpu")
    apply_lora(model, LoRAConfig(r=3, alpha=6.0), seed=1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.1)
    ids = torch.randint(0, 97, (2, 7))
    import engine.model.attention as attention
    from triton_kernels import dispatch
    calls = {"qkv": 0}
    real = attention.lora_projections

    def counted(*args, **kwargs):
        calls["qkv"] += dispatch.use_triton(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(attention, "lora_projections", counted)
    ref_lp, ref_g = _run(model, ids, "torch", monkeypatch)
    assert calls["qkv"] == 0
    tri_lp, tri_g = _run(model, ids, "triton", monkeypatch)
    assert calls["qkv"] == 1  # the fused Triton projection ran
    assert (tri_lp - ref_lp).abs().max() < 1e-4
    for name, g in ref_g.items():
        assert torch.allclose(tri_g[name], g, atol=1e-4, rtol=1e-3), name
    assert any(g.abs().sum() > 0 for g in ref_g.values())
