"""Generation throughput: engine.generate.sampler.generate against transformers' generate, same weights, same run.

    .venv/bin/python benchmarks/bench_generate.py                  # the embedded model's shape, batch 32
    .venv/bin/python benchmarks/bench_generate.py --vocab 151936   # with the full Qwen3 vocabulary
    python3 benchmarks/bench_generate.py --model-config data/qwen3-configs/Qwen3-0.6B.json \
        --device cuda --batch 64 --prompt-len 64 512 --new-tokens 512   # a real shape on a GPU, bf16

Both sides get the same random-weight Qwen3 (float32 on CPU, bfloat16 on CUDA; the embedded model's shape
unless --model-config names an HF config.json), the same left-padded prompts of mixed length,
and generate exactly --new-tokens tokens per row (no stop ids), greedy and sampled (temperature 1, top-p
0.95); then the two workloads with stop ids: rollouts (K samples per prompt, temperature 1) and greedy
evaluation. Tokens/s = rows x new tokens / wall time (prefill included), best of --repeats. Greedy outputs are
checked to be identical token for token.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from engine.generate.sampler import SamplingParams, generate  # noqa: E402
from engine.recipes.embedded_inputs import TINY_CONTEXT, STUDENT_MODEL, TINY_VOCAB  # noqa: E402

# The embedded demo model's shape.
SHAPE = {**STUDENT_MODEL, "max_position_embeddings": TINY_CONTEXT}


def model_shape(args) -> dict:
    """The HF config fields of the benchmarked model: the embedded shape with --vocab, or --model-config."""
    if args.model_config is None:
        return {**SHAPE, "vocab_size": args.vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "tie_word_embeddings": True}
    fields = json.loads(Path(args.model_config).read_text())
    return {k: v for k, v in fields.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}


def build_models(shape: dict, directory: Path, device: torch.device, dtype: torch.dtype, std: float):
    from transformers import Qwen3Config as HFConfig, Qwen3ForCausalLM as HFModel
    torch.manual_seed(0)
    cfg = HFConfig(**shape)
    cfg._attn_implementation = "sdpa"
    hf = HFModel(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else std * torch.randn_like(p))
    hf = hf.to(dtype)
    hf.save_pretrained(str(directory), safe_serialization=True)
    return hf.to(device), engine.load_model(directory, device=device, dtype=dtype)


def prompts_for(batch: int, vocab: int, lo: int, hi: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(lo, hi + 1, (batch,), generator=g).tolist()
    return [torch.randint(10, vocab - 10, (n,), generator=g).tolist() for n in lengths]


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return ids, mask


def best_time(fn, repeats: int, device: torch.device) -> tuple[float, float, object]:
    """Best wall time and best process CPU time over `repeats` runs (CPU time is the steadier number on a
    shared machine when torch runs one thread), and the last output. On CUDA the clock stops after the
    device has finished."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu, out


def hf_useful_tokens(out: torch.Tensor, prompt_len: int, stop_ids: list[int]) -> int:
    """Tokens transformers generated up to and including each row's first stop id (padding after it
    is not output)."""
    total = 0
    for row in out[:, prompt_len:].tolist():
        hits = [i for i, t in enumerate(row) if t in stop_ids]
        total += hits[0] + 1 if hits else len(row)
    return total


def scenarios(args, vocab: int) -> list[tuple[str, list[list[int]], SamplingParams, dict, list[int]]]:
    """(name, prompts, our params, transformers' sampling kwargs, stop ids)."""
    distinct = prompts_for(args.batch, vocab, *args.prompt_len)
    groups = prompts_for(args.batch // args.k, vocab, *args.prompt_len)
    grouped = [p for p in groups for _ in range(args.k)]
    # Stop ids for the rollout scenario: enough random tokens that lengths spread up to --new-tokens.
    g = torch.Generator().manual_seed(2)
    stops = torch.randperm(vocab - 20, generator=g)[:max(1, vocab // 150)].add(10).tolist()
    sample = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    return [
        ("fixed_greedy", distinct, SamplingParams(args.new_tokens, temperature=0), dict(do_sample=False), []),
        ("fixed_sample_t1_p0.95", distinct, SamplingParams(args.new_tokens, temperature=1.0, top_p=0.95),
         dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0), []),
        (f"rollout_k{args.k}_t1_stops", grouped, SamplingParams(args.new_tokens, temperature=1.0), sample, stops),
        # `cli.py eval`'s workload: greedy, every row ends at its first stop id.
        ("eval_greedy_stops", distinct, SamplingParams(args.new_tokens, temperature=0), dict(do_sample=False), stops),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=TINY_VOCAB, help="With the embedded shape.")
    ap.add_argument("--model-config", default=None, help="An HF config.json: benchmark that shape instead.")
    ap.add_argument("--device", default="cpu", help="cpu (float32) or cuda (bfloat16).")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=4, help="Samples per prompt in the rollout scenario.")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(48, 128))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared CPU).")
    ap.add_argument("--out", default=None, help="Also write the results as JSON here.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = model_shape(args)
    pad = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build_models(shape, Path(tmp), device, dtype,
                                std=0.05 if args.model_config is None else shape.get("initializer_range", 0.02))
    results = {"command": " ".join(sys.argv),
               "config": {**shape, "batch": args.batch, "new_tokens": args.new_tokens,
                          "prompt_len": list(args.prompt_len), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
                          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}}
    for name, prompts, params, hf_kwargs, stops in scenarios(args, shape["vocab_size"]):
        ids, mask = left_pad(prompts, pad)
        ids, mask = ids.to(device), mask.to(device)

        def run_ours():
            return generate(ours, prompts, params, stop_ids=stops, pad_id=pad, batch_size=args.batch, seed=0)

        def run_hf():
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, pad_token_id=pad,
                                   eos_token_id=stops or None, min_new_tokens=0 if stops else args.new_tokens,
                                   **hf_kwargs)

        w_ours, c_ours, out_ours = best_time(run_ours, args.repeats, device)
        w_hf, c_hf, out_hf = best_time(run_hf, args.repeats, device)
        n_ours = sum(len(g.token_ids) for g in out_ours)
        n_hf = hf_useful_tokens(out_hf, ids.shape[1], stops)
        row = {"ours_tokens": n_ours, "hf_tokens": n_hf,
               "ours_tok_s_wall": n_ours / w_ours, "hf_tok_s_wall": n_hf / w_hf,
               "ours_tok_s_cpu": n_ours / c_ours, "hf_tok_s_cpu": n_hf / c_hf}
        row["speedup_wall"] = row["ours_tok_s_wall"] / row["hf_tok_s_wall"]
        row["speedup_cpu"] = row["ours_tok_s_cpu"] / row["hf_tok_s_cpu"]
        if name == "fixed_greedy":
            row["greedy_identical"] = [g.token_ids for g in out_ours] == out_hf[:, ids.shape[1]:].tolist()
        if name == "eval_greedy_stops":
            row["mean_new_tokens"] = n_ours / len(prompts)
            row["greedy_identical"] = all(
                g.token_ids == h[:len(g.token_ids)] for g, h in zip(out_ours, out_hf[:, ids.shape[1]:].tolist()))
        results[name] = row
        print(f"{name:>24}: ours {row['ours_tok_s_wall']:7.0f} tok/s (cpu {row['ours_tok_s_cpu']:7.0f})  "
              f"transformers {row['hf_tok_s_wall']:7.0f} tok/s (cpu {row['hf_tok_s_cpu']:7.0f})  "
              f"speedup {row['speedup_wall']:.2f}x wall, {row['speedup_cpu']:.2f}x cpu", flush=True)
    print(json.dumps(results, indent=2))
    if args.out:
        from engine.fsio import write_json
        write_json(args.out, results)


if __name__ == "__main__":
    main()
