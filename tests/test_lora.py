"""LoRA adapters (engine.model.lora): the adapter loader on fuzzed configs and mutated weight files raises
nothing but EngineError naming the file and field; wrong, missing or extra tensors are refused.
(Numerics of the LoRA projection: tests/test_kernels_lora.py, tests/test_fast_paths.py; PEFT round trips
beside the trainer and sampler they drive: tests/test_trainer.py, tests/test_sampler.py.)"""
import json
import math
import shutil

import pytest
import torch
from hypothesis import example, given, strategies as st
from safetensors.torch import save_file

from engine.errors import EngineError
from engine.model.lora import LoRAConfig, apply_lora, load_adapter, lora_modules, read_adapter_config, save_adapter
from engine.model.qwen3 import Qwen3ForCausalLM
from engine.model.qwen3_config import Qwen3Config
from helpers import FUZZ, JSON, report_counts, tiny_config, tried  # noqa: F401 (report_counts: autouse)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A tiny LoRA model and its saved adapter (the template every mutation starts from)."""
    root = tmp_path_factory.mktemp("adapter")
    model = Qwen3ForCausalLM(Qwen3Config.from_dict(tiny_config(num_hidden_layers=1)))
    apply_lora(model, LoRAConfig(r=2, alpha=4.0), seed=0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_()
    save_adapter(model, root / "adapter", base_name="tiny")
    return root / "adapter", model


ADAPTER_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "peft_type", "bias")


@FUZZ
@example(key="lora_alpha", value=10 ** 400, drop=False)
@example(key="lora_dropout", value="x", drop=False)
@given(key=st.sampled_from(ADAPTER_KEYS) | st.text(max_size=6), value=JSON, drop=st.booleans())
def test_adapter_config_only_raises_engine_errors_naming_the_field(adapter_dir, tmp_path, key, value, drop):
    tried("adapter-config")
    template, _ = adapter_dir
    raw = json.loads((template / "adapter_config.json").read_text())
    if drop and key in raw:
        del raw[key]
    else:
        raw[key] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    try:
        cfg, _ = read_adapter_config(tmp_path)
    except EngineError as e:
        assert e.path == str(tmp_path / "adapter_config.json") and e.field == key, (str(e), key)
        return
    assert isinstance(cfg.r, int) and not isinstance(cfg.r, bool) and cfg.r > 0
    assert math.isfinite(cfg.alpha) and cfg.alpha > 0 and 0 <= cfg.dropout < 1
    assert isinstance(cfg.use_rslora, bool)


@FUZZ
@given(kind=st.sampled_from(["truncate", "flip", "insert", "header"]), at=st.integers(0, 10 ** 6),
       data=st.binary(min_size=1, max_size=8), header_value=JSON)
def test_adapter_weights_only_raise_engine_errors(adapter_dir, tmp_path, kind, at, data, header_value):
    """Mutated adapter_model.safetensors bytes (header and data) on a model whose LoRA shapes match."""
    tried("adapter-weights")
    template, model = adapter_dir
    blob = bytearray((template / "adapter_model.safetensors").read_bytes())
    header_len = int.from_bytes(blob[:8], "little")
    at %= len(blob)
    if kind == "truncate":
        blob = blob[:at]
    elif kind == "flip":
        blob[at] ^= data[0] or 1
    elif kind == "insert":
        blob[at:at] = data
    else:
        header = json.loads(blob[8:8 + header_len])
        name = sorted(k for k in header if k != "__metadata__")[at % (len(header) - 1)]
        field = ["dtype", "shape", "data_offsets"][at % 3]
        header[name][field] = header_value
        encoded = json.dumps(header).encode()
        blob = bytearray(len(encoded).to_bytes(8, "little")) + encoded + blob[8 + header_len:]
    shutil.copy(template / "adapter_config.json", tmp_path / "adapter_config.json")
    (tmp_path / "adapter_model.safetensors").write_bytes(bytes(blob))
    try:
        load_adapter(model, tmp_path)
    except EngineError as e:
        assert e.path in (str(tmp_path / "adapter_model.safetensors"), str(tmp_path)), str(e)


def test_adapter_tensors_wrong_shape_missing_or_extra(adapter_dir, tmp_path):
    template, model = adapter_dir
    from safetensors.torch import load_file
    good = load_file(str(template / "adapter_model.safetensors"))
    first = sorted(good)[0]
    variants = {"shape": {**good, first: torch.zeros(3, 3)}, "missing": {k: v for k, v in good.items() if k != first},
                "extra": {**good, "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(2, 2)}}
    for name, tensors in variants.items():
        shutil.copy(template / "adapter_config.json", tmp_path / "adapter_config.json")
        save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
        with pytest.raises(EngineError) as info:
            load_adapter(model, tmp_path)
        assert info.value.path == str(tmp_path / "adapter_model.safetensors"), name
