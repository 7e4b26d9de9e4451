"""Which implementation runs: Triton on CUDA tensors, the plain-torch reference elsewhere.

`ENGINE_KERNELS=triton|torch|auto` (read at every call, so tests can monkeypatch it) forces one side.
With `TRITON_INTERPRET=1` the Triton path also runs on CPU tensors, in Triton's interpreter.
`ENGINE_KERNELS_POISON=1` makes the Triton wrappers fill their outputs with NaN before launching, so a
test fails if a kernel leaves any element unwritten.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from engine.errors import EngineError
from triton_kernels import _triton

ENV_BACKEND = "ENGINE_KERNELS"
ENV_POISON = "ENGINE_KERNELS_POISON"
BACKENDS = ("auto", "triton", "torch")


def requested_backend() -> str:
    """The value of ENGINE_KERNELS ('auto' when unset); anything else is an input error."""
    value = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise EngineError(f"expected one of {', '.join(BACKENDS)}, got {value!r}", field=ENV_BACKEND)
    return value


def triton_available() -> bool:
    return _triton.available()


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run for these tensors (see module docstring)."""
    backend = requested_backend()
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise EngineError(f"Triton cannot be imported ({_triton.import_error()!r}); "
                          f"set {ENV_BACKEND}=torch", field=ENV_BACKEND)
    if not on_cuda and not _triton.interpreting():
        raise EngineError(f"{ENV_BACKEND}=triton needs CUDA tensors (or TRITON_INTERPRET=1 to run "
                          "Triton's interpreter on CPU)", field=ENV_BACKEND)
    return True


def poisoning() -> bool:
    """True when ENGINE_KERNELS_POISON=1: Triton outputs start as NaN (tests)."""
    return os.environ.get(ENV_POISON, "0") == "1"


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output buffer; NaN-filled when ENGINE_KERNELS_POISON=1 (tests)."""
    if poisoning():
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)
