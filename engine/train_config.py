"""Training configuration: defaults, TOML presets (configs/*.toml), and command-line overrides."""
from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from pathlib import Path
from typing import Any

from .errors import EngineError

REPO_ROOT = Path(__file__).resolve().parents[1]
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
    micro_batch_size: int = 32      # rows per forward/backward; the step normaliser spans all of them
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

    def lr_for(self, loss: str) -> float:
        return float(self.lr_per_loss.get(loss, self.lr))

    def hparams_for(self, loss: str) -> dict[str, Any]:
        return dict(self.loss_hparams.get(loss, {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(name: str, value: Any, hint: Any, path: Path | None) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if origin is list:
        ok = isinstance(value, list)
    elif origin is dict:
        ok = isinstance(value, dict)
    if not ok:
        want = getattr(hint, "__name__", str(hint))
        raise EngineError(f"expected {want}, got {value!r}", path=path, field=name)
    return float(value) if hint is float else value


def apply_overrides(cfg: TrainConfig, values: dict[str, Any], path: Path | None = None) -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        if key not in fields:
            raise EngineError(f"unknown setting; valid: {', '.join(sorted(fields))}", path=path, field=key)
        setattr(cfg, key, _check_type(key, value, hints[key], path))
    return cfg


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    """Defaults <- TOML file (top-level keys are TrainConfig fields) <- overrides (None = not given).

    Relative `model` / `rollouts` paths in a TOML file are resolved against the repository root when
    they exist there, so presets work from any working directory."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise EngineError("config file not found", path=path)
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise EngineError(f"not valid TOML ({e})", path=path) from None
        for key in ("model", "rollouts"):
            if isinstance(values.get(key), str) and (REPO_ROOT / values[key]).exists() \
                    and not Path(values[key]).is_absolute():
                values[key] = str(REPO_ROOT / values[key])
        apply_overrides(cfg, values, path)
    apply_overrides(cfg, {k: v for k, v in overrides.items() if v is not None})
    return cfg
