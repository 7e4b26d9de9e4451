"""LoRA adapters on linear layers, initialised and saved exactly as PEFT does.

A `LoRALinear` keeps the frozen base weight under its original name (so checkpoints still map) and
adds `lora_A` [r, in] and `lora_B` [out, r], kept in float32 whatever the base dtype (they are small,
and the optimizer updates them in place). Files: `adapter_config.json` + `adapter_model.safetensors`
with PEFT's keys, so PEFT and vLLM load our adapters and we load theirs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from triton_kernels.lora_linear import lora_projections

from engine.errors import EngineError, is_finite_number
from engine.fsio import atomic_dir
from engine.model.frozen import Linear, linear

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR_TARGETS = ATTENTION_TARGETS + ("gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass
class LoRAConfig:
    r: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ATTENTION_TARGETS
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = ALL_LINEAR_TARGETS if self.target_modules == "all-linear" else (
                tuple(t.strip() for t in self.target_modules.split(",")))
        self.target_modules = tuple(self.target_modules)
        bad = [t for t in self.target_modules if t not in ALL_LINEAR_TARGETS]
        if bad:
            raise EngineError(f"unknown LoRA target modules {bad}; choose from {list(ALL_LINEAR_TARGETS)}",
                              field="target_modules")
        if not (isinstance(self.r, int) and self.r > 0):
            raise EngineError(f"LoRA rank must be a positive integer, got {self.r!r}", field="r")


class LoRALinear(nn.Module):
    """y = x W^T + scale * (dropout(x) A^T) B^T, W frozen."""

    def __init__(self, base: nn.Linear, r: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=torch.float32))
        self.r, self.scale, self.dropout = r, scale, dropout
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return linear(x, self.weight)
        if self.dropout > 0 and self.training:
            a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
            return linear(x, self.weight) + self.scale * F.linear(
                F.linear(F.dropout(x, self.dropout, True), a), b)
        # The fused op (as for q/k/v); on CPU it saves the stored weight, never a cast copy of it.
        return lora_projections(x, (self.weight,), (self.lora_A,), (self.lora_B,), self.scale)[0]

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, [out, in] in float32."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Name (e.g. 'model.layers.0.self_attn.q_proj') -> LoRALinear, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _targets(model: nn.Module, target_modules: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rpartition(".")[2] in target_modules and n != "lm_head"]


def initial_lora_a(in_features: list[int], r: int, seed: int) -> list[torch.Tensor]:
    """The A factors `apply_lora` starts from, one per target module in model order (in_features[i] is
    module i's input size): one generator seeded with `seed`, Kaiming-uniform with a = sqrt(5) as PEFT,
    [r, in] float32 each. The analysis regenerates a run's initial A from its seed with this."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in in_features:
        a = torch.empty(r, n)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        out.append(a)
    return out


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> nn.Module:
    """Freeze the model and wrap every target linear in a LoRALinear, initialised as PEFT does
    (A Kaiming-uniform with a = sqrt(5), B zero) from `seed`, so every method starts identical."""
    if lora_modules(model):
        raise EngineError("model already has LoRA adapters")
    targets = _targets(model, cfg.target_modules)
    for name, linear in targets:  # checked before any allocation: an absurd rank fails here, not in torch
        if cfg.r > min(linear.in_features, linear.out_features):
            raise EngineError(f"LoRA rank {cfg.r} exceeds the smaller dimension "
                              f"({min(linear.in_features, linear.out_features)}) of {name}", field="r")
    for p in model.parameters():
        p.requires_grad_(False)
    for (name, linear), a in zip(targets, initial_lora_a([lin.in_features for _, lin in targets], cfg.r, seed)):
        module = LoRALinear(linear, cfg.r, cfg.scale, cfg.dropout)
        with torch.no_grad():
            module.lora_A.copy_(a)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, module)
    model.lora_config = cfg
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model (adapters off), e.g. for reference log-probs; no second copy in memory."""
    modules = list(lora_modules(model).values())
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, e in zip(modules, previous):
            m.enabled = e


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().contiguous().cpu()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float().contiguous().cpu()
    return state


def adapter_config_dict(model: nn.Module, base_name: str | None = None) -> dict:
    cfg: LoRAConfig = model.lora_config
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.target_modules), "bias": "none",
        "use_rslora": cfg.use_rslora, "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_name or getattr(model, "name_or_path", None),
    }


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_name: str | None = None) -> None:
    """Write a PEFT adapter directory atomically."""
    config = adapter_config_dict(model, base_name)
    with atomic_dir(out_dir) as tmp:
        write_adapter_files(model, tmp, config)


def write_adapter_files(model: nn.Module, directory: Path, config: dict | None = None) -> None:
    """Write the two PEFT files into an existing directory (callers make it atomic)."""
    if config is None:
        config = adapter_config_dict(model)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(adapter_state_dict(model), str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def read_adapter_config(adapter_dir: str | os.PathLike) -> tuple[LoRAConfig, dict]:
    """Parse and validate adapter_config.json; errors name the file and the field."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise EngineError("adapter_config.json not found", path=path)
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise EngineError(f"cannot read ({e.strerror})", path=path) from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits or levels
        raise EngineError(f"not valid JSON ({type(e).__name__}: {str(e)[:80]})", path=path,
                          line=getattr(e, "lineno", None)) from None
    if not isinstance(raw, dict):
        raise EngineError("expected a JSON object", path=path)

    def bad(field: str, expected: str) -> EngineError:
        shown = repr(raw.get(field))
        return EngineError(f"expected {expected}, got {shown if len(shown) <= 60 else shown[:57] + '...'}",
                           path=path, field=field)
    if raw.get("peft_type", "LORA") != "LORA":
        raise EngineError(f"peft_type {raw.get('peft_type')!r} is not LORA", path=path, field="peft_type")
    if raw.get("bias", "none") != "none":
        raise EngineError("only bias 'none' adapters are supported", path=path, field="bias")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in raw:
            raise EngineError("missing field", path=path, field=key)
    r, alpha = raw["r"], raw["lora_alpha"]
    dropout, rslora = raw.get("lora_dropout") or 0.0, raw.get("use_rslora", False)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise bad("r", "a positive integer")
    if not is_finite_number(alpha) or alpha <= 0:
        raise bad("lora_alpha", "a finite number > 0")
    if not is_finite_number(dropout) or not 0 <= dropout < 1:
        raise bad("lora_dropout", "a number in [0, 1)")
    if not isinstance(rslora, bool):
        raise bad("use_rslora", "true or false")
    targets = raw["target_modules"]
    if isinstance(targets, str):
        targets = ALL_LINEAR_TARGETS if targets == "all-linear" else [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise bad("target_modules", "a module name or a non-empty list of them")
    try:
        cfg = LoRAConfig(r=r, alpha=float(alpha), dropout=float(dropout), target_modules=tuple(targets),
                         use_rslora=rslora)
    except EngineError as e:
        raise EngineError(e.message, path=path, field=e.field) from None
    return cfg, raw


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Apply a PEFT LoRA adapter (ours or PEFT's) to `model`, unmerged."""
    adapter_dir = Path(adapter_dir)
    cfg, _ = read_adapter_config(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise EngineError("adapter_model.safetensors not found (only safetensors adapters are read)",
                          path=adapter_dir)
    if not lora_modules(model):
        try:
            apply_lora(model, cfg)
        except EngineError as e:  # the rank or targets came from this file
            raise EngineError(e.message, path=adapter_dir / "adapter_config.json", field=e.field) from None
    modules = lora_modules(model)
    seen = set()
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                name = key.removeprefix(PEFT_PREFIX)
                name = name.replace(".default.", ".")  # PEFT's in-memory adapter name, if present
                module_name, _, kind = name.rpartition(".lora_")
                if module_name not in modules or kind not in ("A.weight", "B.weight"):
                    raise EngineError(f"tensor {key!r} matches no LoRA module of this model", path=weights)
                m = modules[module_name]
                target = m.lora_A if kind == "A.weight" else m.lora_B
                t = sf.get_tensor(key)
                if not t.dtype.is_floating_point or not bool(torch.isfinite(t).all()):
                    raise EngineError(f"tensor {key!r} holds NaN or infinite values (or is not floating-point): "
                                      "a diverged or damaged adapter", path=weights)
                if tuple(t.shape) != tuple(target.shape):
                    raise EngineError(f"tensor {key!r} has shape {list(t.shape)}, expected {list(target.shape)} "
                                      f"(different rank or base model?)", path=weights)
                with torch.no_grad():
                    target.copy_(t)
                seen.add((module_name, kind))
    except SafetensorError as e:
        raise EngineError(f"corrupt or truncated safetensors file ({e})", path=weights) from None
    missing = [f"{n}.lora_{k}" for n in modules for k in ("A.weight", "B.weight") if (n, k) not in seen]
    if missing:
        raise EngineError(f"adapter lacks {len(missing)} tensors, e.g. {missing[0]}", path=weights)
    for m in modules.values():
        m.scale, m.dropout = cfg.scale, cfg.dropout
    model.lora_config = cfg
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scale B A) and drop the LoRA modules: one call
    for export (then `engine.save_model`)."""
    # A compacted (narrow-stored) base weight merges into the compute dtype: rounding the merged
    # weight back to bf16 would lose the adapter's small update.
    dtype = getattr(model, "dtype", None)
    for name, m in lora_modules(model).items():
        with torch.device("meta"):
            merged_linear = Linear(m.in_features, m.out_features)
        with torch.no_grad():
            merged = (m.weight.float() + m.delta_weight().to(m.weight.device)).to(dtype or m.weight.dtype)
        merged_linear.weight = nn.Parameter(merged, requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, merged_linear)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's HF state dict with any enabled adapters folded in, without changing the model."""
    modules = lora_modules(model)
    state = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        module_name, _, attr = name.rpartition(".")
        if attr.startswith("lora_"):
            continue
        if module_name in modules and attr == "weight" and modules[module_name].enabled:
            m = modules[module_name]
            p = (p.float() + m.delta_weight().to(p.device)).to(p.dtype)
        state[name] = p.detach()
    return state
