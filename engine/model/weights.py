"""Load and save Hugging Face Qwen3 checkpoints: config.json + safetensors (single file or shards).

Only safetensors are ever read: no pickle, no `.bin`, no remote code. Tensors are read one at a time
from the memory-mapped file straight into the target dtype and device.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.devices import resolve_device
from engine.model.qwen3_config import Qwen3Config
from engine.model.frozen import stays_narrow
from engine.errors import EngineError
from engine.fsio import atomic_dir
from engine.model.qwen3 import Qwen3ForCausalLM

HUB_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "vocab.json", "merges.txt", "special_tokens_map.json", "*.safetensors",
                "model.safetensors.index.json"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 matrix products on CPUs without AMX run ~100x slower than fp32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_model_dir(path_or_repo_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id through huggingface_hub (works offline from the
    cache with HF_HUB_OFFLINE=1), fetching only config, tokenizer and safetensors files."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    s = str(path_or_repo_id)
    if path.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise EngineError("model directory not found (expected a directory with config.json, "
                          "or a hub id like 'Qwen/Qwen3-0.6B')", path=s)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        return Path(snapshot_download(s, allow_patterns=HUB_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise EngineError(f"could not get hub model (offline cache miss or network error: "
                          f"{type(e).__name__}: {e})", path=s) from None


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        except (ValueError, RecursionError, KeyError, TypeError) as e:  # ValueError: JSON, UTF-8, digits
            raise EngineError(f"bad shard index ({type(e).__name__}: {str(e)[:80]})", path=index) from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
            raise EngineError("expected an object of tensor name -> shard file name", path=index, field="weight_map")
        files = []
        for name in dict.fromkeys(weight_map.values()):
            # Checked on the name, not the resolved path: hub caches make shards symlinks into ../../blobs.
            if Path(name).is_absolute() or ".." in Path(name).parts or "\x00" in name:
                raise EngineError(f"shard {name!r} escapes the model directory", path=index, field="weight_map")
            f = model_dir / name
            if not f.is_file():
                raise EngineError(f"shard listed in the index is missing: {name}", path=index)
            files.append(f)
        return files
    if single.is_file():
        return [single]
    shards = sorted(model_dir.glob("*.safetensors"))
    if shards:
        return shards
    pickles = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise EngineError(f"only pickle weights found ({', '.join(sorted(pickles))}); this engine reads "
                          "safetensors only (convert with safetensors.torch.save_file)", path=model_dir)
    raise EngineError("no model.safetensors (or shards with model.safetensors.index.json) found", path=model_dir)


def load_state_into(model: torch.nn.Module, files: list[Path], dtype: torch.dtype,
                    device: torch.device, compact_frozen: bool = False) -> None:
    """Read every tensor of `files` into the matching parameter of `model`, checking names and shapes.
    compact_frozen: matrices stored narrower than `dtype` (bf16 in a Qwen3 checkpoint) stay as stored
    (`Qwen3ForCausalLM.compact_frozen_weights`: lossless, cast per product), norms go to `dtype`."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    expected = {n for n in params if not (tied and n == "lm_head.weight")}
    seen: set[str] = set()
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():
                    if tied and name == "lm_head.weight":
                        continue  # some tied checkpoints still carry a copy; the embedding wins
                    if name not in params:
                        if name.endswith("rotary_emb.inv_freq"):
                            continue
                        raise EngineError(f"unexpected tensor {name!r} (not a Qwen3 weight)", path=f)
                    p = params[name]
                    sl = sf.get_slice(name)
                    shape = tuple(sl.get_shape())
                    if shape != tuple(p.shape):
                        raise EngineError(f"tensor {name!r} has shape {list(shape)}, expected "
                                          f"{list(p.shape)} from config.json", path=f)
                    t = sf.get_tensor(name)
                    if not t.dtype.is_floating_point:  # casting integer (quantised?) weights trains garbage
                        raise EngineError(f"tensor {name!r} is stored as {str(t.dtype).removeprefix('torch.')}; "
                                          "expected floating-point weights (a quantised checkpoint?)", path=f)
                    keep = compact_frozen and stays_narrow(t.dtype, t.dim(), dtype)
                    t = t.to(device=device) if keep else t.to(device=device, dtype=dtype)
                    _assign(model, name, t)
                    seen.add(name)
        except SafetensorError as e:
            raise EngineError(f"corrupt or truncated safetensors file ({e})", path=f) from None
    missing = sorted(expected - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise EngineError(f"missing tensors: {', '.join(missing[:3])}{more}", path=files[0].parent)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def _assign(model: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)


def load_model(path_or_repo_id: str | os.PathLike, *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None, adapter: str | os.PathLike | None = None,
               compact_frozen: bool = False) -> Qwen3ForCausalLM:
    """Load a Qwen3 checkpoint directory (or hub id) into a frozen engine model, optionally with a
    PEFT LoRA adapter applied (unmerged). compact_frozen: keep the weight matrices in the checkpoint's
    narrower dtype under `dtype` compute (LoRA training in float32 on CPU; see `load_state_into`)."""
    model_dir = resolve_model_dir(path_or_repo_id)
    config = Qwen3Config.from_json(model_dir / "config.json")
    device = resolve_device(device) or default_device()
    dtype = dtype or default_dtype(device)
    files = _weight_files(model_dir)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    load_state_into(model, files, dtype, device, compact_frozen)
    model.name_or_path = str(path_or_repo_id)
    model.eval()
    if adapter is not None:
        from engine.model.lora import load_adapter
        load_adapter(model, adapter)
    return model


def save_model(model: Qwen3ForCausalLM, out_dir: str | os.PathLike, *,
               max_shard_bytes: int | None = None) -> None:
    """Write config.json and model.safetensors (sharded with an index past `max_shard_bytes`),
    atomically. Enabled LoRA adapters are folded into the weights (export)."""
    with atomic_dir(out_dir) as tmp:
        write_model_files(model, tmp, max_shard_bytes=max_shard_bytes)


def write_model_files(model: Qwen3ForCausalLM, directory: Path, *, max_shard_bytes: int | None = None) -> None:
    """The files of `save_model`, written into an existing directory (callers make it atomic)."""
    from engine.model.lora import merged_state_dict
    state = merged_state_dict(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config.to_dict()
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    _write_model_files(directory, config, shards, state)


def _write_model_files(directory: Path, config: dict, shards: list[dict[str, torch.Tensor]],
                       state: dict[str, torch.Tensor]) -> None:
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
