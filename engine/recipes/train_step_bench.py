"""The engine's half of the training-step benchmark, and the step profiler.

`python cli.py bench` (the side-by-side harness and the transformers + PEFT side live in
benchmarks/bench_train.py: transformers and peft are benchmark-only dependencies) and
`python cli.py profile --train-step` are built from these pieces: a `BenchSpec`; random weights
that both sides draw identically (`random_tensor`: one seeded generator per parameter name); the
synthetic batch (random ids, the first `prompt_frac` of each row prompt, the rest scored); and
`EngineRunner`, the engine's training step composed from the trainer's pieces (model + LoRA,
token log-probs, a loss from `losses`, AdamW with global-norm clipping at 1.0).

FLOPs per step (for MFU): 4 N_lin per token (frozen base: forward 2N, backward input-gradient 2N, no
weight gradient), 6 per LoRA parameter per token, the LM head 4 V H per *scored* token, and causal
attention 6 L heads head_dim T (T + 1) per row (forward and backward of QK^T and PV).
"""
from __future__ import annotations

import dataclasses
import math
import os
import resource
import statistics
import time
import zlib
from pathlib import Path
from typing import Callable

import torch

import losses
from losses import LossInputs

from engine.devices import resolve_device
from engine.model.qwen3_config import Qwen3Config
from engine.errors import EngineError
from engine.model.frozen import compacts_by_default, stays_narrow
from engine.fsio import write_json
from engine.outputs import claim
from engine.model.logprobs import hidden_logprobs, token_logprobs
from engine.model.lora import LoRAConfig, apply_lora
from engine.model.memory import release_cpu_heap
from engine.model.qwen3 import Qwen3ForCausalLM
from engine.train.optim import AdamW

BENCH_LOSSES = ("sft", "dpo", "grpo")
# Dense bf16 peaks from the datasheets (FLOP/s), by device-name substring, most specific first.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12))


@dataclasses.dataclass
class BenchSpec:
    model_config: str
    batch: int = 1
    seq: int = 512
    loss: str = "sft"
    steps: int = 3
    warmup: int = 1
    rank: int = 32
    alpha: float = 64.0
    lr: float = 1e-4
    prompt_frac: float = 0.25
    device: str | None = None
    threads: int | None = None
    seed: int = 0
    checkpointing: str = "auto"          # engine activation checkpointing: auto | on | off
    hf_checkpointing: bool = False       # HF's gradient_checkpointing_enable()
    cpu_mem_limit_gb: float | None = None  # address-space cap for CPU workers (the --max-seq search)
    checkpoint_dtype: str = "bfloat16"   # precision of the modelled checkpoint (Qwen3 ships bf16)

    def __post_init__(self) -> None:
        if self.loss not in BENCH_LOSSES:
            raise EngineError(f"expected one of {', '.join(BENCH_LOSSES)}, got {self.loss!r}", field="--loss")
        for name in ("batch", "seq", "steps", "rank"):
            if getattr(self, name) < 1:
                raise EngineError(f"expected a positive integer, got {getattr(self, name)}", field=f"--{name}")
        if self.loss == "dpo" and self.batch % 2:
            raise EngineError("DPO needs an even batch (rows 2i and 2i+1 are a pair)", field="--batch")
        if not 0 <= self.prompt_frac < 1 or int(self.seq * self.prompt_frac) >= self.seq - 1:
            raise EngineError(f"prompt_frac must leave scored tokens, got {self.prompt_frac}", field="--prompt-frac")
        if self.checkpointing not in ("auto", "on", "off"):
            raise EngineError(f"expected auto, on or off, got {self.checkpointing!r}", field="--checkpointing")
        if self.checkpoint_dtype not in ("bfloat16", "float32"):
            raise EngineError(f"expected bfloat16 or float32, got {self.checkpoint_dtype!r}",
                              field="--checkpoint-dtype")
        if not Path(self.model_config).is_file():
            raise EngineError("model config not found", path=self.model_config, field="--model-config")
        resolve_device(self.device, field="--device")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32

    @property
    def weights_dtype(self) -> torch.dtype:
        """The checkpoint's precision: every weight is rounded to it on both sides (identical values)."""
        return getattr(torch, self.checkpoint_dtype)

    def config(self) -> Qwen3Config:
        return Qwen3Config.from_json(self.model_config)

    def engine_checkpointing(self) -> bool:
        """auto: off; the CPU and GPU plans in BENCHMARKS.md say why (speed goal first)."""
        return self.checkpointing == "on"


# ---- shared by both sides ---------------------------------------------------------------------------
def random_tensor(name: str, shape: tuple[int, ...], seed: int, device: torch.device,
                  dtype: torch.dtype, checkpoint_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The value parameter `name` gets on either side: norms 1 + 0.1 N(0,1), the rest 0.02 N(0,1)
    (HF's initializer range), drawn in float32 on `device` from a generator seeded by the name, and
    rounded to `checkpoint_dtype` (the precision the modelled checkpoint ships in) before `dtype`."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    t = t.mul_(0.1).add_(1.0) if name.endswith("norm.weight") else t.mul_(0.02)
    return t.to(checkpoint_dtype).to(dtype)


def fill_random_(model: torch.nn.Module, seed: int, checkpoint_dtype: torch.dtype = torch.float32) -> None:
    """Overwrite every parameter of an HF-named Qwen3 model in place with `random_tensor`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(random_tensor(name, tuple(p.shape), seed, p.device, p.dtype, checkpoint_dtype))


def random_engine_model(config: Qwen3Config, seed: int, device: torch.device, dtype: torch.dtype,
                        checkpoint_dtype: torch.dtype = torch.float32,
                        compact_frozen: bool = False) -> Qwen3ForCausalLM:
    """An engine model whose weights are generated in place (no init pass, no second copy); with
    compact_frozen, matrices stay in checkpoint_dtype as `load_model(compact_frozen=True)` keeps them."""
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    for name, p in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        keep = compact_frozen and stays_narrow(checkpoint_dtype, p.dim(), dtype)
        t = random_tensor(name, tuple(p.shape), seed, device, checkpoint_dtype if keep else dtype, checkpoint_dtype)
        model.get_submodule(module_name)._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def make_batch(spec: BenchSpec, vocab: int, seq: int | None = None) -> dict[str, torch.Tensor]:
    """The synthetic batch both sides train on: ids [B, T], attention_mask [B, T] (no padding),
    score_mask [B, T] (True after the prompt), rewards [B], group_ids [B], pairs [B/2, 2] (DPO) and
    ref_logps [B, T] (stand-ins for cached reference log-probs)."""
    B, T = spec.batch, seq or spec.seq
    gen = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    score = torch.zeros(B, T, dtype=torch.bool)
    score[:, max(1, int(T * spec.prompt_frac)):] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "score_mask": score,
             "rewards": (torch.arange(B) % 2 == 0).float(), "group_ids": torch.arange(B) // 2,
             "ref_logps": -(0.5 + 2 * torch.rand(B, T, generator=gen)) * score}
    if spec.loss == "dpo":
        batch["pairs"] = torch.arange(B).view(-1, 2)
    return {k: v.to(spec.torch_device) for k, v in batch.items()}


def loss_of(spec: BenchSpec, logps: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The spec's loss (from `losses`) on [B, T] log-probs."""
    inputs = LossInputs(logps=logps, mask=batch["score_mask"], rewards=batch["rewards"],
                        group_ids=batch["group_ids"], ref_logps=batch["ref_logps"], pairs=batch.get("pairs"))
    return losses.get(spec.loss)(inputs)[0]


def init_lora_a(shapes: list[tuple[int, int]], seed: int) -> list[torch.Tensor]:
    """The A matrices `apply_lora(model, cfg, seed)` draws, in module order (for the HF side)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        a = torch.empty(shape)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        out.append(a)
    return out


# ---- the engine side --------------------------------------------------------------------------------
class EngineRunner:
    """The engine's training step, composed from the trainer's pieces: model + LoRA, token_logprobs,
    a loss from `losses`, AdamW with clipping."""

    def __init__(self, spec: BenchSpec) -> None:
        self.spec = spec
        # As the trainer loads a checkpoint: matrices kept at the checkpoint's precision for float32 on CPU.
        self.model = random_engine_model(spec.config(), spec.seed, spec.torch_device, spec.dtype, spec.weights_dtype,
                                         compact_frozen=compacts_by_default(spec.torch_device, spec.dtype))
        try:
            apply_lora(self.model, LoRAConfig(r=spec.rank, alpha=spec.alpha), seed=spec.seed)
        except EngineError as e:  # the flag the user gave, not LoRAConfig's name for it
            raise EngineError(e.message, field="--rank" if e.field == "r" else e.field) from None
        self.model.gradient_checkpointing = spec.engine_checkpointing()
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = AdamW([{"params": params, "lr": spec.lr, "weight_decay": 0.01}])
        if spec.torch_device.type == "cpu":
            release_cpu_heap()  # as the trainer does after its setup

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        logps = token_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch["score_mask"])
        loss = loss_of(self.spec, logps, batch)
        loss.backward()
        self.optimizer.clip_grad_norm(1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.detach())

    def phases(self, batch: dict[str, torch.Tensor], mark: Callable[[str], None]) -> float:
        """`step` cut at the hidden states so each phase can be timed: mark(name) ends a phase."""
        hidden, _ = self.model.forward_hidden(batch["input_ids"], batch["attention_mask"])
        mark("forward")
        leaf = hidden.detach().requires_grad_()
        logps = hidden_logprobs(self.model, leaf, batch["input_ids"], batch["attention_mask"], batch["score_mask"])
        loss = loss_of(self.spec, logps, batch)
        mark("log-prob + loss")
        loss.backward()
        mark("log-prob backward")
        hidden.backward(leaf.grad)
        mark("backward")
        self.optimizer.clip_grad_norm(1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        mark("optimizer")
        return float(loss.detach())


# ---- memory and timing ----------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's counters, or the kernel's RSS high-water mark (Linux clear_refs 5)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_report(device: torch.device) -> dict[str, float]:
    """Bytes: `peak` over the whole process (CPU ru_maxrss, CUDA max allocated since the last reset
    is `step_peak`; on CUDA `peak` is the larger of it and the build's)."""
    if device.type == "cuda":
        return {"step_peak": torch.cuda.max_memory_allocated(device), "now": torch.cuda.memory_allocated(device)}
    hwm = _proc_status_kb("VmHWM")
    return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_peak": hwm * 1024 if hwm is not None else None, "now": (_proc_status_kb("VmRSS") or 0) * 1024}


# ---- FLOPs --------------------------------------------------------------------------------------------
def step_flops(spec: BenchSpec, cfg: Qwen3Config, seq: int | None = None) -> float:
    """Model FLOPs of one training step (module docstring)."""
    T = seq or spec.seq
    H, L = cfg.hidden_size, cfg.num_hidden_layers
    linear = L * (2 * H * cfg.q_out + 2 * H * cfg.kv_out + 3 * H * cfg.intermediate_size)
    lora = L * spec.rank * (2 * (H + cfg.q_out) + 2 * (H + cfg.kv_out))
    tokens = spec.batch * T
    scored = spec.batch * (T - max(1, int(T * spec.prompt_frac)))
    attention = 6 * L * cfg.num_attention_heads * cfg.head_dim * T * (T + 1) * spec.batch
    return 4 * linear * tokens + 6 * lora * tokens + 4 * cfg.vocab_size * H * scored + attention


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.getdevice_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.getdevice_name(device)
    return f"cpu ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores)"


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def save_result(result: dict, path: str | os.PathLike) -> None:
    write_json(claim(path, "bench"), result)


# ---- where one engine step's time goes ----------------------------------------------------------
PHASES = ("forward", "log-prob + loss", "log-prob backward", "backward", "optimizer")


def profile_train_step(spec: BenchSpec, top_ops: int = 0,
                       log: Callable[[str], None] = print) -> dict:
    """Time one engine training step by phase (wall and CPU time, medians over `reps` after one
    warm-up; `spec.steps` of them), in this process. With top_ops > 0, also torch.profiler's busiest
    ops of one more step."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = spec.torch_device
    log("building the engine side ...")
    runner = EngineRunner(spec)
    batch = make_batch(spec, spec.config().vocab_size)
    samples: dict[str, list[tuple[float, float]]] = {p: [] for p in PHASES}
    for rep in range(spec.steps + 1):
        sync(device)
        clock = [time.perf_counter(), time.process_time()]

        def mark(phase: str, rep: int = rep) -> None:
            sync(device)
            now = [time.perf_counter(), time.process_time()]
            if rep > 0:
                samples[phase].append((now[0] - clock[0], now[1] - clock[1]))
            clock[:] = now
        runner.phases(batch, mark)
        log(f"  step {rep + 1}{' (warm-up)' if rep == 0 else ''} done")
    reset_peak(device)
    rows = [{"phase": p, "ms": 1e3 * statistics.median(s[0] for s in samples[p]),
             "cpu_ms": 1e3 * statistics.median(s[1] for s in samples[p])} for p in PHASES]
    total = sum(r["ms"] for r in rows)
    for r in rows:
        r["share"] = r["ms"] / total
    result = {"spec": dataclasses.asdict(spec), "device": device_name(device), "threads": torch.get_num_threads(),
              "load": os.getloadavg(), "phases": rows, "step_ms": total,
              "tok_s": spec.batch * spec.seq / total * 1e3, "step_flops": step_flops(spec, spec.config())}
    if top_ops:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            runner.step(batch)
            sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        result["ops_table"] = prof.key_averages().table(sort_by=key, row_limit=top_ops, max_name_column_width=48)
    return result


def format_profile(result: dict) -> str:
    spec = result["spec"]
    lines = [f"{Path(spec['model_config']).stem}, batch {spec['batch']} x {spec['seq']}, loss {spec['loss']}, "
             f"{result['device']}, {result['threads']} threads, load {result['load'][0]:.2f}; engine step by phase "
             f"(median of {spec['steps']} after a warm-up)"]
    lines.append(f"{'phase':20s} {'ms':>10s} {'CPU ms':>10s} {'share':>7s}")
    for r in result["phases"]:
        lines.append(f"{r['phase']:20s} {r['ms']:10.1f} {r['cpu_ms']:10.1f} {r['share']:7.1%}")
    lines.append(f"{'step':20s} {result['step_ms']:10.1f} {sum(r['cpu_ms'] for r in result['phases']):10.1f}"
                 f"   {result['tok_s']:.1f} tok/s, {result['step_flops'] / result['step_ms'] / 1e9:.3f} TFLOP/s")
    if "ops_table" in result:
        lines.append(result["ops_table"])
    return "\n".join(lines)
