"""Qwen3 architecture config, read from a Hugging Face `config.json`."""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.jsonread import read_json

QWEN3_ARCHITECTURES = ("Qwen3ForCausalLM",)


@dataclasses.dataclass
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 151645
    torch_dtype: str | None = None
    # Everything else in config.json is kept so that save_model writes it back unchanged.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def q_out(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str | os.PathLike | None = None) -> "Qwen3Config":
        def fail(msg: str, field: str | None = None) -> EngineError:
            return EngineError(msg, path=source, field=field)

        if not isinstance(d, dict):
            raise fail("expected a JSON object")
        archs = d.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise fail(f"expected a list of class names, got {str(archs)[:60]!r}", "architectures")
        model_type = d.get("model_type")
        if model_type != "qwen3" or (archs and not set(archs) & set(QWEN3_ARCHITECTURES)):
            raise fail(f"not a Qwen3 checkpoint: model_type={model_type!r}, architectures={archs!r} "
                       f"(expected model_type 'qwen3' and {list(QWEN3_ARCHITECTURES)})", "model_type")
        d = dict(d)
        # Newer configs move rope_theta into rope_parameters (and older ones into rope_scaling).
        rope_params = d.get("rope_parameters") or {}
        if "rope_theta" not in d and isinstance(rope_params, dict) and "rope_theta" in rope_params:
            d["rope_theta"] = rope_params["rope_theta"]
        for params in (rope_params, d.get("rope_scaling") or {}):
            if isinstance(params, dict) and params.get("rope_type", "default") not in ("default", None):
                raise fail(f"rope type {params['rope_type']!r} is not supported (only the default RoPE)",
                           "rope_parameters")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        for key in required:
            if key not in d:
                raise fail("missing required field", key)
        d.setdefault("num_key_value_heads", d["num_attention_heads"])
        if d.get("head_dim") is None:
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: d[k] for k in names if k in d}
        extra = {k: v for k, v in d.items() if k not in names}
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim"):
            v = kwargs.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise fail(f"expected a positive integer, got {v!r}", key)
        def token_ids(v: Any) -> bool:
            ids = v if isinstance(v, list) else [v]
            return all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        for key, ok, expected in (("tie_word_embeddings", lambda v: isinstance(v, bool), "true or false"),
                                  ("bos_token_id", lambda v: v is None or token_ids(v), "a token id or null"),
                                  ("eos_token_id", lambda v: v is None or token_ids(v),
                                   "a token id, a list of them or null"),
                                  ("torch_dtype", lambda v: v is None or isinstance(v, str), "a dtype name or null"),
                                  ("max_position_embeddings", lambda v: token_ids(v) and v > 0, "a positive integer")):
            if key in kwargs and not ok(kwargs[key]):
                raise fail(f"expected {expected}, got {str(kwargs[key])[:60]!r}", key)
        if kwargs["num_attention_heads"] % kwargs["num_key_value_heads"]:
            raise fail("num_attention_heads must be a multiple of num_key_value_heads", "num_key_value_heads")
        if kwargs["head_dim"] % 2:
            raise fail("head_dim must be even for RoPE", "head_dim")
        for key in ("rms_norm_eps", "rope_theta"):
            if key in kwargs:
                try:
                    kwargs[key] = float(kwargs[key])
                except (TypeError, ValueError):
                    raise fail(f"expected a number, got {kwargs[key]!r}", key) from None
                if not math.isfinite(kwargs[key]) or kwargs[key] <= 0:
                    raise fail(f"expected a positive number, got {kwargs[key]!r}", key)
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Qwen3Config":
        path = Path(path)
        if not path.is_file():
            raise EngineError("config.json not found", path=path)
        return cls.from_dict(read_json(path, "config.json"), source=path)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        d.setdefault("architectures", list(QWEN3_ARCHITECTURES))
        d.setdefault("model_type", "qwen3")
        return d
