"""`--device` (or a config's `device`) read once, at the boundary: a malformed or unavailable device
is one EngineError naming the field, not a torch assertion from deep inside a model load."""
from __future__ import annotations

import torch

from engine.errors import EngineError

SUPPORTED = ("cpu", "cuda", "mps")


def resolve_device(spec: "str | torch.device | None", field: str = "device") -> torch.device | None:
    """`spec` as a torch.device this process can use (None stays None: the caller's default)."""
    if spec is None or isinstance(spec, torch.device) and spec.type == "cpu":
        return spec
    if not isinstance(spec, (str, torch.device)):
        raise EngineError(f"expected a device name such as cpu or cuda:0, got {spec!r}", field=field)
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise EngineError(f"not a device name: {str(spec)!r} (expected cpu, cuda or cuda:N)", field=field) from None
    if device.type not in SUPPORTED:
        raise EngineError(f"device type {device.type!r} is not supported (expected cpu, cuda or cuda:N)", field=field)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise EngineError(f"{spec!r} requested but no CUDA device is available here (use --device cpu)",
                              field=field)
        if device.index is not None and device.index >= count:
            raise EngineError(f"{spec!r} requested but only {count} CUDA device(s) exist", field=field)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise EngineError(f"{spec!r} requested but MPS is not available here", field=field)
    return device
