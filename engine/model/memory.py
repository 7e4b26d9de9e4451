"""CPU memory of a loaded model: glibc allocator tuning and lossless compaction of frozen weights.

Both were measured (BENCHMARKS.md): the allocator settings trade page faults for a lower resident peak
in lean (activation-checkpointing) mode, and compaction keeps a bf16 checkpoint's frozen matrices at
2 bytes each under float32 compute with bit-identical results.
"""
from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from engine.model.frozen import stays_narrow


# glibc's mallopt(M_MMAP_THRESHOLD) / (M_TRIM_THRESHOLD), fixed at 256 KiB in lean mode (activation
# checkpointing): allocations from there up are mapped and unmapped one by one, so freed activations
# leave the resident set at once instead of staying in glibc's heap, which otherwise serves tensors up
# to 32 MiB once its adaptive threshold has risen and does not shrink. The step's peak resident memory
# then follows its live tensors, at the cost of the page faults of fresh mappings (measured +6-13% of a
# CPU step with a 1-2 MiB threshold, BENCHMARKS.md): worth it only when memory comes first.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _LEAN_MMAP_BYTES = -1, -3, 256 * 1024


@functools.cache
def lean_cpu_allocator() -> bool:
    """Make freed CPU tensors go back to the OS at once (glibc only; False elsewhere). Once per process."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _LEAN_MMAP_BYTES)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, _LEAN_MMAP_BYTES))
    except (OSError, AttributeError):
        return False


def release_cpu_heap() -> bool:
    """Hand the free pages of glibc's heap back to the OS (malloc_trim): after building or loading a
    model, whose float32 temporaries leave holes that a step's tensors would not all reuse (measured:
    0.05-0.15 GiB off a Qwen3-0.6B CPU step's peak). False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def compacted_bytes(model: nn.Module) -> int:
    """Bytes the narrow-stored matrices save against storing them in the model's compute dtype (`model.dtype`)."""
    tensors = {id(p): p for p in model.parameters() if p.dtype != model.dtype and p.is_floating_point()}
    return sum(p.numel() * (model.dtype.itemsize - p.element_size()) for p in tensors.values())


def compact_frozen_weights(model: nn.Module, storage: torch.dtype = torch.bfloat16) -> int:
    """Store every frozen matrix (projections, embedding, LM head) whose values `storage` holds
    exactly in `storage`; return the bytes freed. Lossless by construction: a bf16 checkpoint loaded
    for float32 compute on CPU keeps its weights at 2 bytes each and every product stays float32
    (the weight is cast per GEMM, `frozen.linear`), with bit-identical results. Weights that are not
    exactly representable (an fp32-trained model), trainable ones and 1-D ones stay as they are."""
    groups: dict[int, list[str]] = {}  # one entry per tensor; tied names share it
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.endswith(".weight") and p.dim() == 2 and not p.requires_grad:
            groups.setdefault(id(p), []).append(name)
    freed = 0
    for names in groups.values():  # names only: each old tensor is freed as soon as it is replaced
        w = model.get_parameter(names[0])
        if not stays_narrow(storage, w.dim(), w.dtype):
            continue
        with torch.no_grad():
            narrow = w.to(storage)
            if not torch.equal(narrow.to(w.dtype), w):
                continue
        param = nn.Parameter(narrow, requires_grad=False)
        for name in names:
            module, _, attr = name.rpartition(".")
            model.get_submodule(module)._parameters[attr] = param
        freed += w.numel() * (w.element_size() - narrow.element_size())
        del w
    return freed
