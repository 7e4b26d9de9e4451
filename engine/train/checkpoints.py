"""Training checkpoints: written atomically with a manifest, verified on resume, one writer per
output directory.

A checkpoint `OUT/step-N/` (and `OUT/final/`) is a PEFT adapter directory (or, in full-parameter
mode, a model directory) plus `optimizer/`, `rng.safetensors`, `trainer_state.json` and
`manifest.json` (size and sha256 of every file, written last).

Crash safety: a checkpoint is written into a temporary sibling, fsynced, then renamed (engine.fsio),
so a kill -9 leaves either no checkpoint or a complete one (plus a stale temp dir that `recover`
removes under the lock); a torn or tampered one fails `verify` and resume falls back to the
previous one with a warning. A failed write (disk full, permission denied) raises one EngineError
and leaves the previous checkpoints as they were.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save as save_safetensors
from tqdm import tqdm

from engine.model.weights import resolve_model_dir, write_model_files
from engine.errors import EngineError
from engine.fsio import atomic_dir, atomic_file, jsonl_lines
from engine.outputs import claim
from engine.train.settings import check_resume, content_hash
from engine.model.lora import adapter_config_dict, load_adapter, read_adapter_config, write_adapter_files
from engine.train.train_config import TrainConfig

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


FAULT_ENV = "ENGINE_TEST_FAULT"


def _test_fault(point: str, step: int) -> None:
    """Test-only fault injection (tests/test_faults.py); inert unless ENGINE_TEST_FAULT is set.
    "kill:save-mid:4" SIGKILLs this process while step 4's checkpoint is half written (adapter and
    optimizer files in the temp dir, no RNG/state/manifest yet); "kill:save-done:2" right after step
    2's checkpoint is renamed into place; "pause:<point>:<step>" sleeps there for a minute instead
    (holding the output lock), for the two-writers test."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, where, at = spec.split(":")
    if where == point and int(at) == step:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "pause":
            time.sleep(60)


def save(directory: Path, model, optimizer, cfg: TrainConfig, step: int) -> None:
    """Write a checkpoint atomically; a failed write raises EngineError and changes nothing."""
    claim(directory, "checkpoint")  # a user's own `final/` in --out is not replaced
    try:
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
            _test_fault("save-mid", step)
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            (tmp / "rng.safetensors").write_bytes(save_safetensors(rng))
            (tmp / STATE).write_text(json.dumps({"step": step, "config": cfg.to_dict(),
                                                 "rollouts_sha256": content_hash(cfg.rollouts)}, indent=2) + "\n")
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
            (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=2) + "\n")
    except (OSError, SafetensorError) as e:
        what = f"{e.strerror} ({e.filename})" if isinstance(e, OSError) and e.strerror else str(e)
        raise EngineError(f"could not write the step-{step} checkpoint: {what}; nothing was changed, "
                          "the previous checkpoint is kept", path=directory) from None
    _test_fault("save-done", step)


def verify(directory: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong. Names in the manifest
    must stay inside the checkpoint directory (a tampered '../x' entry is reported, never read)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
        entries = [(rel, int(meta["size"]), str(meta["sha256"])) for rel, meta in files.items()]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return "missing or unreadable manifest"
    if not entries:
        return "empty manifest"
    for rel, size, digest in entries:
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            return f"{rel!r}: a manifest entry outside the checkpoint directory"
        p = directory / rel
        if p.is_symlink() or not p.is_file() or p.stat().st_size != size:
            return f"{rel}: missing or wrong size"
        if _sha256(p) != digest:
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
            step = json.loads((final / STATE).read_text())["step"]
            found.append((step if isinstance(step, int) else 10 ** 12, final))
        except (OSError, ValueError, KeyError, TypeError):
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


def recover(out: Path) -> None:
    """Tidy what a kill -9 can leave behind in `out` (call with the output lock held): temp dirs and
    files of interrupted atomic writes are removed, and a checkpoint moved aside for replacement
    (`.final.old`) whose replacement never arrived is moved back."""
    if not out.is_dir():
        return
    ours = (".step-", ".final.", ".metrics.jsonl.")  # only names this package's writers create
    for p in out.iterdir():
        if not p.name.startswith(ours):
            continue
        if p.name.endswith(".old") and p.is_dir():
            original = out / p.name[1:-4]
            if original.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, original)
        elif p.name.endswith(".tmp"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def restore(directory: Path, model, optimizer, cfg: TrainConfig) -> int:
    """Load weights, optimizer state and RNG from a verified checkpoint; returns its step."""
    try:
        state = json.loads((directory / STATE).read_text())
        saved, step = state["config"], state["step"]
        if not isinstance(saved, dict) or not isinstance(step, int) or isinstance(step, bool):
            raise TypeError("config must be an object and step an integer")
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as e:
        raise EngineError(f"unreadable trainer state ({e})", path=directory / STATE) from None
    for key in RESUME_INVARIANTS:
        if saved.get(key) != cfg.to_dict().get(key) and key not in cfg.allow_changes:
            raise EngineError(f"cannot resume: '{key}' was {saved.get(key)!r} in this run, now "
                              f"{cfg.to_dict().get(key)!r}", path=directory / STATE, field=key)
    check_resume(state, cfg, directory / STATE)  # every other setting that changes the run, and the data
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
    return step


class OutputLock:
    """An exclusive lock on OUT/.lock: a second run pointed at the same directory refuses."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise EngineError(f"cannot create the output lock ({e.strerror})", path=self.path.parent) from None
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
        try:
            self._open(keep_until)
        except OSError as e:
            raise EngineError(f"cannot write the metrics log ({e.strerror})", path=path) from None

    def _open(self, keep_until: int) -> None:
        path = claim(self.path, "train-metrics")  # not someone else's file of that name
        kept = []
        if path.is_file():
            for _, line in jsonl_lines(path.read_text(encoding="utf-8", errors="replace")):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                if not isinstance(row, dict):
                    continue
                if "step" in row and row["step"] > keep_until:
                    continue
                if keep_until == 0 and "event" not in row:
                    continue
                kept.append(line)
        with atomic_file(path) as f:
            f.write("".join(k + "\n" for k in kept))
        self.f = open(path, "a")

    def write(self, row: dict) -> None:
        try:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()
        except OSError as e:
            raise EngineError(f"cannot write the metrics log ({e.strerror})", path=self.path) from None

    def close(self) -> None:
        self.f.close()
