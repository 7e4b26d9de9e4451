"""The profiler on CPU: torch paths only, every kernel reported, table printed."""
from __future__ import annotations

import io

from triton_kernels.profile import print_profile, profile_kernels

TINY = {"model": "tiny", "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "vocab": 300, "layers": 2}


def test_profile_rows_and_table_on_cpu():
    rows = profile_kernels(shapes=[TINY], device="cpu", tokens=(12,), warmup=0, reps=1)
    timed = [r for r in rows if "ms" in r]
    kernels = {r["kernel"] for r in timed}
    assert kernels == {"lora_linear(o_proj)", "qkv_proj", "qk_norm_rope", "linear_logprob", "adamw_step_"}
    assert {r["impl"] for r in timed} == {"torch"}  # Triton needs CUDA
    assert all(r["ms"] > 0 and r["of_floor"] > 0 for r in timed)
    assert any("need CUDA" in r.get("note", "") for r in rows)
    out = io.StringIO()
    print_profile(rows, file=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:3] == ["kernel", "model", "tokens"] and len(lines) == len(rows) + 1
