"""Kernel profiler: each Triton kernel against its torch reference at Qwen3 attention shapes.

`profile_kernels(...)` returns rows (dicts); `print_profile(rows)` prints them as a table. Each row has
the median time over `reps` timed runs after `warmup` runs (CUDA events; the L2 cache is flushed
before every run), the achieved TFLOP/s and GB/s over the fewest bytes the operation must move, and
`of_floor`: the floor time (max of flops / measured GEMM peak, bytes / measured copy bandwidth, both
measured in the same run) over the measured time, i.e. the fraction of speed-of-light reached.
On CPU only the torch paths run, at reduced sizes; Triton needs CUDA. `python -m triton_kernels.profile`.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Iterator, Sequence, TextIO

import torch

from triton_kernels.adamw import adamw_step_
from triton_kernels.linear_logprob import linear_logprob
from triton_kernels.lora_linear import lora_linear
from triton_kernels.qk_norm_rope import qk_norm_rope
from triton_kernels.lora_linear import qkv_proj

# Attention sizes from data/qwen3-configs (hidden, heads, kv heads, head_dim, vocab, layers).
QWEN3_SHAPES = [
    {"model": "Qwen3-0.6B", "hidden": 1024, "heads": 16, "kv_heads": 8, "head_dim": 128, "vocab": 151936, "layers": 28},
    {"model": "Qwen3-1.7B", "hidden": 2048, "heads": 16, "kv_heads": 8, "head_dim": 128, "vocab": 151936, "layers": 28},
    {"model": "Qwen3-4B", "hidden": 2560, "heads": 32, "kv_heads": 8, "head_dim": 128, "vocab": 151936, "layers": 36},
]
GPU_TOKENS = (2048, 4096, 8192, 16384)
CPU_TOKENS = (256,)  # and only the first shape, one warm-up, three timed runs
CPU_VOCAB = 16384  # the CPU run cuts the vocabulary so the log-prob rows finish in seconds
COLUMNS = ("kernel", "model", "tokens", "impl", "pass", "ms", "tflops", "gbps", "of_floor", "note")


@contextlib.contextmanager
def _backend(name: str) -> Iterator[None]:
    old = os.environ.get("ENGINE_KERNELS")
    os.environ["ENGINE_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ENGINE_KERNELS", None)
        else:
            os.environ["ENGINE_KERNELS"] = old


def _time_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() over reps runs, after warmup runs."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)  # larger than any L2
        for _ in range(reps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_ceilings(device: torch.device, warmup: int = 3, reps: int = 10) -> dict:
    """Measured peaks: a square GEMM (TFLOP/s, in the run's dtype) and a large copy (GB/s, read+write)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    gemm_ms = _time_ms(lambda: torch.mm(a, b), device, warmup, reps)
    elems = (2**30 if device.type == "cuda" else 2**26) // 4
    src, dst = torch.randn(elems, device=device), torch.empty(elems, device=device)
    copy_ms = _time_ms(lambda: dst.copy_(src), device, warmup, reps)
    return {"tflops": 2 * n**3 / gemm_ms / 1e9, "gbps": 2 * elems * 4 / copy_ms / 1e6}


def _fwd_bwd(forward: Callable[[], object], inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
    """A closure running forward and the backward to `inputs` with fixed random upstream grads."""
    as_tuple = lambda out: out if isinstance(out, tuple) else (out,)  # noqa: E731
    grads = [torch.randn_like(o) for o in as_tuple(forward())]
    return lambda: torch.autograd.grad(as_tuple(forward()), inputs, grads)


def _cases(shape: dict, tokens: int, rank: int, device: torch.device, dtype: torch.dtype) -> Iterator[tuple]:
    """(kernel, pass, fn, flops, bytes moved at the least) for one model shape and token count."""
    es = torch.tensor([], dtype=dtype).element_size()

    def rnd(*size: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*size, device=device, dtype=dtype).div_(size[-1] ** 0.5).requires_grad_(grad)

    H, D = shape["hidden"], shape["head_dim"]
    nq, nkv = shape["heads"] * D, shape["kv_heads"] * D
    M = tokens

    # o_proj: [M, nq] -> [M, H]
    x, w, a, b = rnd(M, nq, grad=True), rnd(H, nq), rnd(rank, nq, grad=True), rnd(H, rank, grad=True)
    fwd = lambda: lora_linear(x, w, a, b, 2.0)  # noqa: E731
    flops = 2 * M * (nq * H + rank * (nq + H))
    moved = es * (M * nq + H * nq + M * H + rank * (nq + H))
    yield "lora_linear(o_proj)", "fwd", fwd, flops, moved
    yield "lora_linear(o_proj)", "fwd+bwd", _fwd_bwd(fwd, [x, a, b]), 3 * flops, 3 * moved

    # fused q/k/v: [M, H] -> [M, nq], [M, nkv], [M, nkv]
    outs = (nq, nkv, nkv)
    xq = rnd(M, H, grad=True)
    ws = [rnd(n, H) for n in outs]
    as_ = [rnd(rank, H, grad=True) for _ in outs]
    bs = [rnd(n, rank, grad=True) for n in outs]
    fwd_qkv = lambda: qkv_proj(xq, ws, as_, bs, 2.0)  # noqa: E731
    n_out = sum(outs)
    flops = 2 * M * (n_out * H + rank * (3 * H + n_out))
    moved = es * (M * H + n_out * H + M * n_out)
    yield "qkv_proj", "fwd", fwd_qkv, flops, moved
    yield "qkv_proj", "fwd+bwd", _fwd_bwd(fwd_qkv, [xq, *as_, *bs]), 3 * flops, 3 * moved

    # per-head RMSNorm + RoPE on q and k; batch of 1 x M tokens
    q = torch.randn(1, M, shape["heads"], D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, M, shape["kv_heads"], D, device=device, dtype=dtype, requires_grad=True)
    wq, wk = (torch.randn(D, device=device).mul_(0.1).add_(1).requires_grad_() for _ in range(2))
    ang = torch.randn(M, D, device=device)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    fwd_nr = lambda: qk_norm_rope(q, k, wq, wk, cos, sin, 1e-6)  # noqa: E731
    qk_bytes = es * M * (nq + nkv)
    yield "qk_norm_rope", "fwd", fwd_nr, 10 * M * (nq + nkv), 2 * qk_bytes + 2 * es * M * D
    yield "qk_norm_rope", "fwd+bwd", _fwd_bwd(fwd_nr, [q, k, wq, wk]), 30 * M * (nq + nkv), \
        5 * qk_bytes + 4 * es * M * D

    # log-prob through the LM head
    V = shape["vocab"]
    hid, head = rnd(M, H, grad=True), rnd(V, H)
    tgt = torch.randint(0, V, (M,), device=device)
    fwd_lp = lambda: linear_logprob(hid, head, tgt)  # noqa: E731
    yield "linear_logprob", "fwd", fwd_lp, 2 * M * V * H, es * (M * H + V * H)
    yield "linear_logprob", "fwd+bwd", _fwd_bwd(fwd_lp, [hid]), 6 * M * V * H, es * (2 * M * H + 2 * V * H)


def _adamw_case(shape: dict, rank: int, device: torch.device) -> tuple:
    """AdamW over every LoRA parameter of the model (q, k, v, o in every layer), as one flat buffer."""
    H, D = shape["hidden"], shape["head_dim"]
    nq, nkv = shape["heads"] * D, shape["kv_heads"] * D
    n = shape["layers"] * rank * ((H + nq) * 2 + (H + nkv) * 2)
    # param, grad, exp_avg, exp_avg_sq: random (never time on zeros), the second moment positive
    bufs = [torch.randn(n, device=device) for _ in range(3)] + [torch.rand(n, device=device)]

    def step() -> None:
        adamw_step_(*bufs, lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=5)
    return step, 10 * n, 28 * n, n


def profile_kernels(shapes: Sequence[dict] | None = None, device: str | torch.device | None = None,
                    tokens: Sequence[int] | None = None, rank: int = 32, warmup: int | None = None,
                    reps: int | None = None) -> list[dict]:
    """Rows of timings for every kernel, both implementations (Triton only on CUDA), fwd and fwd+bwd.

    shapes: dicts like QWEN3_SHAPES' (default: all three on CUDA, the 0.6B on CPU).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    shapes = list(shapes or (QWEN3_SHAPES if on_gpu else QWEN3_SHAPES[:1]))
    tokens = tuple(tokens or (GPU_TOKENS if on_gpu else CPU_TOKENS))
    warmup = (3 if on_gpu else 1) if warmup is None else warmup
    reps = (10 if on_gpu else 3) if reps is None else reps
    dtype = torch.bfloat16 if on_gpu else torch.float32
    impls = ("triton", "torch") if on_gpu else ("torch",)
    ceil = measure_ceilings(device, warmup, reps)
    rows = [{"kernel": "ceiling: GEMM", "impl": "torch.mm", "tflops": ceil["tflops"], "note": str(dtype)},
            {"kernel": "ceiling: copy", "impl": "copy_", "gbps": ceil["gbps"], "note": "read+write bytes"}]
    if not on_gpu:
        rows.append({"kernel": "(triton)", "note": "Triton kernels need CUDA: torch paths only, vocab cut to "
                     f"{CPU_VOCAB}"})

    def add(kernel, model, n_tok, impl, pas, fn, flops, moved, note=""):
        with _backend(impl):
            ms = _time_ms(fn, device, warmup, reps)
        floor = max(flops / (ceil["tflops"] * 1e9), moved / (ceil["gbps"] * 1e6))
        rows.append({"kernel": kernel, "model": model, "tokens": n_tok, "impl": impl, "pass": pas, "ms": ms,
                     "tflops": flops / ms / 1e9, "gbps": moved / ms / 1e6, "of_floor": floor / ms, "note": note})

    for shape in shapes:
        shape = dict(shape, vocab=shape["vocab"] if on_gpu else min(shape["vocab"], CPU_VOCAB))
        for n_tok in tokens:
            for kernel, pas, fn, flops, moved in _cases(shape, n_tok, rank, device, dtype):
                for impl in impls:
                    add(kernel, shape["model"], n_tok, impl, pas, fn, flops, moved)
            if on_gpu:
                torch.cuda.empty_cache()
        fn, flops, moved, n = _adamw_case(shape, rank, device)
        for impl in impls:
            add("adamw_step_", shape["model"], "-", impl, "step", fn, flops, moved, f"{n / 1e6:.1f}M params")
    return rows


def print_profile(rows: Sequence[dict], file: TextIO = sys.stdout) -> None:
    """A fixed-width table of profile_kernels' rows."""
    fmt = {"ms": "{:.3f}", "tflops": "{:.3g}", "gbps": "{:.3g}", "of_floor": "{:.0%}"}
    cells = [[fmt.get(c, "{}").format(r[c]) if r.get(c) not in (None, "") else "" for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=file)


if __name__ == "__main__":
    print_profile(profile_kernels())
