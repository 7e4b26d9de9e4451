"""The hand-written decoder equals transformers' Qwen3ForCausalLM (random weights, float32)."""
import json

import pytest
import torch

import engine
from helpers import QWEN3_CONFIGS, hf_model, save_hf, tiny_config

CONFIGS = {
    "untied_kv2": tiny_config(),
    "tied_kv1": tiny_config(tie_word_embeddings=True, num_key_value_heads=4, rope_theta=5e6),
    "kv4_headdim": tiny_config(num_attention_heads=8, num_key_value_heads=2, head_dim=8, hidden_size=40,
                               num_hidden_layers=3, vocab_size=157),
    "mha_square": tiny_config(num_attention_heads=3, num_key_value_heads=3, head_dim=16, hidden_size=48,
                              rope_theta=5e6, tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    hf = hf_model(cfg, seed=hash(request.param) % 1000)
    path = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return hf, engine.load_model(path, device="cpu"), cfg


def _valid_max(a, b, mask):
    return ((a - b).abs().amax(-1) * mask).max().item()


def test_logits_and_hidden_states_no_padding(pair):
    hf, ours, cfg = pair
    ids = torch.randint(0, cfg["vocab_size"], (3, 13))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        out = ours(ids, output_hidden_states=True)
    assert out.logits.shape == ref.logits.shape
    assert (out.logits - ref.logits).abs().max() < 1e-4
    assert len(out.hidden_states) == len(ref.hidden_states) == cfg["num_hidden_layers"] + 1
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(pair, side):
    hf, ours, cfg = pair
    B, T = 4, 11
    ids = torch.randint(0, cfg["vocab_size"], (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for row, pad in enumerate([0, 3, 5, 1]):
        if pad:
            if side == "left":
                mask[row, :pad] = 0
            else:
                mask[row, T - pad:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, output_hidden_states=True)
        out = ours(ids, attention_mask=mask, output_hidden_states=True)
    assert not out.logits.isnan().any()
    assert _valid_max(out.logits, ref.logits, mask) < 1e-4
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert _valid_max(a, b, mask) < 1e-4
    # A padded row's valid positions equal the same tokens run alone (no leakage across padding).
    row = 2
    valid = ids[row][mask[row].bool()][None]
    with torch.no_grad():
        alone = ours(valid).logits[0]
    assert (out.logits[row][mask[row].bool()] - alone).abs().max() < 1e-4


@pytest.mark.parametrize("keys_transposed", [True, False], ids=["cpu-layout", "gpu-layout"])
def test_kv_cache_decode_equals_full_sequence(pair, keys_transposed):
    _, ours, cfg = pair
    B, P, steps = 3, 7, 6
    ids = torch.randint(0, cfg["vocab_size"], (B, P + steps))
    mask = torch.ones(B, P + steps, dtype=torch.long)
    mask[1, :2] = 0  # left padding in one row
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        cache = engine.KVCache(ours.config, B, P + steps, torch.float32, "cpu", keys_transposed=keys_transposed)
        pre = ours(ids[:, :P], attention_mask=mask[:, :P], kv_cache=cache).logits
        got = [pre[:, -1]]
        for t in range(P, P + steps - 1):
            got.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache).logits[:, -1])
    assert cache.length == P + steps - 1
    assert (pre - full[:, :P]).abs().amax(-1).mul(mask[:, :P]).max() < 1e-4
    dec = torch.stack(got, 1)
    assert (dec - full[:, P - 1:P + steps - 1]).abs().max() < 1e-4


def test_chunked_prefill_with_cache(pair):
    _, ours, cfg = pair
    ids = torch.randint(0, cfg["vocab_size"], (2, 12))
    with torch.no_grad():
        full = ours(ids).logits
        cache = engine.KVCache(ours.config, 2, 12, torch.float32, "cpu")
        a = ours(ids[:, :5], kv_cache=cache).logits
        b = ours(ids[:, 5:], kv_cache=cache).logits
    assert (torch.cat([a, b], 1) - full).abs().max() < 1e-4


def test_gradients_match_hf(pair):
    hf, ours, cfg = pair
    ids = torch.randint(0, cfg["vocab_size"], (2, 9))
    hf_w = hf.model.layers[0].self_attn.q_proj.weight
    our_w = ours.model.layers[0].self_attn.q_proj.weight
    hf_w.requires_grad_(True)
    our_w.requires_grad_(True)
    hf(ids).logits.logsumexp(-1).sum().backward()
    ours(ids).logits.logsumexp(-1).sum().backward()
    assert torch.allclose(our_w.grad, hf_w.grad, atol=1e-4, rtol=1e-3)
    our_w.requires_grad_(False)


def test_save_round_trip(pair, tmp_path):
    _, ours, cfg = pair
    engine.save_model(ours, tmp_path / "out")
    again = engine.load_model(tmp_path / "out", device="cpu")
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["tie_word_embeddings"] == cfg["tie_word_embeddings"]
    engine.save_model(ours, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    again = engine.load_model(tmp_path / "sharded", device="cpu")
    ids = torch.randint(0, cfg["vocab_size"], (1, 5))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, again(ids).logits)


def test_rope_parameters_form(tmp_path):
    cfg = tiny_config(rope_theta=5e6)
    hf = hf_model(cfg)
    path = save_hf(hf, tmp_path / "m")
    raw = json.loads((path / "config.json").read_text())
    theta = raw.pop("rope_theta", None) or raw["rope_parameters"]["rope_theta"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    (path / "config.json").write_text(json.dumps(raw))
    ours = engine.load_model(path, device="cpu")
    assert ours.config.rope_theta == 5e6
    ids = torch.randint(0, cfg["vocab_size"], (2, 7))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() < 1e-4


@pytest.mark.slow
def test_qwen3_0_6b_shape_sharded(tmp_path):
    """The real 0.6B shape (q_proj 1024 -> 2048, tied, 28 layers), saved sharded, against transformers."""
    cfg = json.loads((QWEN3_CONFIGS / "Qwen3-0.6B.json").read_text())
    from transformers import Qwen3Config as HFConfig, Qwen3ForCausalLM as HFModel
    hf_cfg = HFConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("meta"):
        hf = HFModel(hf_cfg)
    hf = hf.to_empty(device="cpu").float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.02)
    hf.tie_weights()
    # to_empty() leaves non-persistent buffers (RoPE inv_freq) uninitialised: rebuild with HF's own init.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg)
    save_hf(hf, tmp_path / "m", max_shard_size="500MB")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    ours = engine.load_model(tmp_path / "m", device="cpu")
    assert ours.model.layers[0].self_attn.q_proj.weight.shape == (2048, 1024)
    ids = torch.randint(0, cfg["vocab_size"], (1, 12))
    with torch.no_grad():
        ref = hf(ids).logits
        del hf
        out = ours(ids).logits
    assert (out - ref).abs().max() < 1e-4
