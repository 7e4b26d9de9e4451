"""losses/: every loss against an independent float64 reference (plain Python loops, values and
hand-derived gradients: tests/loss_reference.py), gradcheck, the gradient-accumulation contract and
edge cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import losses
from engine.errors import EngineError
from losses import LossInputs, get, get_normalizer, merge_stats
from losses.rft import dedup_mask
from loss_reference import reference

# --------------------------------------------------------------------------------------------------
# Random batches: whole groups of uneven size, prompt/completion/padding masks, an all-masked row.
# --------------------------------------------------------------------------------------------------

GROUP_SIZES = (4, 3, 1, 4, 2, 3)


def make_batch(seed, group_sizes=GROUP_SIZES, n_tok=11, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    n_rows = sum(group_sizes)
    group_ids = torch.tensor([g * 7 + 3 for g, k in enumerate(group_sizes) for _ in range(k)])
    rewards = (torch.rand(n_rows, generator=gen) < 0.5).to(torch.float64)
    # Fixed structure on top of the random rewards: group 1 all correct, group 2 all wrong,
    # group 0 mixed (so GRPO sees equal-reward groups and DPO has pairs).
    starts = np.cumsum((0,) + tuple(group_sizes))
    rewards[starts[1]:starts[2]] = 1.0
    rewards[starts[2]:starts[3]] = 0.0
    rewards[starts[0]] = 1.0
    rewards[starts[0] + 1] = 0.0
    mask = torch.zeros(n_rows, n_tok, dtype=torch.bool)
    for i in range(n_rows):
        start = int(torch.randint(0, 4, (1,), generator=gen))
        stop = int(torch.randint(start + 1, n_tok + 1, (1,), generator=gen))
        mask[i, start:stop] = True
    mask[n_rows - 2] = False  # an all-masked row inside a group of several rollouts
    logps = -torch.rand(n_rows, n_tok, generator=gen, dtype=torch.float64) * 3
    ref_logps = logps + 0.3 * torch.randn(n_rows, n_tok, generator=gen, dtype=torch.float64)
    behavior = logps + 0.3 * torch.randn(n_rows, n_tok, generator=gen, dtype=torch.float64)
    pairs = []
    for g, k in enumerate(group_sizes):
        rows = range(starts[g], starts[g] + k)
        good = [i for i in rows if rewards[i] == 1]
        bad = [i for i in rows if rewards[i] == 0]
        pairs += [(w, l) for w in good for l in bad][:2]
    return dict(logps=logps.to(dtype), mask=mask, rewards=rewards, group_ids=group_ids,
                ref_logps=ref_logps.clamp_max(0).to(dtype), behavior_logps=behavior.to(dtype),
                pairs=torch.tensor(pairs, dtype=torch.long).reshape(-1, 2), starts=starts)


def plain(b):
    """The batch as Python lists / numpy, for the reference."""
    return dict(logps=b["logps"].double().numpy(), mask=b["mask"].tolist(), rewards=b["rewards"].tolist(),
                group_ids=b["group_ids"].tolist(), ref_logps=b["ref_logps"].double().tolist(),
                behavior_logps=b["behavior_logps"].double().tolist(), pairs=b["pairs"].tolist())


def inputs_of(b, logps=None, **overrides):
    fields = dict(logps=b["logps"] if logps is None else logps, mask=b["mask"], rewards=b["rewards"],
                  group_ids=b["group_ids"], ref_logps=b["ref_logps"], behavior_logps=b["behavior_logps"],
                  pairs=b["pairs"])
    fields.update(overrides)
    return LossInputs(**fields)


CASES = [
    ("sft", {}), ("sft", {"aggregation": "sequence_mean"}),
    ("rft", {}), ("rft", {"aggregation": "sequence_mean"}),
    ("dft", {}), ("dft", {"aggregation": "sequence_mean"}),
    ("rift", {}), ("rift", {"r_pos": 0.7, "r_neg": -0.5}),
    ("rift", {"variant": "literal", "lam": 0.6}), ("rift", {"aggregation": "sequence_mean"}),
    ("grpo", {}), ("grpo", {"std_scale": True}), ("grpo", {"bias_scope": "all_correct"}),
    ("grpo", {"bias": 0.0, "std_scale": True}), ("grpo", {"clip_eps": 0.2}), ("grpo", {"kl_beta": 0.05}),
    ("grpo", {"std_scale": True, "bias_scope": "all_correct", "clip_eps": 0.1, "kl_beta": 0.2,
              "aggregation": "sequence_mean"}),
    ("dpo", {}), ("dpo", {"beta": 0.3}), ("dpo", {"variant": "ipo", "beta": 0.5}),
    ("dpo", {"label_smoothing": 0.1}), ("dpo", {"label_smoothing": 0.2, "smoothing": "conservative"}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in h.items()) or 'default'}" for n, h in CASES]


@pytest.mark.parametrize(("name", "hparams"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_reference(name, hparams, seed):
    b = make_batch(seed * 100 + len(CASE_IDS))
    logps = b["logps"].clone().requires_grad_()
    loss, stats = get(name)(inputs_of(b, logps), **hparams)
    loss.backward()
    value, grad = reference(name, plain(b), hparams)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(value, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(logps.grad.numpy(), grad, rtol=1e-9, atol=1e-12)
    assert stats["loss"] == pytest.approx(value, rel=1e-10, abs=1e-12)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in stats.values())
    if "clip_eps" in hparams:  # both PPO branches are exercised
        assert 0.1 < stats["clip_fraction"] < 0.9


def test_float32_and_bf16_accumulate_in_float32():
    b = make_batch(7)
    _, grad = reference("grpo", plain(b), {})
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        logps = b["logps"].to(dtype).requires_grad_()
        loss, _ = get("grpo")(inputs_of(b, logps))
        loss.backward()
        assert loss.dtype == torch.float32 and logps.grad.dtype == dtype
        exact = reference("grpo", {**plain(b), "logps": logps.detach().double().numpy()}, {})[0]
        assert loss.item() == pytest.approx(exact, rel=1e-5)
        np.testing.assert_allclose(logps.grad.double().numpy(), grad, atol=tol * np.abs(grad).max())


# --------------------------------------------------------------------------------------------------
# gradcheck (DFT's stop-gradient makes its gradient the derivative of -sum m exp(s) / n instead).
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "hparams"), [c for c in CASES if c[0] != "dft"],
                         ids=[i for i, c in zip(CASE_IDS, CASES) if c[0] != "dft"])
def test_gradcheck(name, hparams):
    b = make_batch(3, group_sizes=(3, 2, 1), n_tok=5)
    logps = b["logps"].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: get(name)(inputs_of(b, x), **hparams)[0], (logps,))


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_dft_gradient_is_probability_weighted(aggregation):
    b = make_batch(4, group_sizes=(3, 2, 2), n_tok=6)
    logps = b["logps"].clone().requires_grad_()
    loss, _ = get("dft")(inputs_of(b, logps), aggregation=aggregation)
    (grad,) = torch.autograd.grad(loss, logps)
    mask, n_rows, n_tok = b["mask"], *b["logps"].shape
    lengths = mask.sum(1).tolist()
    nonempty = sum(1 for n in lengths if n)

    def potential(x):  # its true derivative is DFT's gradient: -exp(s) / n per token
        if aggregation == "token_mean":
            return -sum(math.exp(x[i, t]) for i in range(n_rows) for t in range(n_tok)
                        if mask[i, t]) / int(mask.sum())
        return -sum(math.exp(x[i, t]) / lengths[i] / nonempty for i in range(n_rows)
                    for t in range(n_tok) if mask[i, t])
    x0 = b["logps"].numpy()
    numeric = np.zeros_like(x0)
    for i in range(n_rows):
        for t in range(n_tok):
            up, down = x0.copy(), x0.copy()
            up[i, t] += 1e-6
            down[i, t] -= 1e-6
            numeric[i, t] = (potential(up) - potential(down)) / 2e-6
    np.testing.assert_allclose(grad.numpy(), numeric, atol=1e-8)
    # The stop-gradient is real: the plain derivative of the value -exp(s) s would differ.
    assert not torch.autograd.gradcheck(lambda x: get("dft")(inputs_of(b, x))[0], (logps,),
                                        raise_exception=False)


# --------------------------------------------------------------------------------------------------
# Gradient accumulation: micro-batches of whole groups with the summed normaliser == one batch.
# --------------------------------------------------------------------------------------------------


def split(b, group_cuts):
    """Micro-batches cut at group boundaries `group_cuts` (indices into GROUP_SIZES)."""
    starts = b["starts"]
    bounds = [0, *group_cuts, len(starts) - 1]
    pieces = []
    for lo_g, hi_g in zip(bounds[:-1], bounds[1:]):
        lo, hi = int(starts[lo_g]), int(starts[hi_g])
        keep = (b["pairs"][:, 0] >= lo) & (b["pairs"][:, 0] < hi)
        piece = {k: b[k][lo:hi] for k in ("logps", "mask", "rewards", "group_ids", "ref_logps",
                                            "behavior_logps")}
        piece["pairs"] = b["pairs"][keep] - lo
        pieces.append((lo, hi, piece))
    return pieces


@pytest.mark.parametrize(("name", "hparams"), CASES, ids=CASE_IDS)
def test_accumulation_equals_one_batch(name, hparams):
    b = make_batch(11)
    full = b["logps"].clone().requires_grad_()
    one_loss, one_stats = get(name)(inputs_of(b, full), **hparams)
    one_loss.backward()
    # The middle micro-batch is group 2 alone: one wrong rollout, so no positive and no pair.
    pieces = split(b, [2, 3])
    assert (pieces[1][2]["rewards"] == 0).all() and len(pieces[1][2]["pairs"]) == 0
    step = sum(get_normalizer(name)(p["mask"], p["rewards"], pairs=p["pairs"], **hparams)
               for _, _, p in pieces)
    total, grads, parts = 0.0, torch.zeros_like(b["logps"]), []
    for lo, hi, piece in pieces:
        logps = piece["logps"].clone().requires_grad_()
        loss, stats = get(name)(LossInputs(**{**piece, "logps": logps}, num_tokens=step), **hparams)
        loss.backward()
        assert stats["step_normalizer"] == step
        total += loss.item()
        grads[lo:hi] = logps.grad
        parts.append(stats)
    assert total == pytest.approx(one_loss.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grads, full.grad, rtol=1e-12, atol=1e-14)
    # The logged stats of the micro-batches merge into the one batch's, whatever each stat is.
    merged = merge_stats(parts)
    assert merged.keys() == one_stats.keys()
    for key, value in one_stats.items():
        assert merged[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_normalizers_count_what_the_protocol_says():
    b = make_batch(5)
    mask, rewards = b["mask"], b["rewards"]
    lengths = mask.sum(1)
    for name in ("sft", "dft", "rift", "grpo"):
        assert get_normalizer(name)(mask, rewards) == float(mask.sum())
        assert get_normalizer(name)(mask, rewards, aggregation="sequence_mean") == float((lengths > 0).sum())
    assert get_normalizer("rft")(mask, rewards) == float(lengths[rewards == 1].sum())
    assert get_normalizer("rft")(mask, rewards, aggregation="sequence_mean") == \
        float(((lengths > 0) & (rewards == 1)).sum())
    assert get_normalizer("dpo")(mask, rewards, pairs=b["pairs"], beta=0.2) == float(len(b["pairs"]))
    # The trainer passes every hparam to both functions; loss-only ones are accepted and ignored.
    assert get_normalizer("grpo")(mask, rewards, pairs=None, bias=0.3, clip_eps=0.2) == float(mask.sum())


# --------------------------------------------------------------------------------------------------
# Edge cases with defined behaviour and logged counts.
# --------------------------------------------------------------------------------------------------


def test_grpo_equal_reward_groups_get_the_bias():
    b = make_batch(2, group_sizes=(3, 3, 1, 3))
    # 0.1 * 3 / 3 != 0.1 in floating point: A must still be exactly b, not b + rounding / 1e-4.
    rewards = torch.tensor([1.0, 1, 1, 0, 0, 0, 1, 0.1, 0.1, 0.1], dtype=torch.float64)
    s, mask = b["logps"], b["mask"]
    n = int(mask.sum())
    for hparams in ({}, {"std_scale": True}):
        loss, stats = get("grpo")(inputs_of(b, rewards=rewards), **hparams)
        expected = -0.1 * float(s[mask].sum()) / n
        assert loss.item() == pytest.approx(expected, rel=1e-12)
        assert stats["equal_reward_groups"] == 4 and stats["groups"] == 4
        assert stats["advantage_min"] == stats["advantage_max"] == 0.1
    loss, stats = get("grpo")(inputs_of(b, rewards=rewards), bias_scope="all_correct")
    all_correct = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0, 0, 0], dtype=torch.bool)[:, None] & mask
    assert loss.item() == pytest.approx(-0.1 * float(s[all_correct].sum()) / n, rel=1e-12)
    assert stats["bias_groups"] == 2


def test_rft_without_positives_is_zero_not_nan():
    b = make_batch(3)
    rewards = torch.zeros_like(b["rewards"])
    for num_tokens in (None, 17):
        logps = b["logps"].clone().requires_grad_()
        loss, stats = get("rft")(inputs_of(b, logps, rewards=rewards, num_tokens=num_tokens))
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(logps.grad, torch.zeros_like(logps))
        assert stats["rows_used"] == 0 and stats["tokens_used"] == 0 and stats["normalizer"] == 0
    assert get_normalizer("rft")(b["mask"], rewards) == 0.0


def test_dpo_without_pairs_is_an_attached_zero():
    b = make_batch(3)
    logps = b["logps"].clone().requires_grad_()
    loss, stats = get("dpo")(inputs_of(b, logps, pairs=torch.zeros(0, 2, dtype=torch.long)))
    assert loss.requires_grad and loss.item() == 0.0
    loss.backward()
    assert torch.equal(logps.grad, torch.zeros_like(logps))
    assert stats["pairs"] == 0 and stats["normalizer"] == 0


@pytest.mark.parametrize(("name", "hparams"), CASES, ids=CASE_IDS)
def test_masked_positions_and_empty_rows_are_inert(name, hparams):
    b = make_batch(9)
    garbage = b["logps"].clone()
    garbage[~b["mask"]] = torch.tensor([float("nan"), float("inf"), -float("inf"), 50.0]).repeat(
        int((~b["mask"]).sum()) // 4 + 1)[: int((~b["mask"]).sum())].double()
    logps = garbage.requires_grad_()
    extra = {"ref_logps": torch.where(b["mask"], b["ref_logps"], float("nan")),
             "behavior_logps": torch.where(b["mask"], b["behavior_logps"], float("inf"))}
    loss, stats = get(name)(inputs_of(b, logps, **extra), **hparams)
    loss.backward()
    clean_loss, _ = get(name)(inputs_of(b), **hparams)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(clean_loss.item(), rel=1e-12, abs=1e-15)
    assert torch.isfinite(logps.grad).all() and (logps.grad[~b["mask"]] == 0).all()
    assert stats["empty_rows"] == 1


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the field.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "hparams", "missing", "field"), [
    ("dpo", {}, "ref_logps", "ref_logps"), ("dpo", {}, "pairs", "pairs"),
    ("grpo", {"clip_eps": 0.2}, "behavior_logps", "behavior_logps"),
    ("grpo", {"kl_beta": 0.1}, "ref_logps", "ref_logps"),
    ("rift", {"variant": "literal"}, None, "lam"),
])
def test_missing_fields_raise_value_error_naming_them(name, hparams, missing, field):
    b = make_batch(1)
    overrides = {missing: None} if missing else {}
    with pytest.raises(ValueError, match=field) as info:
        get(name)(inputs_of(b, **overrides), **hparams)
    assert isinstance(info.value, EngineError) and info.value.field == field


def test_bad_names_hparams_and_inputs():
    b = make_batch(1)
    with pytest.raises(KeyError, match="sft, rft, dft, rift, grpo, dpo"):
        get("ppo")
    with pytest.raises(KeyError):
        get_normalizer("ppo")
    assert losses.names() == ("sft", "rft", "dft", "rift", "grpo", "dpo")
    with pytest.raises(ValueError, match="aggregaton"):
        get("sft")(inputs_of(b), aggregaton="sequence_mean")
    with pytest.raises(ValueError, match="aggregation"):
        get("grpo")(inputs_of(b), aggregation="mean")
    with pytest.raises(ValueError, match="aggregation"):
        get("dpo")(inputs_of(b), aggregation="token_mean")
    with pytest.raises(ValueError, match="bias_scope"):
        get("grpo")(inputs_of(b), bias_scope="some")
    with pytest.raises(ValueError, match="clip_eps"):
        get("grpo")(inputs_of(b), clip_eps=-0.1)
    with pytest.raises(ValueError, match="beta"):
        get("dpo")(inputs_of(b), beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        get("dpo")(inputs_of(b), label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        get("dpo")(inputs_of(b), variant="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="rewards"):
        get("rft")(inputs_of(b, rewards=b["rewards"] * 0.5))
    with pytest.raises(ValueError, match="num_tokens"):
        get("sft")(inputs_of(b, num_tokens=3))
    with pytest.raises(ValueError, match="pairs"):  # across groups
        get("dpo")(inputs_of(b, pairs=torch.tensor([[0, int(b["starts"][1])]])))
    with pytest.raises(ValueError, match="pairs"):
        inputs_of(b, pairs=torch.tensor([[0, 99]]))
    with pytest.raises(ValueError, match="mask"):
        inputs_of(b, mask=b["mask"][:, 1:])
    with pytest.raises(ValueError, match="group_ids"):
        inputs_of(b, group_ids=b["group_ids"].double())
    with pytest.raises(ValueError, match="pairs"):
        get_normalizer("dpo")(b["mask"], b["rewards"])


def test_integer_mask_is_accepted_as_bool():
    b = make_batch(6)
    loss_bool, _ = get("sft")(inputs_of(b))
    loss_int, _ = get("sft")(inputs_of(b, mask=b["mask"].long()))
    assert loss_int.item() == loss_bool.item()


def test_dedup_mask_keeps_first_correct_copy_per_group():
    texts = ["x = 2\n\nso 4", "x = 2 so  4 ", "x = 2 so 4", "wrong", "wrong", "x = 2 so 4", "other"]
    groups = [0, 0, 0, 0, 0, 1, 1]
    rewards = [1, 1, 0, 0, 0, 1, 1]
    keep = dedup_mask(texts, torch.tensor(groups), torch.tensor(rewards, dtype=torch.float32))
    # row 1 duplicates row 0 after whitespace normalisation; row 2 is wrong (kept); rows 3-4 wrong
    # duplicates are kept; row 5 is the same text in another group.
    assert keep.tolist() == [True, False, True, True, True, True, True]
    with pytest.raises(ValueError, match="texts"):
        dedup_mask(texts[:-1], groups, rewards)
