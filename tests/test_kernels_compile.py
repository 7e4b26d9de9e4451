"""Every Triton kernel compiles for Hopper (sm_90) with its production tiles, without a GPU.

The wrappers run on CPU tensors at Qwen3-4B widths (few tokens) with launches recorded instead of
executed; each recorded launch is compiled ahead of time through Triton's bundled ptxas, with the
specialisation a real launch would get (16-byte aligned pointers, ints divisible by 16 marked so).
This catches what the interpreter cannot: unsupported constructs in compiled mode, shared memory over
the chip's limit, and GEMM tiles that miss the wgmma tensor-core path.
"""
from __future__ import annotations

import pytest
import torch

from triton_kernels import _triton, adamw_step_, linear_logprob, lora_linear, qk_norm_rope, qkv_proj

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SMEM = 232448  # bytes of shared memory a block may use on sm_90 (227 KiB)
TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
              torch.int32: "i32"}
GEMM_KERNELS = {"_lowrank_gemm_kernel", "_segmented_reduction_gemm_kernel", "_logprob_fwd_kernel",
                "_dlogits_kernel"}


def _record_launches(monkeypatch) -> list:
    launches = []

    def fake_getitem(self, grid):
        return lambda *args, **kwargs: launches.append((self, args, kwargs))

    monkeypatch.setattr(_triton.LazyJit, "__getitem__", fake_getitem)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the Triton path take CPU tensors
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    return launches


def _run_wrappers_bf16():
    """Qwen3-4B attention widths: hidden 2560, 32 q heads, 8 kv heads, head_dim 128; r = 32."""
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    rnd = lambda *shape, dtype=bf: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    x = rnd(2, 8, 2560).requires_grad_()
    ws = [rnd(4096, 2560), rnd(1024, 2560), rnd(1024, 2560)]
    as_ = [rnd(32, 2560, dtype=torch.float32).requires_grad_() for _ in range(3)]
    bs = [rnd(n, 32, dtype=torch.float32).requires_grad_() for n in (4096, 1024, 1024)]
    q, k, v = qkv_proj(x, ws, as_, bs, 2.0)
    qn, kn = qk_norm_rope(q.view(2, 8, 32, 128), k.view(2, 8, 8, 128), rnd(128), rnd(128), rnd(8, 128),
                          rnd(8, 128), 1e-6)
    o = lora_linear(qn.reshape(2, 8, 4096), rnd(2560, 4096), rnd(32, 4096).requires_grad_(),
                    rnd(2560, 32).requires_grad_(), 2.0)
    logp = linear_logprob(o.reshape(16, 2560), rnd(1024, 2560), torch.randint(0, 1024, (16,), generator=g))
    (logp.sum() + v.float().sum() + kn.float().sum()).backward()
    flat = [torch.randn(4096, generator=g) for _ in range(4)]
    adamw_step_(*flat, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3)


def _compile(kernel, args, kwargs):
    """Ahead-of-time compile for sm_90 with the specialisation a CUDA launch of these args would get."""
    fn = kernel.variant()
    names = fn.arg_names
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    if "UPCAST" in bound:  # recorded under the interpreter, which needs float32 dots; a GPU launch does not
        bound["UPCAST"] = False
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TYPE_NAMES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=HOPPER, options=options)


def test_kernels_compile_for_hopper(monkeypatch):
    launches = _record_launches(monkeypatch)
    _run_wrappers_bf16()
    names = {kernel.fn.__name__ for kernel, _, _ in launches}
    assert names == GEMM_KERNELS | {"_qk_norm_rope_kernel", "_adamw_kernel"}
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # variant() now gives the compiler's JITFunction
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    seen = set()
    for kernel, args, kwargs in launches:
        key = (kernel.fn.__name__, tuple(sorted(kwargs.items())),
               tuple(a.dtype if isinstance(a, torch.Tensor) else a % 16 == 0 for a in args))
        if key in seen:
            continue
        seen.add(key)
        compiled = _compile(kernel, args, kwargs)
        assert compiled.metadata.shared <= HOPPER_SMEM, (key[0], compiled.metadata.shared)
        if kernel.fn.__name__ in GEMM_KERNELS:
            # Hopper tensor cores on bf16 operands with float32 accumulation
            assert "wgmma.mma_async" in compiled.asm["ptx"], key[0]
            assert ".f32.bf16.bf16" in compiled.asm["ptx"].split("wgmma.mma_async", 1)[1][:80], key[0]
            assert "cp.async" in compiled.asm["ptx"], key[0]  # software-pipelined tile loads
