"""engine.train.optim against torch.optim.AdamW + LambdaLR + clip_grad_norm_, HF's cosine schedule, and itself
(bit-exact resume). Problem: a small two-layer MLP regression with odd shapes, two param groups."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.errors import EngineError
from engine.train.optim import META_FILE, STATE_FILE, AdamW, CosineSchedule, clip_grad_norm
import engine.train.optim as optim_module

SHAPES = {"w1": (13, 7), "b1": (13,), "w2": (5, 13), "b2": (5,), "scale": (5,)}
GROUP_NAMES = (("w1", "b1"), ("w2", "b2", "scale"))
GROUP_HP = ({"lr": 3e-2, "weight_decay": 0.1},
            {"lr": 1e-2, "weight_decay": 0.02, "betas": (0.8, 0.95)})
MAX_NORM = 1.0
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def init_params(dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {k: (0.5 * torch.randn(s, generator=g, dtype=torch.float64)) for k, s in SHAPES.items()}
    out["scale"] += 1.0
    return {k: v.to(device, dtype).requires_grad_() for k, v in out.items()}


def loss_at(params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    """Batch `step` of a regression whose targets jump every 4th step (large gradients -> clipping)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(9, 7, generator=g, dtype=torch.float64)
    y = torch.randn(9, 5, generator=g, dtype=torch.float64) * (6.0 if step % 4 == 0 else 0.3)
    p = params
    x, y = x.to(p["w1"].device, p["w1"].dtype), y.to(p["w1"].device, p["w1"].dtype)
    h = torch.tanh(x @ p["w1"].T + p["b1"])
    return (((h @ p["w2"].T + p["b2"]) * p["scale"] - y) ** 2).mean()


def groups_of(params: dict[str, torch.Tensor]) -> list[dict]:
    return [{"params": [params[n] for n in names], **hp} for names, hp in zip(GROUP_NAMES, GROUP_HP)]


def reference_run(params, schedule, steps, grads_from=None):
    """torch.optim.AdamW + LambdaLR(schedule.factor) + clip_grad_norm_; yields (norm, lrs, params)."""
    opt = torch.optim.AdamW(groups_of(params), eps=1e-8)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule.factor)
    plist = list(params.values())
    for step in range(steps):
        opt.zero_grad()
        if grads_from is None:
            loss_at(params, step).backward()
        else:
            for p, g in zip(plist, grads_from(step)):
                p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(plist, MAX_NORM)
        lrs = [g["lr"] for g in opt.param_groups]
        opt.step()
        lr_sched.step()
        yield float(norm), lrs, params


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("scratch", [None, 37])
def test_matches_torch_adamw_every_step(dtype, tol, device, scratch, monkeypatch):
    """scratch=37: the denominator is formed in many odd-sized chunks (a chunk boundary inside
    a parameter and at the bucket's end)."""
    if scratch:
        monkeypatch.setattr(optim_module, "SCRATCH_ELEMS", scratch)
    steps = 100
    schedule = CosineSchedule(1.0, steps, warmup_ratio=0.05)
    mine = init_params(dtype, device)
    ref = init_params(dtype, device)
    opt = AdamW(groups_of(mine), schedule=schedule)
    clipped = unclipped = 0
    for step, (ref_norm, ref_lrs, _) in enumerate(reference_run(ref, schedule, steps)):
        opt.zero_grad()
        loss_at(mine, step).backward()
        norm = clip_grad_norm(opt, MAX_NORM)
        opt.step()
        assert math.isclose(norm, ref_norm, rel_tol=tol), (step, norm, ref_norm)
        assert opt.last_lrs == pytest.approx(ref_lrs, rel=1e-15, abs=0)
        for name in SHAPES:
            torch.testing.assert_close(mine[name], ref[name], rtol=tol, atol=tol, msg=f"{name} @ {step}")
        clipped += norm > MAX_NORM
        unclipped += norm <= MAX_NORM
    assert clipped >= 10 and unclipped >= 10, (clipped, unclipped)
    # the run really moved the weights (a no-op optimizer would also "match" a frozen start)
    assert (mine["w1"] - init_params(dtype, device)["w1"]).abs().max() > 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_params_with_float32_master(device):
    """bf16 params: moments and master in float32; the master tracks torch AdamW on a float32 copy fed
    the same (bf16) gradients, and the bf16 params are exactly the master rounded to bf16."""
    steps = 60
    schedule = CosineSchedule(1.0, steps, warmup_steps=4, min_lr_ratio=0.1)
    mine = init_params(torch.bfloat16, device)
    ref = {k: v.detach().float().requires_grad_() for k, v in mine.items()}
    opt = AdamW(groups_of(mine), schedule=schedule)
    grads = {}

    def my_grads(step):
        opt.zero_grad()
        loss_at(mine, step).backward()
        grads[step] = [p.grad.float() for p in mine.values()]
        return grads[step]

    clipped = 0
    for step, (ref_norm, _, _) in enumerate(reference_run(ref, schedule, steps, grads_from=my_grads)):
        norm = opt.clip_grad_norm(MAX_NORM)
        # bf16 grads keep their unclipped values: the coefficient is applied in float32 inside step()
        assert all(torch.equal(p.grad.float(), g) for p, g in zip(mine.values(), grads[step]))
        opt.step()
        clipped += norm > MAX_NORM
        assert math.isclose(norm, ref_norm, rel_tol=1e-6)
        for b in opt._buckets:
            assert b.master.dtype == b.exp_avg.dtype == b.exp_avg_sq.dtype == torch.float32
            assert torch.equal(b.flat, b.master.to(torch.bfloat16))
        for name in SHAPES:
            master = master_of(opt, mine[name])
            torch.testing.assert_close(master, ref[name].detach(), rtol=1e-5, atol=1e-6)
            bound = 2.0 ** -8 * ref[name].detach().abs() + 1e-5
            assert ((mine[name].float() - ref[name].detach()).abs() <= bound).all(), (name, step)
    assert clipped >= 5
    # the master holds precision bf16 cannot: otherwise the small late updates would be lost
    assert any(not torch.equal(b.master, b.flat.float()) for b in opt._buckets)


def master_of(opt: AdamW, param: torch.Tensor) -> torch.Tensor:
    """The float32 master slice that backs a bf16 parameter."""
    for b in opt._buckets:
        for p, o in zip(b.params, b.offsets):
            if p is param:
                return b.master[o:o + p.numel()].view(p.shape)
    raise KeyError("not an optimizer parameter")


def train(params, opt, start, stop):
    for step in range(start, stop):
        opt.zero_grad()
        loss_at(params, step).backward()
        opt.clip_grad_norm(MAX_NORM)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_exact(dtype, tmp_path):
    k, total = 6, 12
    schedule = CosineSchedule(1.0, total, warmup_steps=3)
    full = init_params(dtype)
    opt_full = AdamW(groups_of(full), schedule=schedule)
    train(full, opt_full, 0, total)

    first = init_params(dtype)
    opt_first = AdamW(groups_of(first), schedule=schedule)
    train(first, opt_first, 0, k)
    opt_first.save(tmp_path)
    save_file({n: p.detach() for n, p in first.items()}, tmp_path / "params.safetensors")
    tensors_before, meta_before = opt_first.state_dict()

    resumed = {n: p.requires_grad_() for n, p in load_file(tmp_path / "params.safetensors").items()}
    opt_resumed = AdamW(groups_of(resumed), schedule=CosineSchedule(1.0, total, warmup_steps=3))
    opt_resumed.load(tmp_path)
    tensors_after, meta_after = opt_resumed.state_dict()
    assert meta_after == meta_before and opt_resumed.step_count == k
    assert tensors_after.keys() == tensors_before.keys()
    assert all(torch.equal(tensors_after[key], tensors_before[key]) for key in tensors_before)
    train(resumed, opt_resumed, k, total)
    for name in SHAPES:
        assert torch.equal(resumed[name], full[name]), name
    for b_full, b_res in zip(opt_full._buckets, opt_resumed._buckets):
        assert torch.equal(b_full.exp_avg_sq, b_res.exp_avg_sq)
        if dtype == torch.bfloat16:
            assert torch.equal(b_full.master, b_res.master)


def test_flat_buffers_collect_autograd_grads_in_place():
    params = init_params(torch.float32)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = AdamW(groups_of(params))
    assert len(opt._buckets) == 2
    for b in opt._buckets:
        base = b.flat.data_ptr()
        for p in b.params:
            assert p.untyped_storage().data_ptr() == base
            assert p.grad.untyped_storage().data_ptr() == b.flat_grad.data_ptr()
            assert (p.data_ptr() - base) % (32 * p.element_size()) == 0
    assert all(torch.equal(params[n], before[n]) for n in SHAPES)
    loss_at(params, 0).backward()
    loss_at(params, 1).backward()  # accumulation happens in the flat buffer
    expected = torch.autograd.grad(loss_at(params, 0) + loss_at(params, 1), list(params.values()))
    for b in opt._buckets:
        for p in b.params:
            assert p.grad.untyped_storage().data_ptr() == b.flat_grad.data_ptr()
    for p, g in zip(params.values(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)
    # the padding between views stays zero, so it never gets an update
    opt.step()
    mask = torch.ones_like(opt._buckets[0].flat, dtype=torch.bool)
    for p, o in zip(opt._buckets[0].params, opt._buckets[0].offsets):
        mask[o:o + p.numel()] = False
    assert mask.any() and (opt._buckets[0].flat[mask] == 0).all()


def test_grads_detached_by_caller_are_adopted():
    """`model.zero_grad()` (grads -> None) then backward: autograd makes fresh grads; same result."""
    a, b = init_params(torch.float32), init_params(torch.float32)
    opt_a, opt_b = AdamW(groups_of(a)), AdamW(groups_of(b))
    for step in range(3):
        opt_a.zero_grad()
        for p in b.values():
            p.grad = None
        loss_at(a, step).backward()
        loss_at(b, step).backward()
        if step == 1:
            b["b2"].grad = None  # a param that got no gradient this step counts as zero
            a["b2"].grad.zero_()
        assert opt_a.clip_grad_norm(MAX_NORM) == opt_b.clip_grad_norm(MAX_NORM)
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(a[n], b[n]) for n in SHAPES)


def test_nonfinite_norm_is_reported_not_applied():
    params = init_params(torch.float32)
    opt = AdamW(groups_of(params))
    loss_at(params, 0).backward()
    params["w2"].grad[1, 2] = float("inf")
    grads = [p.grad.clone() for p in params.values()]
    weights = [p.detach().clone() for p in params.values()]
    assert clip_grad_norm(opt, MAX_NORM) == math.inf
    assert all(torch.equal(p.grad, g) for p, g in zip(params.values(), grads))
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(params.values(), weights))
    opt.zero_grad()
    loss_at(params, 1).backward()
    assert math.isfinite(opt.clip_grad_norm(MAX_NORM))
    opt.step()
    assert opt.step_count == 1


def test_clip_plain_params_matches_torch():
    mine, ref = init_params(torch.float32), init_params(torch.float32)
    loss_at(mine, 0).backward()
    loss_at(ref, 0).backward()
    norm = clip_grad_norm(mine.values(), 0.5)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.values(), 0.5)
    assert norm > 0.5 and math.isclose(norm, float(ref_norm), rel_tol=1e-6)
    for n in SHAPES:
        torch.testing.assert_close(mine[n].grad, ref[n].grad, rtol=1e-6, atol=1e-8)
    mine["b1"].grad[0] = float("nan")
    kept = mine["w1"].grad.clone()
    assert math.isnan(clip_grad_norm(mine.values(), 0.5)) and torch.equal(mine["w1"].grad, kept)


@pytest.mark.parametrize("total,warmup,ratio,min_ratio",
                         [(100, None, 0.05, 0.0), (37, 4, None, 0.1), (10, 0, None, 0.0), (7, None, 0.3, 0.5)])
def test_cosine_schedule_matches_hf(total, warmup, ratio, min_ratio):
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup
    peak = 5e-6
    sched = CosineSchedule(peak, total, warmup_steps=warmup, warmup_ratio=ratio, min_lr_ratio=min_ratio)
    n_warm = warmup if warmup is not None else math.ceil(total * ratio)
    assert sched.warmup_steps == n_warm
    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    hf = get_cosine_with_min_lr_schedule_with_warmup(holder, n_warm, total, min_lr_rate=min_ratio)
    for step in range(total):
        assert sched.lr_at(step) == pytest.approx(hf.get_last_lr()[0], rel=1e-12, abs=1e-20), step
        holder.step()  # a no-op (no grads); keeps LambdaLR from warning about the call order
        hf.step()
    assert sched.lr_at(n_warm) == pytest.approx(peak)
    assert sched.lr_at(total + 5) == pytest.approx(peak * min_ratio, abs=1e-20)


def test_groups_scale_by_the_same_schedule_factor():
    params = init_params(torch.float32)
    sched = CosineSchedule(2e-3, 20, warmup_steps=5)
    opt = AdamW(groups_of(params), schedule=sched)
    for step in range(8):
        opt.step()
        f = sched.lr_at(step) / 2e-3
        assert opt.last_lrs == pytest.approx([3e-2 * f, 1e-2 * f], rel=1e-15, abs=0)
    opt.step(lr_scale=0.25)  # an explicit scale overrides the schedule
    assert opt.last_lrs == pytest.approx([3e-2 * 0.25, 1e-2 * 0.25])


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        CosineSchedule(1e-3, 10, warmup_steps=2, warmup_ratio=0.1)
    with pytest.raises(ValueError):
        CosineSchedule(1e-3, 0)
    with pytest.raises(ValueError):
        CosineSchedule(1e-3, 10, warmup_steps=11)
    p = init_params(torch.float32)
    with pytest.raises(ValueError, match="more than once"):
        AdamW([{"params": [p["w1"]]}, {"params": [p["w1"]]}])
    with pytest.raises(ValueError, match="allowed keys"):
        AdamW([{"params": [p["w1"]], "weight_deacy": 0.1}])
    with pytest.raises(ValueError, match="requires_grad"):
        AdamW([torch.zeros(3)])
    with pytest.raises(ValueError, match="betas"):
        AdamW([p["b1"]], betas=(0.9, 1.0))


def test_load_rejects_bad_state(tmp_path):
    params = init_params(torch.float32)
    opt = AdamW(groups_of(params))
    train(params, opt, 0, 2)
    with pytest.raises(EngineError, match="missing"):
        opt.load(tmp_path / "nowhere")
    opt.save(tmp_path)
    other = init_params(torch.float32)
    other["w1"] = torch.zeros(13, 8, requires_grad=True)  # a different layout
    with pytest.raises(EngineError, match="layout") as err:
        AdamW(groups_of(other)).load(tmp_path)
    assert err.value.field == "buckets" and str(tmp_path) in str(err.value)
    meta = json.loads((tmp_path / META_FILE).read_text())
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "step": 5}))
    with pytest.raises(EngineError, match="different saves"):
        opt.load(tmp_path)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(EngineError, match="JSON"):
        opt.load(tmp_path)
    tensors, meta = opt.state_dict()
    with pytest.raises(EngineError, match="float32"):
        opt.load_state_dict({**tensors, "bucket.0.exp_avg": tensors["bucket.0.exp_avg"].double()}, meta)
    with pytest.raises(EngineError, match="hyperparameters"):
        opt.load_state_dict(tensors, {**meta, "groups": [{"lr": -1}] * 2})
    (tmp_path / STATE_FILE).write_bytes(b"garbage")
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(EngineError, match="safetensors"):
        opt.load(tmp_path)
