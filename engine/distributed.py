"""Data-parallel training over torch.distributed (launched by `torchrun --nproc-per-node N cli.py ...`).

Design (DDP-style, by hand rather than `DistributedDataParallel`, because the trainable state is a
few flat buffers in `engine.train.optim.AdamW`):
- every rank holds the whole LoRA adapter (replicated) and takes a deterministic share of each
  step's units (groups / DPO pairs), balanced by token count (`share_units`);
- the step normaliser is all-reduced before the forward passes, so each rank's loss is already
  divided by the global count and the SUM of the ranks' gradients is the single-process gradient:
  one all-reduce per flat gradient buffer after backward (`all_reduce_gradients`);
- clipping, AdamW and the schedule then run identically on every rank; only rank 0 writes files.
- FSDP2 (`shard_frozen_base`, config `fsdp = true`): the frozen base weights of every decoder layer
  and of the root (embedding, final norm, head) are sharded with `fully_shard`, the LoRA parameters
  are `ignored_params` (plain replicated tensors), so the optimizer and the all-reduce stay as above.

Collectives carry tensors only (small JSON payloads are sent as uint8 tensors): nothing is pickled.
A single process (no torchrun) gets `DistContext()` with world size 1 and every helper is a no-op.

Checkpoints hold adapter + optimizer + RNG + step, nothing per rank, so a run resumes on any number
of ranks (rank 0's RNG state is saved; every rank is re-seeded with it). With lora_dropout > 0 an
N-rank run draws other dropout masks than a 1-rank run (the rows are spread differently), so only
dropout-free runs are equal across rank counts.

Tested here (tests/test_distributed.py, CPU, gloo, 2 torchrun processes): all six losses with the
FSDP2-sharded base equal one process to 1e-6; DDP-style (no FSDP) DPO with the broadcast reference
log-probs; resume 1 -> 2 and 2 -> 1 ranks; rank 0 alone writes; the collectives helpers; `cli.py
eval` / `cli.py rollout` sharded over 2 ranks write the one-process files byte for byte. Not tested
(no GPU on the development machine): NCCL, one GPU per rank, bf16 weights under FSDP (FSDP2 keeps the
dtype it is given; the LoRA parameters stay float32 as without FSDP), FSDP with gradient
checkpointing, multi-node (a resume there needs the output directory on a shared filesystem).
Memory: under FSDP every rank first loads the whole base on the host, then `fully_shard` moves its
shards to its GPU (host RAM ~ ranks x model size while loading).
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from engine.devices import resolve_device
from engine.errors import EngineError, TrainingDiverged

T = TypeVar("T")

# Python references to the tensors of the last collectives. A gloo worker thread that drops the last
# reference to a Python-visible tensor must take the GIL; during interpreter teardown it cannot, and
# the process dies with SIGABRT ("terminate called without an active exception") after its work is
# done. Holding the recent ones here made that rare (measured: ~1 run in 10 before, ~1 in 100 after);
# cli.py also ends a distributed run with os._exit once everything is written.
_RECENT: collections.deque = collections.deque(maxlen=64)


def _keep(*tensors: torch.Tensor) -> None:
    _RECENT.extend(tensors)


@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")   # where collectives' tensors live

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> DistContext:
    """The process group from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT),
    initialised once: NCCL with one GPU per local rank when CUDA is used, else gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        # Generous timeout: rank 0 alone computes the cached reference log-probs (DPO, GRPO's KL)
        # while the others wait, which on a large rollout set can outlast NCCL's 10-minute default.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=90))
    use_cuda = dist.get_backend() == "nccl"
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


def shutdown() -> None:
    """Leave the process group together (a barrier first, so no rank tears down its connections
    while another still uses them)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def training_device(ctx: DistContext, requested: str | None) -> torch.device | None:
    """The device this rank trains on: its own GPU under NCCL, else what the config asked for."""
    if ctx.enabled and ctx.device.type == "cuda":
        return ctx.device
    return resolve_device(requested) if requested else None


# ---- work sharing ------------------------------------------------------------------------------
def share_units(units: Sequence[Sequence[int]], lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Which of a step's units (indices into `units`) each rank takes: longest first to the least
    loaded rank (load = tokens), ties to the lower rank. Deterministic, so every rank computes the
    same assignment without talking; a unit is never split (groups / pairs stay whole)."""
    cost = [sum(lengths[i] for i in u) for u in units]
    order = sorted(range(len(units)), key=lambda u: (-cost[u], u))
    load, shares = [0] * world_size, [[] for _ in range(world_size)]
    for u in order:
        r = min(range(world_size), key=lambda k: (load[k], k))
        shares[r].append(u)
        load[r] += cost[u]
    return [sorted(s) for s in shares]


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Contiguous, balanced slice of range(n) for `rank` (the first n % world ranks get one more),
    so concatenating the ranks' results in rank order restores the original order."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


# ---- collectives (no-ops on one process) -------------------------------------------------------
def all_reduce_tensor_(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM over ranks (moved to the collective device and back when they differ)."""
    if not ctx.enabled:
        return tensor
    buf = tensor if tensor.device == ctx.device else tensor.to(ctx.device)
    _keep(buf)
    dist.all_reduce(buf)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def all_reduce_gradients(ctx: DistContext, optimizer) -> None:
    """SUM every flat gradient buffer of `engine.train.optim.AdamW` over ranks: one all-reduce per
    (group, dtype, device) bucket, launched together, then waited on."""
    if not ctx.enabled:
        return
    optimizer._adopt_grads()  # grads re-attached as views of the flat buffers (see engine.train.optim)
    _keep(*(b.flat_grad for b in optimizer._buckets))
    works = [dist.all_reduce(b.flat_grad, async_op=True) for b in optimizer._buckets]
    for w in works:
        w.wait()


def broadcast_tensors_(ctx: DistContext, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite `tensors` on every rank with rank `src`'s values (replicas start identical)."""
    if not ctx.enabled:
        return
    for t in tensors:
        buf = t.data if t.device == ctx.device else t.data.to(ctx.device)
        _keep(buf)
        dist.broadcast(buf, src)
        if buf is not t.data:
            t.data.copy_(buf)


def _bytes_tensor(obj: Any, device: torch.device) -> torch.Tensor:
    data = json.dumps(obj).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if data else \
        torch.zeros(0, dtype=torch.uint8, device=device)


def gather_json(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's JSON-able `obj`, in rank order, on every rank (sent as bytes, never pickled)."""
    if not ctx.enabled:
        return [obj]
    data = _bytes_tensor(obj, ctx.device)
    sizes = torch.zeros(ctx.world_size, dtype=torch.int64, device=ctx.device)
    sizes[ctx.rank] = data.numel()
    dist.all_reduce(sizes)
    longest = int(sizes.max())
    padded = torch.zeros(longest, dtype=torch.uint8, device=ctx.device)
    padded[:data.numel()] = data
    chunks = [torch.empty(longest, dtype=torch.uint8, device=ctx.device) for _ in range(ctx.world_size)]
    _keep(data, sizes, padded, *chunks)
    dist.all_gather(chunks, padded)
    return [json.loads(c[:int(n)].cpu().numpy().tobytes().decode()) for c, n in zip(chunks, sizes.tolist())]


def broadcast_json(ctx: DistContext, obj: Any, src: int = 0) -> Any:
    """Rank `src`'s JSON-able `obj` on every rank."""
    if not ctx.enabled:
        return obj
    return gather_json(ctx, obj if ctx.rank == src else None)[src]


_ERRORS = {"EngineError": EngineError, "TrainingDiverged": TrainingDiverged}


def on_main(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only (file writes, the output lock, the resume decision) and give every
    rank its JSON-able result; an EngineError / TrainingDiverged (or OSError) raised there is raised
    on every rank with the same message, so no rank is left waiting in a collective."""
    if not ctx.enabled:
        return fn()
    outcome: dict[str, Any] = {}
    error: BaseException | None = None
    if ctx.is_main:
        try:
            outcome = {"ok": fn()}
        except (EngineError, TrainingDiverged, OSError) as e:
            error = e
            fields = {k: getattr(e, k, None) for k in ("message", "path", "line", "field")}
            outcome = {"error": type(e).__name__, "text": str(e), **fields}
    outcome = broadcast_json(ctx, outcome)
    if error is not None:
        raise error
    if "error" in outcome:
        if outcome["error"] == "EngineError" or outcome["error"] not in _ERRORS:
            raise EngineError(outcome["message"] or outcome["text"], path=outcome["path"],
                              line=outcome["line"], field=outcome["field"])
        raise TrainingDiverged(outcome["text"])
    return outcome["ok"]


# ---- FSDP2 -------------------------------------------------------------------------------------
def shard_frozen_base(ctx: DistContext, model: torch.nn.Module, device: torch.device) -> None:
    """Shard the frozen base with FSDP2 `fully_shard`: one unit per decoder layer plus the root
    (embedding, final norm, head, tied or not). Trainable parameters (the LoRA A/B) are passed as
    `ignored_params`: FSDP leaves them whole, so they stay replicated plain tensors that AdamW
    flattens and `all_reduce_gradients` sums, exactly as without FSDP. `forward_hidden` (what the
    log-prob path calls instead of `forward`) is registered as an FSDP forward method.

    Call after `apply_lora` and before the optimizer is built. FSDP moves the managed weights to
    the mesh's device; the ignored (LoRA) parameters are moved here."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (ctx.world_size,))
    trainable = {p for p in model.parameters() if p.requires_grad}
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, ignored_params=trainable & set(layer.parameters()))
    fully_shard(model, mesh=mesh, ignored_params=trainable)
    register_fsdp_forward_method(model, "forward_hidden")
    with torch.no_grad():
        for p in trainable:
            if p.device != device:
                p.data = p.data.to(device)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)
