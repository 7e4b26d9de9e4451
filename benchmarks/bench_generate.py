"""Generation throughput: engine.sampler.generate against transformers' generate, same weights, same run.

    .venv/bin/python benchmarks/bench_generate.py                  # the embedded tiny model shape, batch 32
    .venv/bin/python benchmarks/bench_generate.py --vocab 151936   # with the full Qwen3 vocabulary

Both sides get the same random-weight Qwen3 (float32 on CPU), the same left-padded prompts of mixed length,
and generate exactly --new-tokens tokens per row (no stop ids), greedy and sampled (temperature 1, top-p
0.95). Tokens/s = rows x new tokens / wall time (prefill included), best of --repeats. Greedy outputs are
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
from engine.sampler import SamplingParams, generate  # noqa: E402

# The embedded demo model's shape (engine.synthetic.TINY_MODEL, TINY_CONTEXT).
SHAPE = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 512}


def build_models(vocab: int, directory: Path):
    from transformers import Qwen3Config as HFConfig, Qwen3ForCausalLM as HFModel
    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=vocab, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, **SHAPE)
    cfg._attn_implementation = "sdpa"
    hf = HFModel(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.05 * torch.randn_like(p))
    hf.save_pretrained(str(directory), safe_serialization=True)
    return hf, engine.load_model(directory, device="cpu")


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


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=768)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(24, 96))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pad = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build_models(args.vocab, Path(tmp))
    prompts = prompts_for(args.batch, args.vocab, *args.prompt_len)
    ids, mask = left_pad(prompts, pad)
    n_tokens = args.batch * args.new_tokens
    results = {"config": {**SHAPE, "vocab_size": args.vocab, "batch": args.batch, "new_tokens": args.new_tokens,
                          "prompt_len": list(args.prompt_len), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}}
    for mode, params, hf_kwargs in [
        ("greedy", SamplingParams(args.new_tokens, temperature=0), dict(do_sample=False)),
        ("sample_t1_p0.95", SamplingParams(args.new_tokens, temperature=1.0, top_p=0.95),
         dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0)),
    ]:
        def run_ours():
            return generate(ours, prompts, params, stop_ids=[], pad_id=pad, batch_size=args.batch, seed=0)

        def run_hf():
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=pad, **hf_kwargs)

        t_ours, out_ours = best_time(run_ours, args.repeats)
        t_hf, out_hf = best_time(run_hf, args.repeats)
        row = {"ours_tok_s": n_tokens / t_ours, "hf_tok_s": n_tokens / t_hf, "speedup": t_hf / t_ours,
               "ours_s": t_ours, "hf_s": t_hf}
        if mode == "greedy":
            row["greedy_identical"] = [g.token_ids for g in out_ours] == out_hf[:, ids.shape[1]:].tolist()
        results[mode] = row
        print(f"{mode:>16}: ours {row['ours_tok_s']:8.0f} tok/s  transformers {row['hf_tok_s']:8.0f} tok/s  "
              f"speedup {row['speedup']:.2f}x", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
