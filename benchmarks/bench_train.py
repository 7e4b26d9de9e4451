"""Training step, this engine against transformers + PEFT side by side (`python cli.py bench`).

    python cli.py bench --model-config CONFIG_JSON --batch B --seq T [--loss sft|dpo|grpo] [--steps N]

The HF side: transformers' Qwen3ForCausalLM (SDPA attention, the default) with PEFT LoRA on q, k, v, o,
built with the engine's random weights and LoRA init (engine/recipes/train_step_bench.py), trained the way a transformers
user would: SFT through `model(..., labels=...)` (HF's cross-entropy over full [B, T, V] logits), DPO /
GRPO through full logits -> log_softmax -> gather (TRL's way) into the same `losses` function as the
engine; torch.optim.AdamW (fused on CUDA, as HF's Trainer picks) with clip_grad_norm_ at 1.0.

The harness: each side lives in its own spawned process, built once (both in parallel), so its peak
memory is its own: the kernel's resident-set high-water mark on CPU, `torch.cuda.max_memory_allocated`
on CUDA. The parent asks the two for steps in turn (engine, hf, hf, engine, ...) so that load drift on a
shared machine hits both alike, and reports medians; equal losses step after step show that both
sides train the same thing. `find_max_seq` searches the longest sequence each side trains.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.recipes.train_step_bench import (BenchSpec, EngineRunner, device_name, device_peak_flops, fill_random_, gib,  # noqa: E402
                          init_lora_a, loss_of, make_batch, memory_report, reset_peak, step_flops, sync)
from engine.childproc import die_with_parent  # noqa: E402
from engine.errors import EngineError  # noqa: E402

SIDES = ("engine", "hf")


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class HFRunner:
    def __init__(self, spec: BenchSpec) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import Qwen3Config, Qwen3ForCausalLM
        self.spec = spec
        raw = json.loads(Path(spec.model_config).read_text())
        raw = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
        cfg = Qwen3Config(**raw)
        cfg._attn_implementation = "sdpa"
        cfg.use_cache = False
        default = torch.get_default_dtype()
        torch.set_default_dtype(spec.dtype)  # build straight in the run's dtype: no float32 copy first
        try:
            with torch.device(spec.torch_device):
                model = Qwen3ForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default)
        fill_random_(model, spec.seed, spec.weights_dtype)
        model = get_peft_model(model, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                                                 target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"))
        lora = [m for n, m in model.named_modules() if n.rpartition(".")[2] in TARGETS and hasattr(m, "lora_A")]
        with torch.no_grad():
            shapes = [tuple(m.lora_A["default"].weight.shape) for m in lora]
            for m, a in zip(lora, init_lora_a(shapes, spec.seed)):
                m.lora_A["default"].weight.copy_(a)
                m.lora_B["default"].weight.zero_()
        if spec.hf_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        cuda = spec.torch_device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.lr, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.01, fused=cuda or None)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.spec.loss == "sft":
            labels = ids.masked_fill(~batch["score_mask"], -100)
            loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            picked = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
            logps = torch.nn.functional.pad(picked, (1, 0))
            loss = loss_of(self.spec, logps, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def make_runner(side: str, spec: BenchSpec):
    return EngineRunner(spec) if side == "engine" else HFRunner(spec)


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in text or \
        "can't allocate memory" in text or "failed to allocate" in text


def _worker(side: str, spec_dict: dict[str, Any], conn) -> None:
    """A spawned process holding one side: replies to ("step", None), ("seq", T), ("stop", None)."""
    die_with_parent()  # a bench killed with -9 takes its workers with it
    try:
        spec = BenchSpec(**spec_dict)
        if spec.cpu_mem_limit_gb and spec.torch_device.type == "cpu":
            # Allocations past the limit fail (and are reported as out of memory) instead of the
            # kernel's OOM killer hitting this or another process of the shared machine.
            limit = int(spec.cpu_mem_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if spec.threads:
            torch.set_num_threads(spec.threads)
        device = spec.torch_device
        t0 = time.perf_counter()
        runner = make_runner(side, spec)
        vocab = spec.config().vocab_size
        batch = make_batch(spec, vocab)
        sync(device)
        build = {"build_s": time.perf_counter() - t0, "threads": torch.get_num_threads(),
                 **{f"built_{k}": v for k, v in memory_report(device).items()}}
        build_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        reset_peak(device)
        conn.send(("ready", build))
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                report = memory_report(device)
                if build_peak is not None:
                    report["peak"] = max(build_peak, report["step_peak"])
                conn.send(("ok", report))
                return
            try:
                if cmd == "seq":
                    batch = None
                    reset_peak(device)
                    batch = make_batch(spec, vocab, seq=arg)
                sync(device)
                t, cpu = time.perf_counter(), time.process_time()
                loss = runner.step(batch)
                sync(device)
                conn.send(("ok", {"s": time.perf_counter() - t, "cpu_s": time.process_time() - cpu, "loss": loss,
                                  "step_peak": memory_report(device)["step_peak"]}))
            except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as e:
                if not _is_oom(e):
                    raise
                runner.optimizer.zero_grad()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                conn.send(("oom", str(e).splitlines()[0][:200]))
    except EngineError as e:  # bad input met in the worker: the parent raises it as its own
        conn.send(("input-error", (e.message, e.path, e.line, e.field)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        conn.send(("error", traceback.format_exc()))


class Worker:
    def __init__(self, side: str, spec: BenchSpec) -> None:
        self.side = side
        ctx = mp.get_context("spawn")  # a fresh process: its memory is this side's alone
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(side, dataclasses.asdict(spec), child), daemon=True)
        self.proc.start()
        child.close()
        self.ready: dict = {}

    def wait_ready(self) -> "Worker":
        self.ready = self._reply()
        return self

    def _reply(self) -> Any:
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise EngineError(f"{self.side} worker died (exit code {self.proc.exitcode}; "
                              "killed for memory?)") from None
        if kind == "input-error":
            message, path, line, field = payload
            raise EngineError(f"{self.side} worker: {message}", path=path, line=line, field=field)
        if kind == "error":  # one line for the user; the whole traceback with ENGINE_DEBUG=1
            if os.environ.get("ENGINE_DEBUG"):
                print(payload, file=sys.stderr)
            last = payload.strip().splitlines()[-1] if payload.strip() else "unknown error"
            raise EngineError(f"{self.side} worker failed: {last[:300]}")
        if kind == "oom":
            return {"oom": payload}
        return payload

    def ask(self, cmd: str, arg: Any = None) -> Any:
        self.conn.send((cmd, arg))
        return self._reply()

    def stop(self) -> dict:
        report = self.ask("stop")
        self.proc.join(30)
        return report


def run_bench(spec: BenchSpec, sides: tuple[str, ...] = SIDES, log: Callable[[str], None] = print) -> dict:
    """Build each side in its own process, alternate timed steps, return the results (see `format_table`)."""
    load_before = os.getloadavg()
    workers: dict[str, Worker] = {}
    try:
        log(f"building {' and '.join(sides)} (one process each, in parallel) ...")
        for side in sides:
            workers[side] = Worker(side, spec)
        for w in workers.values():
            w.wait_ready()
        times: dict[str, list[float]] = {s: [] for s in sides}
        cpu_times: dict[str, list[float]] = {s: [] for s in sides}
        losses_seen: dict[str, list[float]] = {s: [] for s in sides}
        for rnd in range(spec.warmup + spec.steps):
            for side in (sides if rnd % 2 == 0 else sides[::-1]):
                r = workers[side].ask("step")
                if "oom" in r:
                    raise RuntimeError(f"{side} ran out of memory: {r['oom']}")
                losses_seen[side].append(r["loss"])
                if rnd >= spec.warmup:
                    times[side].append(r["s"])
                    cpu_times[side].append(r["cpu_s"])
                log(f"  step {rnd + 1} {side}: {r['s']:.3f} s ({r['cpu_s']:.3f} s CPU), loss {r['loss']:.6f}"
                    + ("" if rnd >= spec.warmup else " (warm-up)"))
        memory = {side: w.stop() for side, w in workers.items()}
    finally:
        for w in workers.values():
            if w.proc.is_alive():
                w.proc.kill()
    cfg = spec.config()
    flops = step_flops(spec, cfg)
    peak = device_peak_flops(spec.torch_device)
    tokens = spec.batch * spec.seq
    rows = {}
    for side in sides:
        med = statistics.median(times[side])
        rows[side] = {"step_s": med, "min_s": min(times[side]), "max_s": max(times[side]), "tok_s": tokens / med,
                      "tflops": flops / med / 1e12, "mfu": flops / med / peak if peak else None,
                      "cpu_s": statistics.median(cpu_times[side]), "losses": losses_seen[side],
                      "times": times[side], "cpu_times": cpu_times[side],
                      **workers[side].ready, **memory[side]}
    result = {"spec": dataclasses.asdict(spec), "device": device_name(spec.torch_device),
              "dtype": str(spec.dtype).removeprefix("torch."),
              "threads": workers[sides[0]].ready["threads"] if workers else torch.get_num_threads(),
              "load": [load_before, os.getloadavg()], "step_flops": flops, "peak_flops": peak,
              "tokens": tokens, "rows": rows}
    if set(sides) == set(SIDES):
        e, h = rows["engine"], rows["hf"]
        result["tok_s_ratio"] = e["tok_s"] / h["tok_s"]
        result["peak_mem_ratio"] = e["peak"] / h["peak"]
        result["max_loss_diff"] = max(abs(a - b) for a, b in zip(e["losses"], h["losses"]))
    return result


def find_max_seq(spec: BenchSpec, side: str, limit: int, log: Callable[[str], None] = print) -> dict:
    """The longest sequence (batch spec.batch) one training step of `side` fits in memory: double from
    spec.seq until a step runs out of memory or `limit` is reached, then bisect to 1/8 of the last
    doubling. One worker process per side, alone on the device. On CPU give cpu_mem_limit_gb."""
    if spec.torch_device.type == "cpu" and not spec.cpu_mem_limit_gb:
        raise EngineError("the CPU search needs a memory cap (--cpu-mem-limit-gb): past it the kernel's OOM "
                          "killer would hit processes of the whole machine", field="--cpu-mem-limit-gb")
    worker = Worker(side, spec).wait_ready()
    tried: dict[int, Any] = {}

    def fits(seq: int) -> bool:
        if worker.proc.is_alive():
            try:
                r = worker.ask("seq", seq)
            except (RuntimeError, EngineError) as e:  # died: killed for memory
                r = {"oom": str(e).splitlines()[0]}
        else:
            r = {"oom": "worker gone"}
        tried[seq] = r
        log(f"  {side} seq {seq}: " + (f"out of memory ({r['oom']})" if "oom" in r else
                                       f"ok, {r['s']:.2f} s, step peak {gib(r.get('step_peak'))} GiB"))
        return "oom" not in r

    good, bad, seq = 0, None, spec.seq
    while seq <= limit and fits(seq):
        good, seq = seq, seq * 2
    if seq <= limit:
        bad = seq
        step = max(1, (bad - good) // 8)
        while bad - good > step and worker.proc.is_alive():
            mid = (good + bad) // 2
            if fits(mid):
                good = mid
            else:
                bad = mid
    if worker.proc.is_alive():
        worker.proc.kill()
    return {"side": side, "max_seq": good, "first_failure": bad, "limit": limit, "tried": tried}


def format_table(result: dict) -> str:
    spec = result["spec"]
    name = Path(spec["model_config"]).stem
    scored = spec["seq"] - max(1, int(spec["seq"] * spec["prompt_frac"]))
    lines = [f"{name}, batch {spec['batch']} x {spec['seq']} tokens ({scored} scored per row), loss "
             f"{spec['loss']}, LoRA r={spec['rank']} alpha={spec['alpha']:g} on q/k/v/o, {result['dtype']} on "
             f"{result['device']}, {result['threads']} threads, load {result['load'][0][0]:.2f} -> "
             f"{result['load'][1][0]:.2f}, {spec['steps']} timed steps after {spec['warmup']} warm-up (alternating)"]
    head = ("side", "tok/s", "step s (median)", "min-max s", "CPU s", "peak GiB", "step-peak GiB", "built GiB",
            "TFLOP/s", "MFU", "loss first -> last")
    cells = []
    for side, r in result["rows"].items():
        built = r.get("built_now")
        cells.append((side, f"{r['tok_s']:.1f}", f"{r['step_s']:.3f}", f"{r['min_s']:.3f}-{r['max_s']:.3f}",
                      f"{r['cpu_s']:.2f}", gib(r.get("peak")), gib(r.get("step_peak")), gib(built),
                      f"{r['tflops']:.3f}",
                      "-" if r["mfu"] is None else f"{r['mfu']:.1%}",
                      f"{r['losses'][0]:.6f} -> {r['losses'][-1]:.6f}"))
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.append(f"FLOPs/step {result['step_flops']:.4g}: 4 N_lin per token (frozen base) + 6 per LoRA param per token "
                 "+ 4 V H per scored token (LM head) + causal attention 6 L heads head_dim T(T+1) per row"
                 + (f"; MFU against {result['peak_flops'] / 1e12:.0f} TFLOP/s dense bf16"
                    if result["peak_flops"] else ""))
    lines.append("CPU s = the worker's CPU time for the step (all its threads; steadier than wall time on a shared "
                 "machine)")
    lines.append("peak = the process's whole-life peak (CPU: ru_maxrss of its own child process; CUDA: max "
                 "allocated); step-peak = since the model was built")
    if "tok_s_ratio" in result:
        lines.append(f"max |loss_engine - loss_hf| over all steps: {result['max_loss_diff']:.2e}")
        lines.append(f"engine/hf tok_s ratio={result['tok_s_ratio']:.3f} peak_mem ratio={result['peak_mem_ratio']:.3f}")
    return "\n".join(lines)


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--loss", default="sft")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    spec = BenchSpec(model_config=args.model_config, batch=args.batch, seq=args.seq, loss=args.loss,
                     steps=args.steps)
    print(format_table(run_bench(spec)))


if __name__ == "__main__":
    main()
