"""Frozen weights kept in their checkpoint dtype (bf16) under float32 compute: lossless by construction,
so every result must be bit-identical to the all-float32 model: logits, LoRA gradients, generation,
merging, and whole training runs."""
import copy
import json

import pytest
import torch

import engine
from engine.model.logprobs import token_logprobs
from engine.model.lora import LoRAConfig, apply_lora, load_adapter, merge_adapter
from engine.generate.sampler import SamplingParams, generate
from engine.train.train_config import load_config
from engine.train.trainer import Trainer
from helpers import hf_model, save_hf, tiny_config, tiny_model_dir, write_rollouts


def _bf16_exact_model(tmp_path, tie: bool, **overrides):
    """A float32 engine model loaded from a bf16 checkpoint (odd shapes, GQA), LoRA on q/k/v/o with B != 0."""
    cfg = tiny_config(vocab_size=173, hidden_size=40, intermediate_size=71, num_attention_heads=5,
                      num_key_value_heads=1, head_dim=12, tie_word_embeddings=tie, **overrides)
    save_hf(hf_model(cfg, seed=int(torch.randint(0, 1000, ())))
            .to(torch.bfloat16), tmp_path / "m")
    model = engine.load_model(tmp_path / "m", dtype=torch.float32, device="cpu")
    apply_lora(model, LoRAConfig(r=3, alpha=7.0), seed=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def _frozen_matrices(model):
    return {n: p for n, p in model.named_parameters() if p.dim() == 2 and not p.requires_grad}


@pytest.mark.parametrize("tie", [True, False])
def test_compaction_is_lossless_forward_and_backward(tmp_path, tie):
    full = _bf16_exact_model(tmp_path, tie)
    compact = copy.deepcopy(full)
    expected = sum(p.numel() * 2 for p in {id(p): p for p in _frozen_matrices(full).values()}.values())
    assert compact.compact_frozen_weights() == expected > 0
    assert all(p.dtype == torch.bfloat16 for p in _frozen_matrices(compact).values())
    assert all(p.dtype == torch.float32 for n, p in compact.named_parameters() if p.requires_grad or p.dim() == 1)
    assert compact.dtype == torch.float32
    if tie:
        assert compact.lm_head.weight is compact.model.embed_tokens.weight
    for n, p in _frozen_matrices(compact).items():
        assert torch.equal(p.float(), _frozen_matrices(full)[n])

    ids = torch.randint(0, 173, (3, 19))
    mask = torch.ones(3, 19, dtype=torch.long)
    mask[1, :5] = 0                                         # left padding
    score = torch.rand(3, 19) < 0.7
    grads = []
    for model in (full, compact):
        model.train()
        assert torch.equal(model(ids, attention_mask=mask).logits, full(ids, attention_mask=mask).logits)
        logps = token_logprobs(model, ids, mask, score)
        (logps * torch.randn(3, 19, generator=torch.Generator().manual_seed(0))).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_generation_and_merge_match(tmp_path):
    full = _bf16_exact_model(tmp_path, tie=True)
    compact = copy.deepcopy(full)
    compact.compact_frozen_weights()
    prompts = [torch.randint(3, 170, (n,)).tolist() for n in (5, 11, 8)]
    params = SamplingParams(12, temperature=0.8, top_p=0.9)
    a = generate(full, prompts, params, stop_ids=[0], pad_id=1, seed=3)
    b = generate(compact, prompts, params, stop_ids=[0], pad_id=1, seed=3)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.behavior_logps for g in a] == [g.behavior_logps for g in b]
    # Merging a compacted base goes to the compute dtype: the adapter's update is not rounded to bf16.
    merge_adapter(full), merge_adapter(compact)
    w_full, w_compact = full.model.layers[0].self_attn.q_proj.weight, compact.model.layers[0].self_attn.q_proj.weight
    assert w_compact.dtype == torch.float32 and torch.equal(w_full, w_compact)
    ids = torch.randint(0, 173, (2, 9))
    assert torch.equal(full(ids).logits, compact(ids).logits)


def test_compact_load_equals_compacting_after_load(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    save_hf(hf_model(cfg).to(torch.bfloat16), tmp_path / "m")
    loaded = engine.load_model(tmp_path / "m", dtype=torch.float32, device="cpu", compact_frozen=True)
    after = engine.load_model(tmp_path / "m", dtype=torch.float32, device="cpu")
    freed = after.compact_frozen_weights()
    assert loaded.compacted_bytes() == after.compacted_bytes() == freed > 0
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert all(p.dtype == q.dtype and torch.equal(p, q) for p, q in zip(loaded.parameters(), after.parameters()))


def test_weights_not_exact_in_bf16_stay(tmp_path):
    cfg = tiny_config()
    save_hf(hf_model(cfg), tmp_path / "m")                  # float32 checkpoint: values need 4 bytes
    model = engine.load_model(tmp_path / "m", dtype=torch.float32, device="cpu")
    apply_lora(model, LoRAConfig(r=2, alpha=4.0))
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert model.compact_frozen_weights() == 0
    assert all(torch.equal(p, before[n]) and p.dtype == torch.float32 for n, p in model.named_parameters())


def test_trainer_compacts_a_bf16_checkpoint_bit_identically(tmp_path, monkeypatch):
    model_dir = tiny_model_dir(tmp_path / "model", weights_dtype=torch.bfloat16)
    rollouts = write_rollouts(tmp_path / "rollouts.jsonl", n_groups=6)

    def run(name):
        cfg = load_config(None, model=str(model_dir), rollouts=str(rollouts), out=str(tmp_path / name), steps=4,
                          lr=2e-2, batch_size=8, micro_batch_size=4, lora_r=4, lora_alpha=8.0, warmup_ratio=0.0,
                          max_len=128, loss="grpo", dtype="float32", device="cpu")
        trainer = Trainer(cfg, progress=False)
        out = trainer.run()
        start = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        return trainer, out, start

    compact, out_compact, start = run("compact")
    assert start["compacted_frozen_bytes"] == compact.compacted_bytes > 0
    assert {p.dtype for p in _frozen_matrices(compact.model).values()} == {torch.bfloat16}
    import engine.train.trainer
    load = engine.train.trainer.load_model
    monkeypatch.setattr(engine.train.trainer, "load_model", lambda *a, **kw: load(*a, **{**kw, "compact_frozen": False}))
    full, out_full, _ = run("full")
    assert full.compacted_bytes == 0
    assert {p.dtype for p in _frozen_matrices(full.model).values()} == {torch.float32}
    a = load_adapter(engine.load_model(model_dir, dtype=torch.float32, device="cpu"), out_compact)
    b = load_adapter(engine.load_model(model_dir, dtype=torch.float32, device="cpu"), out_full)
    lora = {n: p for n, p in a.named_parameters() if "lora_" in n}
    assert lora and all(torch.equal(p, b.get_parameter(n)) for n, p in lora.items())
