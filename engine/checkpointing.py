"""Training checkpoints: written atomically with a manifest, verified on resume, one writer per
output directory.

A checkpoint `OUT/step-N/` (and `OUT/final/`) is a PEFT adapter directory (or, in full-parameter
mode, a model directory) plus `optimizer/`, `rng.safetensors`, `trainer_state.json` and
`manifest.json` (size and sha256 of every file, written last).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save as save_safetensors
from tqdm import tqdm

from .checkpoint import resolve_model_dir, write_model_files
from .errors import EngineError
from .fsio import atomic_dir, atomic_file
from .lora import adapter_config_dict, load_adapter, lora_modules, read_adapter_config, write_adapter_files
from .train_config import TrainConfig

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
# Settings that must not change across a resume (they change what the run computes).
RESUME_INVARIANTS = ("loss", "model", "rollouts", "steps", "batch_size", "seed", "lora_r", "lora_alpha",
                     "lora_targets", "use_rslora", "full_finetune", "loss_hparams", "dpo_pairs", "rft_dedup")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(directory: Path, model, optimizer, cfg: TrainConfig, step: int) -> None:
    with atomic_dir(directory) as tmp:
        if cfg.full_finetune:
            write_model_files(model, tmp)
            src = resolve_model_dir(cfg.model)
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
        else:
            write_adapter_files(model, tmp, adapter_config_dict(model, base_name=cfg.model))
        optimizer.save(tmp / "optimizer")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        (tmp / "rng.safetensors").write_bytes(save_safetensors(rng))
        (tmp / STATE).write_text(json.dumps({"step": step, "config": cfg.to_dict()}, indent=2) + "\n")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=2) + "\n")


def verify(directory: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return "missing or unreadable manifest"
    for rel, meta in files.items():
        p = directory / rel
        if not p.is_file() or p.stat().st_size != meta["size"]:
            return f"{rel}: missing or wrong size"
        if _sha256(p) != meta["sha256"]:
            return f"{rel}: checksum mismatch"
    return None


def _step_dirs(out: Path) -> list[tuple[int, Path]]:
    found = []
    for p in out.glob("step-*"):
        if p.is_dir() and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    final = out / "final"
    if final.is_dir():
        try:
            found.append((json.loads((final / STATE).read_text())["step"], final))
        except (OSError, json.JSONDecodeError, KeyError):
            found.append((10 ** 12, final))  # torn: verify() will reject it
    return sorted(found, key=lambda t: t[0])


def has_checkpoints(out: Path) -> bool:
    return out.is_dir() and bool(_step_dirs(out))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint that verifies; torn ones are reported and passed over."""
    for _, path in reversed(_step_dirs(out)):
        problem = verify(path)
        if problem is None:
            return path
        tqdm.write(f"warning: checkpoint {path} is incomplete or corrupt ({problem}); using an earlier one")
    return None


def restore(directory: Path, model, optimizer, cfg: TrainConfig) -> int:
    """Load weights, optimizer state and RNG from a verified checkpoint; returns its step."""
    state = json.loads((directory / STATE).read_text())
    saved = state["config"]
    for key in RESUME_INVARIANTS:
        if saved.get(key) != cfg.to_dict().get(key):
            raise EngineError(f"cannot resume: '{key}' was {saved.get(key)!r} in this run, now "
                              f"{cfg.to_dict().get(key)!r}", path=directory / STATE, field=key)
    if cfg.full_finetune:
        params = {n: p for n, p in model.named_parameters()}
        fresh = load_file(str(directory / "model.safetensors"))
        with torch.no_grad():
            for name, t in fresh.items():
                params[name].copy_(t)
    else:
        adapter_cfg, _ = read_adapter_config(directory)
        if (adapter_cfg.r, adapter_cfg.alpha) != (cfg.lora_r, cfg.lora_alpha) or \
                set(adapter_cfg.target_modules) != set(cfg.lora_targets):
            raise EngineError(f"cannot resume: the checkpoint's adapter (r={adapter_cfg.r}, alpha="
                              f"{adapter_cfg.alpha}, targets={sorted(adapter_cfg.target_modules)}) differs "
                              f"from this run's", path=directory / "adapter_config.json")
        load_adapter(model, directory)
    optimizer.load(directory / "optimizer")
    try:
        rng = load_file(str(directory / "rng.safetensors"))
    except SafetensorError as e:
        raise EngineError(f"unreadable RNG state ({e})", path=directory / "rng.safetensors") from None
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"])


class OutputLock:
    """An exclusive lock on OUT/.lock: a second run pointed at the same directory refuses."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise EngineError("another run is writing to this output directory (locked)",
                              path=self.path.parent) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class MetricsLog:
    """JSONL metrics, one line per step. On resume, lines past the checkpoint's step are dropped
    (rewritten atomically) so the log reads as one uninterrupted run."""

    def __init__(self, path: Path, keep_until: int) -> None:
        self.path = path
        kept = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                if "step" in row and row["step"] > keep_until:
                    continue
                if keep_until == 0 and "event" not in row:
                    continue
                kept.append(line)
        with atomic_file(path) as f:
            f.write("".join(k + "\n" for k in kept))
        self.f = open(path, "a")

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()
