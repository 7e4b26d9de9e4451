"""Training configuration: defaults, TOML presets (configs/*.toml), and command-line overrides."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from engine.devices import resolve_device
from engine.errors import EngineError
from engine.train.settings import check_loss_names, record_origin, toml_lines

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_MODEL = REPO_ROOT / "embedded" / "base"
EMBEDDED_ROLLOUTS = REPO_ROOT / "embedded" / "rollouts.jsonl"


@dataclasses.dataclass
class TrainConfig:
    loss: str = "grpo"
    model: str = str(EMBEDDED_MODEL)
    rollouts: str = str(EMBEDDED_ROLLOUTS)
    out: str = "runs/default"
    steps: int = 60
    lr: float = 2e-3
    lr_per_loss: dict[str, float] = dataclasses.field(default_factory=dict)
    batch_size: int = 32            # rollouts per optimizer step (DPO: pairs per step)
    micro_batch_size: int = 32      # most rows per forward/backward (cut further by length); one step normaliser
    max_len: int = 512
    seed: int = 42
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_rslora: bool = False
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    adam_betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    save_every: int = 0             # 0: only the `checkpoint_steps` and the final adapter
    checkpoint_steps: list[int] = dataclasses.field(default_factory=list)
    loss_hparams: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    dpo_pairs: str = "one"          # "one" pair per mixed group (seeded) or "all"
    rft_dedup: bool = False
    on_bad: str = "fail"            # bad rollout lines: "fail" or "skip" (counted and printed)
    gradient_checkpointing: bool = False
    full_finetune: bool = False     # train every weight (how the embedded base model is built)
    enable_thinking: bool | None = None
    dtype: str | None = None
    device: str | None = None
    ref_cache: str | None = None    # where cached reference log-probs live (default: beside the output)
    fsdp: bool = False              # under torchrun: shard the frozen base with FSDP2 (LoRA stays replicated)
    allow_changes: list[str] = dataclasses.field(default_factory=list)  # settings a --resume may change

    def lr_for(self, loss: str) -> float:
        return float(self.lr_per_loss.get(loss, self.lr))

    def hparams_for(self, loss: str) -> dict[str, Any]:
        return dict(self.loss_hparams.get(loss, {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Allowed values beyond the type: (test, what is expected). Counts are capped so that a typo like
# steps = 1e12 fails here rather than hanging the step planner.
_MAX_COUNT = 2 ** 31 - 1
_POSITIVE = (lambda v: 0 < v <= _MAX_COUNT, f"an integer in [1, {_MAX_COUNT}]")
_RULES: dict[str, tuple[Any, str]] = {
    "steps": _POSITIVE, "batch_size": _POSITIVE, "micro_batch_size": _POSITIVE, "lora_r": _POSITIVE,
    "max_len": (lambda v: 2 <= v <= _MAX_COUNT, "an integer >= 2"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2^32)"),
    "save_every": (lambda v: 0 <= v <= _MAX_COUNT, "an integer >= 0"),
    "lr": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "lr_per_loss": (lambda d: all(0 < v < math.inf for v in d.values()), "finite learning rates > 0"),
    "lora_alpha": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "lora_targets": (lambda v: len(v) > 0, "a non-empty list of module names"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "grad_clip": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "adam_betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "adam_eps": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "checkpoint_steps": (lambda v: all(0 < x <= _MAX_COUNT for x in v), "a list of steps >= 1"),
    "dpo_pairs": (lambda v: v in ("one", "all"), "'one' or 'all'"),
    "on_bad": (lambda v: v in ("fail", "skip"), "'fail' or 'skip'"),
    "dtype": (lambda v: v is None or v in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
    "model": (lambda v: v != "", "a non-empty path"), "rollouts": (lambda v: v != "", "a non-empty path"),
    "out": (lambda v: v != "", "a non-empty path"),
    "allow_changes": (lambda v: all(k in _FIELDS or k == "rollouts_content" for k in v),
                      "setting names (or rollouts_content)"),
}
_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def _type_ok(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_type_ok(k, args[0]) and _type_ok(v, args[1])
                                               for k, v in value.items())
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        try:
            float(value)
        except OverflowError:
            return False
        return True
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str) and "\x00" not in value
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is None and hasattr(hint, "__name__"):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _as_hint(value: Any, hint: Any) -> Any:
    """Ints given for float settings become floats (also inside lists and dicts)."""
    if hint is float or typing.get_args(hint) == (float,):
        return [float(v) for v in value] if isinstance(value, list) else float(value)
    if typing.get_origin(hint) is dict and typing.get_args(hint)[1] is float:
        return {k: float(v) for k, v in value.items()}
    return value


def _check(name: str, value: Any, hint: Any, fail) -> Any:
    if not _type_ok(value, hint):
        text = repr(value)
        raise fail(f"expected {_describe(hint)}, got {text if len(text) <= 60 else text[:57] + '...'}")
    value = _as_hint(value, hint)
    rule = _RULES.get(name)
    if rule is not None and value is not None and not rule[0](value):
        raise fail(f"expected {rule[1]}, got {value!r}")
    return value


def _key_line(text: str | None, key: str) -> int | None:
    """The line of a top-level key in TOML `text`: `key = ...`, `key.sub = ...` outside any table,
    or a `[key]` / `[key.sub]` table header. Best effort (None when not found)."""
    for number, table, head in toml_lines(text):
        if head is None and (table == key or table.startswith(key + ".")):
            return number
        if head is not None and table is None and (head == key or head.startswith(key + ".")):
            return number
    return None


def apply_overrides(cfg: TrainConfig, values: dict[str, Any], path: Path | None = None,
                    text: str | None = None) -> TrainConfig:
    """Set `values` on `cfg`, checking names, types and ranges; errors name the file (`path`),
    the line of the key in `text` (the file's content) and the field."""
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        def fail(message: str, key: str = key) -> EngineError:
            return EngineError(message, path=path, line=_key_line(text, key), field=key)
        if key not in fields:
            raise fail(f"unknown setting; valid: {', '.join(sorted(fields))}")
        setattr(cfg, key, _check(key, value, hints[key], fail))
        record_origin(cfg, key, path, _key_line(text, key) if path is not None else None)
    return cfg


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    """Defaults <- TOML file (top-level keys are TrainConfig fields) <- overrides (None = not given).

    Relative `model` / `rollouts` paths in a TOML file are resolved against the repository root when
    they exist there, so presets work from any working directory. Bad files or values raise
    EngineError naming the file, the line and the field."""
    cfg, text = TrainConfig(), None
    if path is not None:
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise EngineError("config file not found", path=path) from None
        except OSError as e:
            raise EngineError(f"cannot read the config file ({e.strerror})", path=path) from None
        except UnicodeDecodeError as e:
            line = path.read_bytes()[:e.start].count(b"\n") + 1
            raise EngineError(f"not UTF-8 text ({e.reason})", path=path, line=line) from None
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            found = re.search(r"at line (\d+)", str(e))
            line = getattr(e, "lineno", None) or (int(found.group(1)) if found else None)
            if line is None and "end of document" in str(e):
                line = text.count("\n") + 1  # the error is at the last line
            raise EngineError(f"not valid TOML ({e})", path=path, line=line) from None
        except RecursionError:
            raise EngineError("not valid TOML (nested too deeply)", path=path) from None
        for key in ("model", "rollouts"):
            value = values.get(key)
            if isinstance(value, str) and value and "\x00" not in value and not Path(value).is_absolute() \
                    and (REPO_ROOT / value).exists():
                values[key] = str(REPO_ROOT / value)
        apply_overrides(cfg, values, path, text)
    apply_overrides(cfg, {k: v for k, v in overrides.items() if v is not None})
    check_loss_names(cfg, text)
    try:  # the device that will be used, whichever of file or flag named it
        resolve_device(cfg.device)
    except EngineError as e:
        flag = overrides.get("device") is not None
        raise EngineError(e.message, path=None if flag else path, line=None if flag else _key_line(text, "device"),
                          field="--device" if flag else "device") from None
    return cfg
