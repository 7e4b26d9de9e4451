"""Untrusted files: only safetensors are ever deserialised (planted pickles are never opened, audited
through Python's `pickle.find_class` hook and `sys.addaudithook`), and names read from files (shard
indexes, manifests, adapter configs) never escape their directory."""
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

import engine
from engine.model.weights import load_model
from engine.model.qwen3_config import Qwen3Config
from engine.errors import EngineError
from engine.model.lora import LoRAConfig, apply_lora, load_adapter, read_adapter_config, save_adapter
from engine.model.qwen3 import Qwen3ForCausalLM
from helpers import tiny_config


def tiny_model(path: Path) -> Path:
    """A random-weight one-layer Qwen3 checkpoint directory (config.json + model.safetensors)."""
    engine.save_model(Qwen3ForCausalLM(Qwen3Config.from_dict(tiny_config(num_hidden_layers=1))), path)
    return path


# ---- only safetensors are deserialised -----------------------------------------------------------
class Planted:
    """Unpickling this creates a marker file: proof that a pickle was opened."""
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every route to unpickling fails the test; opens of files are recorded (audit hook)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    class ForbiddenUnpickler(pickle.Unpickler):  # a class: torch subclasses pickle.Unpickler on import
        def __init__(self, *args, **kwargs):
            forbidden()
    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(target, name, forbidden)
    monkeypatch.setattr(pickle, "Unpickler", ForbiddenUnpickler)
    if not AUDIT["installed"]:  # audit hooks cannot be removed: install once, inert when off
        sys.addaudithook(_audit)
        AUDIT["installed"] = True
    OPENED.clear()
    AUDIT["on"] = True
    yield OPENED
    AUDIT["on"] = False


OPENED: list[str] = []
AUDIT = {"on": False, "installed": False}


def _audit(event, args):
    if AUDIT["on"] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


def test_planted_pickles_are_never_opened(tmp_path, no_unpickling):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(Planted(marker))
    AUDIT["on"] = False  # planting writes the files: not what is being watched
    model_dir = tiny_model(tmp_path / "model")
    for name in ("pytorch_model.bin", "model.pt", "training_args.bin"):
        (model_dir / name).write_bytes(payload)
    model = load_model(model_dir, device="cpu")
    apply_lora(model, LoRAConfig(r=2, alpha=4.0), seed=0)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter)
    (adapter / "adapter_model.bin").write_bytes(payload)
    (adapter / "optimizer.pt").write_bytes(payload)
    only_pickle = tmp_path / "only_pickle"
    only_pickle.mkdir()
    shutil.copy(model_dir / "config.json", only_pickle / "config.json")
    (only_pickle / "pytorch_model.bin").write_bytes(payload)
    AUDIT["on"] = True
    engine.load_model(model_dir, device="cpu", adapter=adapter)
    # Directories holding only pickles are refused with a pointer to safetensors.
    with pytest.raises(EngineError, match="only pickle weights found"):
        load_model(only_pickle, device="cpu")
    AUDIT["on"] = False
    (adapter / "adapter_model.safetensors").unlink()
    AUDIT["on"] = True
    with pytest.raises(EngineError, match="only safetensors adapters are read"):
        load_adapter(load_model(model_dir, device="cpu"), adapter)
    assert not marker.exists()
    assert str(model_dir / "config.json") in no_unpickling  # the watch works: Python-level opens are seen
    assert not [p for p in no_unpickling if p.endswith((".bin", ".pt"))], no_unpickling
    # The planted payload is live: unpickling it really would have left the marker.
    AUDIT["on"] = False
    pickle._loads(payload)
    assert marker.exists()


# ---- names from files stay inside their directory ------------------------------------------------
def test_names_never_escape_their_directory(tmp_path, no_unpickling):
    model_dir = tiny_model(tmp_path / "models" / "m")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(model_dir / "model.safetensors", outside)
    keys = list(json.loads((model_dir / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (model_dir / "model.safetensors").read_bytes()[:8], "little")]))
    for escape in ("../../outside.safetensors", str(outside)):
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: escape for k in keys if k != "__metadata__"}}))
        with pytest.raises(EngineError, match="escapes the model directory") as info:
            load_model(model_dir, device="cpu")
        assert info.value.field == "weight_map"
    # Adapter config fields holding paths are names only: never opened, never used as paths.
    (model_dir / "model.safetensors.index.json").unlink()
    model = load_model(model_dir, device="cpu")
    apply_lora(model, LoRAConfig(r=2, alpha=4.0), seed=0)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, base_name="../../../../etc/passwd")
    raw = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**raw, "target_modules": ["../../x"]}))
    with pytest.raises(EngineError) as info:
        read_adapter_config(adapter)
    assert info.value.field == "target_modules"
    (adapter / "adapter_config.json").write_text(json.dumps(raw))
    OPENED.clear()
    load_adapter(model, adapter)
    assert OPENED and all(Path(p).resolve().is_relative_to(adapter.resolve()) for p in OPENED), OPENED
    # A checkpoint manifest naming '../x' is reported as corrupt, and the file is never read.
    from engine.train.checkpoints import verify
    secret = tmp_path / "secret"
    secret.write_text("do not read")
    (adapter / "manifest.json").write_text(json.dumps({"files": {"../secret": {"size": 11, "sha256": "0"}}}))
    OPENED.clear()
    assert "outside the checkpoint directory" in verify(adapter)
    assert str(secret) not in OPENED and not any(p.endswith("secret") for p in OPENED)
