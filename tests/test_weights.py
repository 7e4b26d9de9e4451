"""Bad checkpoints give one clear EngineError naming the file and the problem; hub ids load offline."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine
from helpers import hf_model, save_hf, tiny_config


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_hf(hf_model(tiny_config()), tmp_path_factory.mktemp("good"))


def _copy(good, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(good, dst)
    return dst


def _raises(path, *patterns):
    with pytest.raises(engine.EngineError) as info:
        engine.load_model(path, device="cpu")
    msg = str(info.value)
    for p in patterns:
        assert p in msg, msg
    return msg


def test_missing_config(good, tmp_path):
    d = _copy(good, tmp_path)
    (d / "config.json").unlink()
    _raises(d, "config.json", "not found")


def test_corrupt_config(good, tmp_path):
    d = _copy(good, tmp_path)
    (d / "config.json").write_text('{"model_type": "qwen3",\n "hidden_size": }')
    _raises(d, "config.json:2", "not valid JSON")


def test_non_qwen3_architecture(good, tmp_path):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    _raises(d, "config.json", "not a Qwen3 checkpoint", "llama")


def test_truncated_safetensors(good, tmp_path):
    d = _copy(good, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _raises(d, "model.safetensors", "corrupt or truncated")


def test_wrong_shape(good, tmp_path):
    d = _copy(good, tmp_path)
    state = load_file(str(d / "model.safetensors"))
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(7, 48)
    save_file(state, str(d / "model.safetensors"))
    _raises(d, "model.layers.1.self_attn.k_proj.weight", "shape [7, 48]", "expected [32, 48]")


def test_missing_tensor(good, tmp_path):
    d = _copy(good, tmp_path)
    state = load_file(str(d / "model.safetensors"))
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, str(d / "model.safetensors"))
    _raises(d, "missing tensors", "model.layers.0.mlp.up_proj.weight")


def test_only_pickle_files(good, tmp_path):
    d = _copy(good, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _raises(d, "only pickle weights", "pytorch_model.bin", "safetensors only")


def test_not_a_directory(tmp_path):
    _raises(tmp_path / "nope", "model directory not found")


def test_hub_id_offline_from_cache(good, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache layout with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-qwen3" / "snapshots" / ("a" * 40)
    shutil.copytree(good, snap)
    (cache / "models--acme--tiny-qwen3" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-qwen3" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = engine.load_model("acme/tiny-qwen3", device="cpu")
    assert model.config.hidden_size == 48
    _raises("acme/not-cached", "acme/not-cached", "could not get hub model")
