"""Hand-written AdamW over flat parameter buffers, global-norm clipping, cosine schedule.

Update rule (identical to `torch.optim.AdamW`, decoupled weight decay, bias correction), per step t:
    p <- p * (1 - lr*wd);  m <- lerp(m, g, 1-b1);  v <- b2*v + (1-b2)*g*g
    p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
The update of each bucket is one call of `triton_kernels.adamw.adamw_step_`: the fused Triton kernel on
CUDA (float32 state), its torch path (the same ops, the denominator a chunk at a time) elsewhere.

Multi-tensor design (why flat buffers): every parameter of a (group, dtype, device) bucket is re-pointed
(`p.data = view`) into ONE flat buffer and its `.grad` set to a view of ONE flat grad buffer. Autograd
accumulates into an existing `.grad` in place, so backward writes straight into the flat grad buffer:
no gather (`torch.cat`) before the update and no scatter after it, and the whole update, the clip norm
and `zero_grad` are a handful of kernels per bucket whatever the number of tensors (144+ LoRA matrices).
`torch._foreach_*` would need a per-tensor list walk and one launch per op per ~chunk of tensors, plus
per-tensor norms for clipping; flat views make each op a single contiguous kernel. Offsets are aligned
to `_ALIGN` elements so the views stay vector-aligned for Triton/cuBLAS; the padding stays exactly 0.

Low-precision (bf16/fp16) parameters get a float32 master copy: moments and master update in float32,
then the master is copied (rounded) into the bf16 buffer. Their gradients are upcast once per step;
the clip coefficient for them is applied in float32 inside `step` (no second bf16 rounding), so their
`.grad` keeps the unclipped values. float32/float64 buckets keep state in their own dtype, as torch.

Differences from torch to know: a parameter whose gradient is "missing" has a zero gradient here
(grads are never None), so weight decay and moment decay still apply to it; after changing parameter
values in place outside the optimizer, call `reload_params()` so bf16 masters pick up the change.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save as save_safetensors

from engine.errors import EngineError
from engine.fsio import atomic_file, write_json
from triton_kernels.adamw import adamw_step_

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_SUPPORTED = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_ALIGN = 32  # elements; 64 B for bf16, 128 B for float32
SCRATCH_ELEMS = 2**20  # the step's denominator scratch: a chunk, not a copy of the whole state
_FORMAT = "engine.optim.AdamW/1"  # a file-format tag (the module's old path), not an import path: kept so old checkpoints resume
_GROUP_KEYS = {"params", "lr", "weight_decay", "betas", "eps", "name"}
STATE_FILE, META_FILE = "optimizer.safetensors", "optimizer.json"


class CosineSchedule:
    """Linear warmup then cosine decay to `min_lr_ratio * peak_lr`, as HF's
    `get_cosine_with_min_lr_schedule_with_warmup` (the study's Trainer schedule):
    warmup lr(s) = peak * s / W (so step 0 runs at lr 0), then
    lr(s) = peak * (r + (1-r) * 0.5 * (1 + cos(pi * (s-W)/(T-W)))). Steps past T-1 stay at the floor.
    `warmup_ratio` gives W = ceil(T * ratio) (HF Trainer's rounding)."""

    def __init__(self, peak_lr: float, total_steps: int, warmup_steps: int | None = None,
                 warmup_ratio: float | None = None, min_lr_ratio: float = 0.0) -> None:
        if not peak_lr > 0:
            raise ValueError(f"peak_lr must be > 0, got {peak_lr}")
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps}")
        if warmup_steps is not None and warmup_ratio is not None:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        if warmup_ratio is not None:
            if not 0.0 <= warmup_ratio <= 1.0:
                raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
            warmup_steps = math.ceil(total_steps * warmup_ratio)
        warmup_steps = 0 if warmup_steps is None else warmup_steps
        if int(warmup_steps) != warmup_steps or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be an integer in [0, {total_steps}], got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.peak_lr, self.total_steps = float(peak_lr), int(total_steps)
        self.warmup_steps, self.min_lr_ratio = int(warmup_steps), float(min_lr_ratio)

    def factor(self, step: int) -> float:
        """lr(step) / peak_lr: the multiplier every param group's own lr is scaled by."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cosine * (1.0 - self.min_lr_ratio) + self.min_lr_ratio

    def lr_at(self, step: int) -> float:
        return self.peak_lr * self.factor(step)


@dataclass
class _Bucket:
    """One (group, dtype, device) slice of parameters laid out in flat buffers, all `[numel]`."""
    group: int
    params: list[torch.Tensor]
    offsets: list[int]
    flat: torch.Tensor               # parameter values, param dtype
    flat_grad: torch.Tensor          # gradients, param dtype (autograd writes here)
    exp_avg: torch.Tensor            # state dtype (float32 for bf16/fp16, else param dtype)
    exp_avg_sq: torch.Tensor
    scratch: torch.Tensor            # state dtype: the denominator of one chunk, reused
    master: torch.Tensor | None = None       # float32 master for low-precision params
    grad32: torch.Tensor | None = None       # float32 upcast of the grads for low precision
    views: list[torch.Tensor] = field(default_factory=list)
    grad_views: list[torch.Tensor] = field(default_factory=list)

    @property
    def shapes(self) -> list[list[int]]:
        return [list(p.shape) for p in self.params]


def _make_bucket(group: int, params: list[torch.Tensor]) -> _Bucket:
    dtype, device = params[0].dtype, params[0].device
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.numel() // _ALIGN) * _ALIGN
    state_dtype = torch.float32 if dtype in _LOW_PRECISION else dtype
    zeros = lambda dt: torch.zeros(total, dtype=dt, device=device)  # noqa: E731
    b = _Bucket(group, params, offsets, zeros(dtype), zeros(dtype), zeros(state_dtype),
                zeros(state_dtype), torch.empty(min(total, SCRATCH_ELEMS), dtype=state_dtype, device=device))
    with torch.no_grad():
        for p, off in zip(params, offsets):
            view = b.flat[off:off + p.numel()].view(p.shape)
            grad_view = b.flat_grad[off:off + p.numel()].view(p.shape)
            view.copy_(p.data)
            if p.grad is not None:
                grad_view.copy_(p.grad)
            p.data, p.grad = view, grad_view
            b.views.append(view)
            b.grad_views.append(grad_view)
        if dtype in _LOW_PRECISION:
            b.master, b.grad32 = b.flat.float(), zeros(torch.float32)
    return b


def _check_hparams(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


class AdamW:
    """AdamW over flat buffers. `params`: tensors (one group) or torch-style group dicts
    `{"params": [...], "lr"?, "weight_decay"?, "betas"?, "eps"?, "name"?}`; missing keys take the
    defaults. Each group's `lr` is its peak lr; per step it is scaled by `lr_scale` (explicit) or
    `schedule.factor(step_count)`. Constructing it re-points every `p.data` and `p.grad` into flat
    buffers (values preserved); keep using the same Parameter objects afterwards."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, schedule: CosineSchedule | None = None) -> None:
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        if not groups:
            raise ValueError("AdamW got no parameters")
        self.param_groups: list[dict[str, Any]] = []
        self.schedule = schedule
        self.step_count = 0
        self.last_lrs: list[float] = []
        self._grad_scale = 1.0      # pending clip coefficient for low-precision buckets
        self._nonfinite = False     # last clip saw inf/nan; step() refuses until zero_grad()
        self._buckets: list[_Bucket] = []
        seen: set[int] = set()
        for gi, g in enumerate(groups):
            unknown = set(g) - _GROUP_KEYS
            if unknown or "params" not in g:
                raise ValueError(f"param group {gi}: needs 'params', allowed keys {sorted(_GROUP_KEYS)}, "
                                 f"got {sorted(g)}")
            group = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, **g}
            group["betas"] = tuple(float(b) for b in group["betas"])
            _check_hparams(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            group["params"] = plist = list(g["params"])
            by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
            for p in plist:
                if not isinstance(p, torch.Tensor) or not p.is_leaf or not p.requires_grad:
                    raise ValueError(f"param group {gi}: every param must be a leaf tensor with requires_grad")
                if p.dtype not in _SUPPORTED:
                    raise ValueError(f"param group {gi}: unsupported dtype {p.dtype}")
                if id(p) in seen:
                    raise ValueError(f"param group {gi}: a parameter appears more than once")
                seen.add(id(p))
                by_kind.setdefault((p.dtype, p.device), []).append(p)
            self.param_groups.append(group)
            self._buckets += [_make_bucket(gi, ps) for ps in by_kind.values()]

    # ---- gradients -------------------------------------------------------------------------------
    def _adopt_grads(self) -> None:
        """Re-attach grad views a caller detached (e.g. `model.zero_grad()` sets grads to None, then
        autograd allocates fresh ones): copy the fresh values into the flat buffer, None -> zeros."""
        for b in self._buckets:
            for p, view, grad_view in zip(b.params, b.views, b.grad_views):
                if p.data_ptr() != view.data_ptr():
                    raise RuntimeError("a parameter's storage was replaced after AdamW flattened it "
                                       "(e.g. `p.data = ...` or `.to()`); build the optimizer after that")
                g = p.grad
                if g is None or g.data_ptr() != grad_view.data_ptr():
                    with torch.no_grad():
                        if g is None:
                            grad_view.zero_()
                        else:
                            grad_view.copy_(g)
                    p.grad = grad_view

    def zero_grad(self) -> None:
        """Zero the flat grad buffers in place (the views stay attached, so autograd keeps
        accumulating into them) and clear a pending clip scale / non-finite flag."""
        self._adopt_grads()
        for b in self._buckets:
            b.flat_grad.zero_()
        self._grad_scale, self._nonfinite = 1.0, False

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global 2-norm clip as `torch.nn.utils.clip_grad_norm_` (coef = max_norm/(norm+1e-6), <= 1),
        one norm kernel per flat buffer. Returns the pre-clip norm. A non-finite norm leaves the
        gradients untouched, is returned as is, and makes `step()` raise until `zero_grad()`."""
        self._adopt_grads()
        norms = []
        for b in self._buckets:
            acc = torch.float64 if b.flat_grad.dtype == torch.float64 else torch.float32
            n = torch.linalg.vector_norm(b.flat_grad, 2, dtype=acc)
            norms.append(n * self._grad_scale if b.master is not None else n)
        total_t, total = _combine_norms(norms)
        if not math.isfinite(total):
            self._nonfinite = True
            return total
        coef_t = torch.clamp(max_norm / (total_t + 1e-6), max=1.0)  # same expression as torch
        coef = float(coef_t)
        if coef < 1.0:
            for b in self._buckets:
                if b.master is None:
                    b.flat_grad.mul_(coef_t.to(b.flat_grad.device))
            self._grad_scale *= coef
        return total

    # ---- update ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr_scale: float | None = None) -> None:
        """One AdamW step on every bucket. lr = group lr * (lr_scale, else schedule factor, else 1)."""
        if self._nonfinite:
            raise RuntimeError("the last clip_grad_norm saw a non-finite norm; call zero_grad() to skip "
                               "this step instead of applying it")
        if lr_scale is None:
            lr_scale = self.schedule.factor(self.step_count) if self.schedule is not None else 1.0
        self._adopt_grads()
        self.step_count += 1
        t = self.step_count
        self.last_lrs = [g["lr"] * lr_scale for g in self.param_groups]
        for b in self._buckets:
            group = self.param_groups[b.group]
            lr, wd, eps = self.last_lrs[b.group], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            if b.master is not None:
                param, grad = b.master, b.grad32.copy_(b.flat_grad)
                if self._grad_scale != 1.0:
                    grad.mul_(self._grad_scale)
            else:
                param, grad = b.flat, b.flat_grad
            # One fused kernel on CUDA (float32 state), the same math in torch elsewhere.
            adamw_step_(param, grad, b.exp_avg, b.exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                        weight_decay=wd, step=t, scratch=b.scratch)
            if b.master is not None:
                b.flat.copy_(b.master)
        self._grad_scale = 1.0

    @torch.no_grad()
    def reload_params(self) -> None:
        """Refresh float32 masters from the (externally modified) low-precision parameter values."""
        for b in self._buckets:
            if b.master is not None:
                b.master.copy_(b.flat)

    # ---- state -----------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, meta): tensors `bucket.{i}.{exp_avg,exp_avg_sq,master}` (flat, references to the
        live buffers) and JSON-able meta (step, group hyperparameters, bucket layouts)."""
        tensors: dict[str, torch.Tensor] = {}
        buckets = []
        for i, b in enumerate(self._buckets):
            tensors[f"bucket.{i}.exp_avg"], tensors[f"bucket.{i}.exp_avg_sq"] = b.exp_avg, b.exp_avg_sq
            if b.master is not None:
                tensors[f"bucket.{i}.master"] = b.master
            buckets.append({"group": b.group, "dtype": str(b.flat.dtype).removeprefix("torch."),
                            "shapes": b.shapes})
        groups = [{"lr": g["lr"], "weight_decay": g["weight_decay"], "betas": list(g["betas"]),
                   "eps": g["eps"]} for g in self.param_groups]
        return tensors, {"format": _FORMAT, "step": self.step_count, "groups": groups, "buckets": buckets}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                        path: str | os.PathLike | None = None) -> None:
        """Restore a `state_dict()` into an optimizer built over the same parameter layout. Restores
        step, moments, group hyperparameters and the float32 masters (rounded into bf16 params)."""
        def fail(msg: str, fld: str) -> EngineError:
            return EngineError(msg, path=path, field=fld)
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise fail(f"expected optimizer state format {_FORMAT!r}", "format")
        step = meta.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise fail(f"expected a non-negative integer, got {step!r}", "step")
        _, mine = self.state_dict()
        if meta.get("buckets") != mine["buckets"]:
            raise fail("parameter layout (groups, dtypes, shapes) differs from this optimizer's: "
                       f"saved {meta.get('buckets')!r}, expected {mine['buckets']!r}", "buckets")
        saved_groups, groups = meta.get("groups"), []
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            raise fail(f"expected {len(self.param_groups)} param groups", "groups")
        for gi, g in enumerate(saved_groups):
            try:
                hp = (float(g["lr"]), tuple(float(x) for x in g["betas"]), float(g["eps"]),
                      float(g["weight_decay"]))
                _check_hparams(*hp)
            except (KeyError, TypeError, ValueError) as e:
                raise fail(f"bad hyperparameters: {e}", f"groups[{gi}]") from None
            groups.append(hp)
        expected = {f"bucket.{i}.{k}": (t.shape, t.dtype) for i, b in enumerate(self._buckets)
                    for k, t in (("exp_avg", b.exp_avg), ("exp_avg_sq", b.exp_avg_sq), ("master", b.master))
                    if t is not None}
        if set(tensors) != set(expected):
            raise fail(f"expected tensors {sorted(expected)}, got {sorted(tensors)}", "tensors")
        for key, (shape, dtype) in expected.items():
            if tensors[key].shape != shape or tensors[key].dtype != dtype:
                raise fail(f"expected {dtype} {tuple(shape)}, got {tensors[key].dtype} "
                           f"{tuple(tensors[key].shape)}", key)
        for i, b in enumerate(self._buckets):
            b.exp_avg.copy_(tensors[f"bucket.{i}.exp_avg"])
            b.exp_avg_sq.copy_(tensors[f"bucket.{i}.exp_avg_sq"])
            if b.master is not None:
                b.master.copy_(tensors[f"bucket.{i}.master"])
                b.flat.copy_(b.master)
        for group, (lr, betas, eps, wd) in zip(self.param_groups, groups):
            group.update(lr=lr, betas=betas, eps=eps, weight_decay=wd)
        self.step_count = step
        self._grad_scale, self._nonfinite = 1.0, False

    def save(self, path_dir: str | os.PathLike) -> None:
        """Write `optimizer.safetensors` (tensors) + `optimizer.json` (meta) into `path_dir`, atomically
        per file; the step is repeated in the safetensors metadata to catch a mismatched pair."""
        tensors, meta = self.state_dict()
        blob = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                metadata={"format": _FORMAT, "step": str(meta["step"])})
        path_dir = Path(path_dir)
        with atomic_file(path_dir / STATE_FILE, "wb") as f:
            f.write(blob)
        write_json(path_dir / META_FILE, meta)

    def load(self, path_dir: str | os.PathLike) -> None:
        """Read what `save` wrote and `load_state_dict` it; bad or missing files raise EngineError."""
        path_dir = Path(path_dir)
        meta_path, state_path = path_dir / META_FILE, path_dir / STATE_FILE
        for p in (meta_path, state_path):
            if not p.is_file():
                raise EngineError("optimizer state file is missing", path=p)
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EngineError(f"not valid JSON: {e}", path=meta_path) from None
        try:
            tensors = load_file(state_path)
            with safe_open(state_path, "pt") as f:
                file_meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise EngineError(f"not a readable safetensors file: {e}", path=state_path) from None
        if isinstance(meta, dict) and file_meta.get("step") != str(meta.get("step")):
            raise EngineError(f"step {file_meta.get('step')} does not match {META_FILE}'s "
                              f"{meta.get('step')} (files from different saves)", path=state_path,
                              field="step")
        self.load_state_dict(tensors, meta, path=path_dir)


def _combine_norms(norms: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Total 2-norm from per-buffer norms (widest dtype, first device) and its Python value."""
    if not norms:
        return torch.tensor(0.0), 0.0
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    total_t = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device, dtype) for n in norms]), 2)
    return total_t, float(total_t)


@torch.no_grad()
def clip_grad_norm(target: AdamW | Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip gradients to a global 2-norm `max_norm` and return the pre-clip norm (for logging).
    `target` is an `AdamW` (flat buffers, one norm kernel per buffer) or plain parameters
    (torch's rule, norms accumulated in float32 or wider). A non-finite norm leaves gradients
    untouched and is returned: the caller must skip the step."""
    if isinstance(target, AdamW):
        return target.clip_grad_norm(max_norm)
    grads = [p.grad for p in target if p.grad is not None]
    norms = [torch.linalg.vector_norm(g, 2, dtype=torch.float64 if g.dtype == torch.float64
                                      else torch.float32) for g in grads]
    total_t, total = _combine_norms(norms)
    if math.isfinite(total):
        coef_t = torch.clamp(max_norm / (total_t + 1e-6), max=1.0)
        if float(coef_t) < 1.0:
            for g in grads:
                g.mul_(coef_t.to(g.device))
    return total
