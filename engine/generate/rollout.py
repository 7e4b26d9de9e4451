"""Rollout and evaluation drivers on top of `engine.generate.sampler`.

Rollouts: K sampled completions per task item, graded, appended to a JSONL file in the trainer's format
(one completion per line; see `engine.train.rollouts`). The K lines of a group are written with one write and an
fsync, so an interrupted run leaves whole groups plus at most one torn tail; a rerun truncates the tail and
skips the groups already written. Only a file of this command's own records is resumed into: any other
existing --out is refused untouched (`scan_rollout_file`, `engine.outputs`). Sample j of item `id` draws
from seed `sequence_seed(seed, id, j)`, so a resumed run writes exactly what an uninterrupted one would have.

Evaluation: greedy pass@1 (the protocol's evaluation), a per-item JSONL (id, completion, extracted
answer, gold, correct) that the analysis pairs across runs for McNemar, and a summary with the accuracy
and its 95% Wilson interval.

Under torchrun (`torchrun --nproc-per-node N cli.py eval|rollout ...`) the length-sorted chunks of
prompts are dealt round-robin to the ranks (each chunk is generated exactly as one process would
generate it, same batch composition, so the outputs are the same), the results are gathered, and
rank 0 alone writes them in the one-process order.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from engine import distributed
from engine.errors import EngineError
from engine.fsio import atomic_file, write_json
from engine.outputs import ROLLOUT_KEYS, claim, claim_dir, torn_tail_ok
from engine.tasks.grading import extract_answer, grade
from engine.generate.sampler import Generation, SamplingParams, check_batch_size, check_context, generate, sequence_seed
from engine.tasks.registry import TaskItem, build_prompt, default_style, load_task
from engine.model.tokenizer import ChatTokenizer

THINKING = {"auto": None, "off": False}  # --thinking: None = template as is; False = empty think block


def load_for_generation(model_path: str | os.PathLike, adapter: str | os.PathLike | None = None, *,
                        tokenizer_path: str | os.PathLike | None = None, device: str | None = None,
                        merge: bool = True, threads: int | None = None) -> tuple[torch.nn.Module, ChatTokenizer]:
    """The model (adapter applied, folded into the weights when `merge`: same function, faster decode)
    and its tokenizer (from the model directory unless `tokenizer_path`). `threads` sets torch's CPU
    threads (decode's small matrix products often run faster on one thread of a busy machine)."""
    from engine.model.weights import load_model
    from engine.model.lora import merge_adapter
    from engine.model.tokenizer import load_tokenizer
    if threads is not None:
        if threads < 1:
            raise EngineError(f"expected a positive thread count, got {threads}", field="threads")
        torch.set_num_threads(threads)
    model = load_model(model_path, device=device, adapter=adapter)
    if adapter is not None and merge:
        merge_adapter(model)
    return model, load_tokenizer(tokenizer_path or model_path)


def encode_prompts(tokenizer: ChatTokenizer, items: Sequence[TaskItem], style: str,
                   enable_thinking: bool | None) -> tuple[list[list[dict]], list[list[int]]]:
    messages = [build_prompt(item, style) for item in items]
    texts = []
    for item, m in zip(items, messages):
        try:
            texts.append(tokenizer.apply_chat_template(m, add_generation_prompt=True, enable_thinking=enable_thinking))
        except EngineError as e:  # name the task item the prompt came from: its file and line when known
            path, line = item.where or (None, None)
            raise EngineError(f"item {item.id!r}: {e.message}", path=path, line=line, field="question") from None
    return messages, tokenizer.encode_batch(texts)


def completion_text(tokenizer: ChatTokenizer, gen: Generation) -> str:
    """Decoded completion without the final stop token; special tokens kept so the text re-tokenises."""
    ids = gen.token_ids[:-1] if gen.finished else gen.token_ids
    return tokenizer.decode(ids, skip_special_tokens=False)


class _Progress:
    """A tqdm bar over completions with the decode throughput (generated tokens / s) as postfix."""

    def __init__(self, total: int, desc: str, show: bool = True) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True, disable=not show)
        self.tokens, self.start, self.shown = 0, time.perf_counter(), 0.0

    def on_step(self, n: int) -> None:
        self.tokens += n
        now = time.perf_counter()
        if now - self.shown > 0.5:
            self.shown = now
            self.bar.set_postfix_str(f"{self.rate:.1f} tok/s", refresh=True)

    @property
    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        self.bar.set_postfix_str(f"{self.rate:.1f} tok/s", refresh=False)
        self.bar.close()


# ---------------------------------------------------------------- rollouts
def scan_rollout_file(path: Path, k: int, source: str) -> set[str]:
    """Group ids fully written in `path`; truncates a torn tail (an unterminated last line of this
    writer's shape, or an incomplete last group). Anything that is not this command's own output (a
    line that is not a rollout record, a file of another task or K) is refused, the file untouched:
    a resume may only ever cut what an interrupted run of this command left."""
    if not os.path.lexists(path):
        return set()
    if not path.is_file():
        claim(path, "rollouts")  # raises: a directory (or device) where the rollouts file goes
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EngineError(f"cannot read the rollouts file ({e.strerror})", path=path) from None
    done: set[str] = set()
    keep_end = 0                      # byte offset just after the last complete group
    group, count, offset, lineno = None, 0, 0, 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        lineno += 1
        if end < 0:                   # no newline: a torn last line, if it is shaped like ours
            if not torn_tail_ok(data[offset:]):
                raise EngineError("unterminated last line is not a rollout record of this command; not "
                                  "truncating (fix or move the file, or choose another --out)", path=path, line=lineno)
            break
        raw, offset = data[offset:end], end + 1
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict) or not ROLLOUT_KEYS <= obj.keys():
                raise TypeError
            gid, src = obj["group"], obj.get("source")
        except (ValueError, TypeError, RecursionError):
            raise EngineError("not a rollout record written by this command; refusing to resume into or "
                              "truncate this file (move it or choose another --out)", path=path, line=lineno) from None
        if src != source:
            raise EngineError(f"file holds rollouts of task {src!r}, not {source!r}", path=path, line=lineno,
                              field="source")
        if gid != group:
            if count not in (0, k):
                raise EngineError(f"group {group!r} has {count} lines, expected --k {k}", path=path, line=lineno)
            group, count = gid, 0
            if gid in done:
                raise EngineError(f"group {gid!r} appears twice", path=path, line=lineno, field="group")
        count += 1
        if count > k:
            raise EngineError(f"group {gid!r} has more than --k {k} lines", path=path, line=lineno)
        if count == k:
            done.add(gid)
            keep_end = offset
    if keep_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep_end)
            f.flush()
            os.fsync(f.fileno())
        tqdm.write(f"{path}: dropped an incomplete tail ({len(data) - keep_end} bytes) from an interrupted run")
    return done


def rollout_items(model: torch.nn.Module, tokenizer: ChatTokenizer, items: Sequence[TaskItem], out: str | os.PathLike,
                  params: SamplingParams, *, k: int = 4, seed: int = 0, batch_size: int = 32,
                  style: str = "boxed", enable_thinking: bool | None = None, task: str | None = None,
                  dist: distributed.DistContext | None = None) -> dict[str, Any]:
    """Append K graded completions per item to `out` (resuming); returns a summary dict. Under
    torchrun (`dist`), round r has rank j generate chunk r * world + j; rank 0 appends the round's
    groups in chunk order, so the file is the one-process file."""
    ctx = dist or distributed.DistContext()
    if k < 1:
        raise EngineError(f"expected k >= 1, got {k}", field="k")
    check_batch_size(batch_size)
    out = Path(out)
    source = task or (items[0].source if items else "")
    done = set(distributed.on_main(ctx, lambda: sorted(scan_rollout_file(out, k, source))))  # may truncate
    pending = [item for item in items if item.id not in done]
    messages, prompts = encode_prompts(tokenizer, pending, style, enable_thinking)
    check_context(model, prompts, [item.id for item in pending])
    order = sorted(range(len(pending)), key=lambda i: -len(prompts[i]))
    per_chunk = max(1, batch_size // k)
    chunks = [order[s:s + per_chunk] for s in range(0, len(order), per_chunk)]
    progress = _Progress(len(pending) * k, f"rollout {source}", show=ctx.is_main)
    rewards, truncated, retokenize_mismatch = [], 0, 0
    f = None
    try:
        if ctx.is_main:
            out.parent.mkdir(parents=True, exist_ok=True)
            f = open(out, "ab")
        for first in range(0, len(chunks), ctx.world_size):
            mine = first + ctx.rank
            groups = _rollout_chunk(model, tokenizer, pending, messages, prompts, chunks[mine], params, k=k,
                                    seed=seed, batch_size=batch_size, source=source,
                                    enable_thinking=enable_thinking, progress=progress) \
                if mine < len(chunks) else []
            for part in distributed.gather_json(ctx, groups):      # chunk order = one-process order
                for group in part:
                    rewards.extend(group["rewards"])
                    truncated += group["truncated"]
                    retokenize_mismatch += group["mismatch"]
                    if f is not None:
                        f.write(group["text"].encode())  # one write per group: a crash tears at most the tail
                        progress.bar.update(k)
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:  # full disk, read-only filesystem: whole groups stay, a torn tail resumes
        raise EngineError(f"cannot write the rollouts file ({e.strerror})", path=out) from None
    finally:
        progress.close()
        if f is not None:
            try:
                f.close()
            except OSError as e:
                raise EngineError(f"cannot write the rollouts file ({e.strerror})", path=out) from None
    tokens, seconds = _throughput(ctx, progress)
    return {"path": str(out), "groups_skipped": len(done), "groups_written": len(pending),
            "completions": len(rewards), "mean_reward": sum(rewards) / len(rewards) if rewards else None,
            "truncated": truncated, "retokenize_mismatch": retokenize_mismatch,
            "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9)}


def _rollout_chunk(model, tokenizer: ChatTokenizer, pending: Sequence[TaskItem], messages, prompts, chunk: list[int],
                   params: SamplingParams, *, k: int, seed: int, batch_size: int, source: str,
                   enable_thinking: bool | None, progress: "_Progress") -> list[dict[str, Any]]:
    """Generate and grade the K completions of each item of `chunk`: one record per group with its
    JSONL text (K lines), rewards, truncation and re-tokenisation counts. A record names the stop token
    it ended on and, when set, the chat template's enable_thinking, so a trainer rebuilds the exact
    token sequence that was sampled."""
    template = {"enable_thinking": enable_thinking} if enable_thinking is not None else {}
    batch_prompts = [prompts[i] for i in chunk for _ in range(k)]
    seeds = [sequence_seed(seed, pending[i].id, j) for i in chunk for j in range(k)]
    gens = generate(model, batch_prompts, params, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                    seeds=seeds, batch_size=batch_size, on_step=progress.on_step)
    groups = []
    for n, i in enumerate(chunk):
        item, lines, group = pending[i], [], {"rewards": [], "truncated": 0, "mismatch": 0}
        for gen in gens[n * k:(n + 1) * k]:
            body = gen.token_ids[:-1] if gen.finished else gen.token_ids
            text = completion_text(tokenizer, gen)
            reward = 1.0 if grade(text, item.gold) else 0.0
            group["rewards"].append(reward)
            group["truncated"] += not gen.finished
            # A trainer that re-encodes the text gets other ids (and a behavior_logps length
            # mismatch) when the sampled tokenisation is not the canonical one: count them.
            group["mismatch"] += tokenizer.encode(text) != body
            lines.append(json.dumps({
                "prompt": messages[i], "completion": text, "reward": reward, "group": item.id,
                "behavior_logps": gen.behavior_logps, "answer": item.gold, "source": source,
                "finished": gen.finished, "completion_ids": body,
                **({"stop_id": gen.token_ids[-1]} if gen.finished else {}), **template},
                ensure_ascii=False) + "\n")
        group["text"] = "".join(lines)
        groups.append(group)
    return groups


def _throughput(ctx: distributed.DistContext, progress: "_Progress") -> tuple[int, float]:
    """Generated tokens over all ranks and the longest rank's wall time."""
    elapsed = time.perf_counter() - progress.start
    if not ctx.enabled:
        return progress.tokens, elapsed
    parts = distributed.gather_json(ctx, [progress.tokens, elapsed])
    return sum(p[0] for p in parts), max(p[1] for p in parts)


# ---------------------------------------------------------------- evaluation
def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def evaluate_items(model: torch.nn.Module, tokenizer: ChatTokenizer, items: Sequence[TaskItem], *,
                   max_new_tokens: int = 1024, batch_size: int = 32, style: str = "boxed",
                   enable_thinking: bool | None = None, dist: distributed.DistContext | None = None
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Greedy pass@1. Returns per-item records (input order) and a summary dict. Under torchrun
    (`dist`) the chunks are dealt round-robin to the ranks and every rank gets all the records."""
    ctx = dist or distributed.DistContext()
    if not items:
        raise EngineError("no items to evaluate (empty task or --limit 0)", field="limit")
    check_batch_size(batch_size)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    _, prompts = encode_prompts(tokenizer, items, style, enable_thinking)
    check_context(model, prompts, [item.id for item in items])
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))  # similar lengths batch together
    chunks = [order[s:s + batch_size * 8] for s in range(0, len(order), batch_size * 8)]  # keep the bar moving
    mine = chunks[ctx.rank::ctx.world_size]
    progress = _Progress(sum(len(c) for c in mine), "eval", show=ctx.is_main)
    records: list[dict[str, Any]] = [{} for _ in items]
    try:
        for chunk in mine:
            gens = generate(model, [prompts[i] for i in chunk], params, stop_ids=tokenizer.stop_ids,
                            pad_id=tokenizer.pad_id, batch_size=batch_size, on_step=progress.on_step)
            for i, gen in zip(chunk, gens):
                text = completion_text(tokenizer, gen)
                records[i] = {"id": items[i].id, "completion": text, "extracted": extract_answer(text),
                              "gold": items[i].gold, "correct": grade(text, items[i].gold),
                              "finished": gen.finished, "num_tokens": len(gen.token_ids)}
            progress.bar.update(len(chunk))
    finally:
        progress.close()
    if ctx.enabled:
        for part in distributed.gather_json(ctx, [[i, r] for i, r in enumerate(records) if r]):
            for i, r in part:
                records[i] = r
    tokens, seconds = _throughput(ctx, progress)
    correct = sum(r["correct"] for r in records)
    lo, hi = wilson_interval(correct, len(records))
    summary = {"n": len(records), "correct": correct, "accuracy": correct / len(records),
               "ci95_wilson": [lo, hi], "truncated": sum(not r["finished"] for r in records),
               "max_new_tokens": max_new_tokens, "style": style, "enable_thinking": enable_thinking,
               "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9)}
    return records, summary


def summary_line(task: str, split: str, s: dict[str, Any]) -> str:
    lo, hi = s["ci95_wilson"]
    return (f"{task}/{split}: accuracy {s['accuracy']:.4f} ({s['correct']}/{s['n']}), "
            f"95% CI [{lo:.4f}, {hi:.4f}] (Wilson), truncated {s['truncated']}")


def eval_paths(out_dir: str | os.PathLike, task: str, split: str) -> tuple[Path, Path]:
    """The per-item and summary paths under `out_dir`, refused unless absent or earlier eval output."""
    out_dir = claim_dir(out_dir)
    return (claim(out_dir / f"{task}_{split}.jsonl", "eval-items"),
            claim(out_dir / f"{task}_{split}_summary.json", "eval-summary"))


def write_eval(out_dir: str | os.PathLike, task: str, split: str, records: Sequence[dict],
               summary: dict[str, Any]) -> tuple[Path, Path]:
    """`<out>/<task>_<split>.jsonl` (per item) and `<out>/<task>_<split>_summary.json`, atomically."""
    items_path, summary_path = eval_paths(out_dir, task, split)
    try:
        with atomic_file(items_path) as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        write_json(summary_path, summary)
    except OSError as e:  # each file is whole or absent (atomic); say which one could not be written
        raise EngineError(f"cannot write the eval results ({e.strerror})",
                          path=summary_path if items_path.is_file() else items_path) from None
    return items_path, summary_path


# ---------------------------------------------------------------- command entry points
def run_rollout(model: str, *, task: str, split: str, out: str, k: int = 4, adapter: str | None = None,
                limit: int | None = None, data_dir: str | None = None, params: SamplingParams,
                batch_size: int = 32, seed: int = 0, thinking: str = "auto", style: str | None = None,
                device: str | None = None, tokenizer: str | None = None, threads: int | None = None,
                echo: Callable[[str], None] = print) -> dict[str, Any]:
    ctx = distributed.setup(device)
    if ctx.is_main and k >= 1:
        scan_rollout_file(Path(out), k, task)  # an --out it may not resume into is refused before the work
    items = load_task(task, split, data_dir=data_dir, limit=limit)
    style = style or default_style(task)
    m, tok = load_for_generation(model, adapter, tokenizer_path=tokenizer, device=_rank_device(ctx, device),
                                 threads=threads)
    summary = rollout_items(m, tok, items, out, params, k=k, seed=seed, batch_size=batch_size, style=style,
                            enable_thinking=THINKING[thinking], task=task, dist=ctx)
    reward = "n/a" if summary["mean_reward"] is None else f"{summary['mean_reward']:.4f}"
    if ctx.is_main:
        echo(f"{out}: wrote {summary['groups_written']} groups ({summary['completions']} completions, mean "
             f"reward {reward}, {summary['truncated']} truncated), skipped {summary['groups_skipped']} already "
             f"written; {summary['tokens_per_s']:.1f} tok/s")
    return summary


def _rank_device(ctx: distributed.DistContext, device: str | None) -> str | None:
    """Under torchrun with GPUs, each rank generates on its own."""
    chosen = distributed.training_device(ctx, device)
    return None if chosen is None else str(chosen)


def run_eval(model: str, *, task: str, split: str, adapter: str | None = None, limit: int | None = None,
             data_dir: str | None = None, out: str | None = None, max_new_tokens: int = 1024,
             batch_size: int = 32, thinking: str = "auto", style: str | None = None, device: str | None = None,
             tokenizer: str | None = None, threads: int | None = None,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    ctx = distributed.setup(device)
    if out is not None:
        eval_paths(out, task, split)  # before the work: an --out it may not replace is refused now
    items = load_task(task, split, data_dir=data_dir, limit=limit)
    style = style or default_style(task)
    m, tok = load_for_generation(model, adapter, tokenizer_path=tokenizer, device=_rank_device(ctx, device),
                                 threads=threads)
    records, summary = evaluate_items(m, tok, items, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                      style=style, enable_thinking=THINKING[thinking], dist=ctx)
    summary = {"task": task, "split": split, "model": str(model), "adapter": adapter, **summary}
    if out is not None:
        distributed.on_main(ctx, lambda: write_eval(out, task, split, records, summary) and None)
    if ctx.is_main:
        echo(summary_line(task, split, summary))
    return summary
