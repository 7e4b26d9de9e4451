"""Lazy, guarded Triton import and a launch-time `jit`.

Why not plain `@triton.jit`: it decides between the compiler and the CPU interpreter when the module
is imported, from `TRITON_INTERPRET`. In one pytest process another test file may import this package
before the kernel tests set `TRITON_INTERPRET=1`, so here the decision is made at launch time instead
(and cached per mode).

Why lazy: a CPU-only run never launches a kernel, and importing Triton costs ~70 MB of resident memory
(measured; part of the CPU training step's peak, BENCHMARKS.md) and start-up time. `triton` and `tl`
are stand-ins until something needs them (a launch, `available()`, an attribute). A missing or broken
Triton makes `available()` False; the torch paths still work.
"""
from __future__ import annotations

import contextlib
import functools
import os
import types
from typing import Any, Callable, Iterator

_loaded: dict[str, Any] = {}


def _load() -> dict[str, Any]:
    if not _loaded:
        try:  # a broken install can raise more than ImportError (e.g. a missing libcuda symbol)
            import triton as real
            import triton.language as real_language
            _loaded.update(triton=real, tl=real_language, error=None)
        except Exception as exc:  # noqa: BLE001
            _loaded.update(triton=None, tl=None, error=exc)
    return _loaded


def available() -> bool:
    """True when Triton imports (imports it, once)."""
    return _load()["triton"] is not None


def import_error() -> Exception | None:
    return _load()["error"]


class _LazyModule(types.ModuleType):
    """`triton` or `triton.language` until first use. Without Triton, `tl.<anything>` is `object` (so
    kernel annotations such as `tl.constexpr` still evaluate) and `triton.<anything>` raises."""

    def __init__(self, key: str) -> None:
        super().__init__(f"lazy {key}")
        self._key = key

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        module = _load()[self._key]
        if module is None:
            if self._key == "tl":
                return object
            raise AttributeError(f"Triton is not usable here: {import_error()!r}")
        return getattr(module, name)


triton = _LazyModule("triton")
tl = _LazyModule("tl")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`, read now)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


class LazyJit:
    """`kernel[grid](...)` like a `triton.jit` function; compiled or interpreted as the env says now.

    Kernels wrapped here must not call other jitted helpers (the interpreter and the compiler would
    need different helper objects); they inline their few shared lines instead.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._by_mode: dict[bool, Any] = {}

    def variant(self) -> Any:
        """The underlying `triton.jit` object for the current mode (compiler or interpreter)."""
        if not available():
            raise RuntimeError(f"Triton is not usable here: {import_error()!r}")
        mode = interpreting()
        if mode not in self._by_mode:
            # Triton's compiler resolves the kernel's globals: give it the real modules, not stand-ins.
            scope = self.fn.__globals__
            for name, value in list(scope.items()):
                if isinstance(value, _LazyModule):
                    scope[name] = _load()[value._key]
            # triton.jit reads TRITON_INTERPRET now, which is the mode we want.
            self._by_mode[mode] = _load()["triton"].jit(self.fn)
        return self._by_mode[mode]

    def __getitem__(self, grid: Any) -> Any:
        launcher = self.variant()[grid]
        if not interpreting():
            return launcher
        return functools.partial(_run_interpreted, launcher)


def _run_interpreted(launcher: Callable, *args: Any, **kwargs: Any) -> Any:
    with _language_helpers_interpretable(), _scalar_index_squeezed():
        return launcher(*args, **kwargs)


@contextlib.contextmanager
def _scalar_index_squeezed() -> Iterator[None]:
    """Triton before 3.7 reads a scalar's value in the interpreter as int(<array of shape (1,)>), which
    NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every loop
    over a runtime bound (`range(0, K, BLOCK_K)`) fails there. For the launch's duration scalars are
    indexed as Triton 3.7+ does (squeezed first); where the interpreter differs, nothing is changed."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        yield
        return

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    try:
        yield
    finally:
        interpreter._patch_lang_tensor = original


@contextlib.contextmanager
def _language_helpers_interpretable() -> Iterator[None]:
    """Let interpreted kernels call triton.language's own jitted helpers (tl.sum, tl.max, tl.cdiv).

    Those helpers were built when triton was imported; if TRITON_INTERPRET was unset then, they are
    compiler objects that refuse direct calls, which is what the interpreter makes. For the launch's
    duration such calls go through an `InterpretedFunction` of the same Python function instead.
    Only the interpreter (tests on CPU) takes this path.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__

    def call_interpreted(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.fn not in _INTERPRETED_HELPERS:
            _INTERPRETED_HELPERS[self.fn] = InterpretedFunction(self.fn)
        return _INTERPRETED_HELPERS[self.fn](*args, **kwargs)

    JITFunction.__call__ = call_interpreted
    try:
        yield
    finally:
        JITFunction.__call__ = original


_INTERPRETED_HELPERS: dict[Callable, Any] = {}


def jit(fn: Callable) -> LazyJit:
    """Decorator: a Triton kernel chosen at launch (see module docstring)."""
    return LazyJit(fn)


def dot_precision(dtype: "Any") -> str:
    """`tl.dot` precision: exact float32 ('ieee') for float32 operands, tensor-core default otherwise."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): `tl.arange`/`tl.dot` need power-of-two extents >= 16."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())
