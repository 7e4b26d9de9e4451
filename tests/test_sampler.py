"""engine.generate.sampler against transformers (greedy generate, logits warpers, PEFT) and float64 recomputation."""
import pytest
import torch

import engine
from engine.errors import EngineError
from engine.generate import sampler
from engine import packing
from engine.model.kv_cache import KVCache
from engine.model.lora import LoRAConfig, apply_lora, lora_modules, merge_adapter, save_adapter
from engine.generate.sampler import SamplingParams, filtered_probs, generate, next_tokens, sequence_seed
from helpers import hf_model, save_hf, tiny_config

CONFIGS = {
    "untied_gqa": tiny_config(),
    "tied_mha": tiny_config(tie_word_embeddings=True, num_attention_heads=3, num_key_value_heads=3,
                            vocab_size=173, num_hidden_layers=3),
}
PAD = 0


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread is faster, and on a shared 2-core machine OpenMP threads that
    wait for each other make these tests ~8x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(name, tmp_path_factory):
    cfg = CONFIGS[name]
    hf = hf_model(cfg, seed=len(name))
    path = save_hf(hf, tmp_path_factory.mktemp(name))
    return hf, engine.load_model(path, device="cpu"), cfg, path


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """Both configurations: for the parity tests against transformers."""
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """One configuration (GQA, untied): for behaviour that does not depend on the model's shape."""
    return _build("untied_gqa", tmp_path_factory)


def _prompts(cfg, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, cfg["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def _left_pad(prompts):
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return ids, mask


def _frequent_token(model, prompts, steps):
    """A token greedy decoding emits mid-sequence in some row: a stop id that really triggers."""
    outs = generate(model, prompts, SamplingParams(max_new_tokens=steps, temperature=0), stop_ids=[], pad_id=PAD)
    return outs[0].token_ids[steps // 2]


@pytest.mark.parametrize("pass_cost", [0, 10 ** 9], ids=["prefill-by-length", "prefill-one-pass"])
def test_greedy_equals_transformers_generate(pair, pass_cost, monkeypatch):
    hf, ours, cfg, _ = pair
    monkeypatch.setattr(packing, "PASS_COST_TOKENS", {"cpu": pass_cost})
    prompts = _prompts(cfg, [5, 11, 2, 8, 11])
    stop = _frequent_token(ours, prompts, 16)
    ours_out = generate(ours, prompts, SamplingParams(max_new_tokens=16, temperature=0), stop_ids=[stop],
                        pad_id=PAD, batch_size=4)
    ids, mask = _left_pad(prompts)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=[stop],
                          pad_token_id=PAD)[:, ids.shape[1]:].tolist()
    assert any(o.finished for o in ours_out)
    for got, want in zip(ours_out, ref):
        n = len(got.token_ids)
        assert got.token_ids == want[:n]
        assert got.finished == (stop in want)
        if got.finished:
            assert all(t == PAD for t in want[n:])


def _reference_sample(hf, prompt, params, seed, stop_ids):
    """Full forward over the whole sequence each step; HF warpers; float64 inverse CDF in id order."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    u = torch.rand(params.max_new_tokens, generator=torch.Generator().manual_seed(seed)).double()
    seq, tokens, logps = list(prompt), [], []
    for step in range(params.max_new_tokens):
        with torch.no_grad():
            logits = hf(torch.tensor([seq])).logits[:, -1].double()
        scores = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
        if params.top_k:
            scores = TopKLogitsWarper(params.top_k)(None, scores)
        if params.top_p < 1:
            scores = TopPLogitsWarper(params.top_p)(None, scores)
        cdf = torch.softmax(scores, -1)[0].cumsum(0)
        tok = int((cdf > u[step] * cdf[-1]).nonzero()[0])
        tokens.append(tok)
        logps.append(float(torch.log_softmax(logits, -1)[0, tok]))
        seq.append(tok)
        if tok in stop_ids:
            break
    return tokens, logps


@pytest.mark.parametrize("params", [SamplingParams(10, temperature=1.0),
                                    SamplingParams(10, temperature=0.7, top_p=0.8),
                                    SamplingParams(10, temperature=1.3, top_k=7, top_p=0.9)],
                         ids=["t1", "t0.7-p0.8", "t1.3-k7-p0.9"])
def test_kv_cache_sampling_equals_full_recompute(pair, params):
    hf, ours, cfg, _ = pair
    prompts = _prompts(cfg, [6, 3, 9], seed=1)
    seeds = [11, 12, 13]
    stop = _frequent_token(ours, prompts, 10)
    got = generate(ours, prompts, params, stop_ids=[stop], pad_id=PAD, seeds=seeds)
    for prompt, seed, g in zip(prompts, seeds, got):
        tokens, logps = _reference_sample(hf, prompt, params, seed, [stop])
        assert g.token_ids == tokens
        assert g.finished == (tokens[-1] == stop)
        assert max(abs(a - b) for a, b in zip(g.behavior_logps, logps)) < 1e-4


def _search_nucleus_among(candidates: int | None, monkeypatch) -> None:
    """None: top-p sorts whole rows; n: it looks among n candidates first (3: it must widen)."""
    import engine.generate.sampler as sampler
    if candidates is not None:
        monkeypatch.setattr(sampler, "NUCLEUS_SORT_ALL", 0)
        monkeypatch.setattr(sampler, "NUCLEUS_CANDIDATES", candidates)


@pytest.mark.parametrize("params", [SamplingParams(1, temperature=0.5), SamplingParams(1, top_k=5),
                                    SamplingParams(1, top_p=0.3), SamplingParams(1, temperature=2.0, top_p=0.95),
                                    SamplingParams(1, temperature=0.9, top_k=40, top_p=0.5)])
@pytest.mark.parametrize("candidates", [None, 3, 256])
def test_filtered_distribution_equals_transformers_warpers(params, candidates, monkeypatch):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    _search_nucleus_among(candidates, monkeypatch)
    logits = torch.randn(6, 301) * 3
    scores = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    want = torch.softmax(scores.double(), -1)
    probs, ids = filtered_probs(logits, params)
    full = torch.zeros_like(want)
    full.scatter_(-1, ids if ids is not None else torch.arange(301).expand(6, -1), probs.double())
    full /= full.sum(-1, keepdim=True)
    assert torch.equal(full > 0, want > 0)
    assert (full - want).abs().max() < 1e-6
    # Sampled tokens follow that distribution (inverse CDF: each u picks a token of the right mass).
    draws = torch.stack([next_tokens(logits, params, torch.rand(6))[0] for _ in range(400)])
    for row in range(6):
        counts = torch.bincount(draws[:, row], minlength=301).double() / 400
        assert (counts[want[row] == 0] == 0).all()
        assert (counts - want[row]).abs().max() < 0.1


@pytest.mark.parametrize("candidates", [None, 3, 5, 256])
def test_nucleus_keeps_lowest_ids_among_ties(candidates, monkeypatch):
    """Tokens tied at the nucleus edge: exactly as many as the nucleus needs, lowest ids first, however
    the nucleus was searched (a candidate set may have cut through the ties)."""
    _search_nucleus_among(candidates, monkeypatch)
    V = 40
    perm = torch.randperm(V)
    # Row 0: one token of weight 4, four tied at 2, the rest 1 (total 47); top_p 0.2 keeps the big one
    # and three of the four (mass before the 4th kept is 8/47 < 0.2 <= 10/47 before the 5th).
    weights = torch.ones(V, dtype=torch.float64)
    big, ties = int(perm[0]), perm[1:5].tolist()
    weights[big] = 4
    weights[ties] = 2
    # Row 1: flat; top_p 0.51 keeps 21 of 40 (mass before the 21st is 0.5, before the 22nd 0.525).
    logits = torch.stack([weights.log(), torch.zeros(V, dtype=torch.float64)]).float()
    for row, top_p, want in [(0, 0.2, {big, *sorted(ties)[:3]}), (1, 0.51, set(range(21)))]:
        probs, ids = filtered_probs(logits[row:row + 1], SamplingParams(1, top_p=top_p))
        kept = (ids[0] if ids is not None else torch.arange(V))[probs[0] > 0]
        assert set(kept.tolist()) == want


def test_greedy_argmax_equals_torch_on_ties_and_nan():
    from engine.generate.sampler import _argmax
    x = torch.randint(0, 4, (64, 37)).float()   # many tied maxima: the first one wins
    x[torch.rand(64, 37) < 0.03] = float("nan")  # a NaN counts as the maximum, as in torch
    assert torch.equal(_argmax(x), x.argmax(-1))
    assert _argmax(x).dtype == torch.long


def test_top_k_one_equals_greedy(one):
    _, ours, cfg, _ = one
    prompts = _prompts(cfg, [4, 9, 7], seed=2)
    greedy = generate(ours, prompts, SamplingParams(12, temperature=0), stop_ids=[], pad_id=PAD)
    top1 = generate(ours, prompts, SamplingParams(12, temperature=1.7, top_k=1), stop_ids=[], pad_id=PAD, seed=5)
    assert [g.token_ids for g in greedy] == [g.token_ids for g in top1]
    assert [g.behavior_logps for g in greedy] == [g.behavior_logps for g in top1]


def test_stops_on_stop_ids_and_drops_finished_rows(one, monkeypatch):
    _, ours, cfg, _ = one
    prompts = _prompts(cfg, [3, 8, 5, 6, 2, 7], seed=3)
    params = SamplingParams(20, temperature=1.0)
    free = generate(ours, prompts, params, stop_ids=[], pad_id=PAD, seed=9)
    # Stop ids: a token from the middle of two rows; every row must end at its first stop id.
    stops = [free[0].token_ids[6], free[3].token_ids[9]]
    calls = []
    original = KVCache.select_rows
    monkeypatch.setattr(KVCache, "select_rows", lambda self, rows: (calls.append(len(rows)), original(self, rows)))
    got = generate(ours, prompts, params, stop_ids=stops, pad_id=PAD, seed=9)
    assert calls and calls == sorted(calls, reverse=True)   # the batch shrank as rows finished
    for f, g in zip(free, got):
        first = next((i for i, t in enumerate(f.token_ids) if t in stops), None)
        if first is None:
            assert not g.finished and g.token_ids == f.token_ids
        else:
            assert g.finished and g.token_ids == f.token_ids[:first + 1]
            assert g.behavior_logps == pytest.approx(f.behavior_logps[:first + 1], abs=1e-5)


def test_behavior_logps_equal_full_forward_log_softmax(pair):
    hf, ours, cfg, _ = pair
    prompts = _prompts(cfg, [5, 10, 1], seed=4)
    got = generate(ours, prompts, SamplingParams(9, temperature=0.6, top_p=0.7), stop_ids=[], pad_id=PAD, seed=3)
    for prompt, g in zip(prompts, got):
        seq = torch.tensor([prompt + g.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(hf(seq).logits.double(), -1)[0]
        want = logp[len(prompt) - 1:-1].gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0]
        assert (torch.tensor(g.behavior_logps, dtype=torch.float64) - want).abs().max() < 1e-4


def test_reproducible_and_independent_of_batching(one):
    _, ours, cfg, _ = one
    prompts = _prompts(cfg, [4, 9, 6, 2, 7], seed=5)
    params = SamplingParams(8, temperature=1.0, top_p=0.95)
    a = generate(ours, prompts, params, stop_ids=[], pad_id=PAD, seed=7, batch_size=5)
    b = generate(ours, prompts, params, stop_ids=[], pad_id=PAD, seed=7, batch_size=5)
    c = generate(ours, prompts, params, stop_ids=[], pad_id=PAD, seed=8, batch_size=5)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    # A sequence's sample depends on its own seed only: other batch sizes and orders give the same.
    seeds = [sequence_seed(7, i) for i in range(5)]
    alone = [generate(ours, [p], params, stop_ids=[], pad_id=PAD, seeds=[s])[0] for p, s in zip(prompts, seeds)]
    assert [g.token_ids for g in a] == [g.token_ids for g in alone]
    perm = [3, 0, 4, 1, 2]
    shuffled = generate(ours, [prompts[i] for i in perm], params, stop_ids=[], pad_id=PAD,
                        seeds=[seeds[i] for i in perm], batch_size=2)
    assert [g.token_ids for g in shuffled] == [a[i].token_ids for i in perm]


def test_repeated_prompts_share_prefill_and_match_separate_runs(one, monkeypatch):
    _, ours, cfg, _ = one
    a, b = _prompts(cfg, [7, 4], seed=8)
    prompts, seeds = [a, b, a, a, b], [1, 2, 3, 4, 5]
    params = SamplingParams(6, temperature=1.0)
    prefill_rows = []
    original = ours.forward

    def spy(input_ids, *args, **kwargs):
        if input_ids.shape[1] > 1:
            prefill_rows.append(input_ids.shape[0])
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(ours, "forward", spy)
    got = generate(ours, prompts, params, stop_ids=[], pad_id=PAD, seeds=seeds)
    assert prefill_rows == [2]   # two distinct prompts prefilled once each
    monkeypatch.undo()
    for p, s, g in zip(prompts, seeds, got):
        alone = generate(ours, [p], params, stop_ids=[], pad_id=PAD, seeds=[s])[0]
        assert g.token_ids == alone.token_ids
        assert g.behavior_logps == pytest.approx(alone.behavior_logps, abs=1e-5)


@pytest.mark.parametrize("keys_transposed", [True, False], ids=["cpu-key-layout", "gpu-key-layout"])
def test_prefill_by_length_equals_one_pass(one, monkeypatch, keys_transposed):
    """Prompts prefilled in passes of similar length (each into its rows' right-aligned cache positions)
    sample what one left-padded pass samples, repeated prompts and top-p included, in both key layouts."""
    import functools
    _, ours, cfg, _ = one
    monkeypatch.setattr(sampler, "KVCache", functools.partial(KVCache, keys_transposed=keys_transposed))
    distinct = _prompts(cfg, [13, 2, 9, 5, 13, 1, 7], seed=11)
    prompts = distinct + [distinct[1], distinct[3], distinct[1]]
    seeds = list(range(100, 100 + len(prompts)))
    params = SamplingParams(9, temperature=1.0, top_p=0.9)
    runs, passes = [], []
    original = ours.forward

    def spy(input_ids, *args, **kwargs):
        if kwargs["kv_cache"].length == 0:  # a prefill pass (a 1-token prompt's too)
            passes[-1].append(tuple(input_ids.shape))
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(ours, "forward", spy)
    for pass_cost in (0, 10 ** 9):
        monkeypatch.setattr(packing, "PASS_COST_TOKENS", {"cpu": pass_cost})
        passes.append([])
        runs.append(generate(ours, prompts, params, stop_ids=[], pad_id=PAD, seeds=seeds))
    assert passes == [[(2, 13), (1, 9), (1, 7), (1, 5), (1, 2), (1, 1)], [(7, 13)]]
    for split, whole in zip(*runs):
        assert split.token_ids == whole.token_ids
        assert split.behavior_logps == pytest.approx(whole.behavior_logps, abs=1e-5)


def test_adapter_unmerged_merged_and_peft(one, tmp_path):
    hf, _, cfg, path = one
    from peft import PeftModel
    model = engine.load_model(path, device="cpu")
    apply_lora(model, LoRAConfig(r=4, alpha=8), seed=1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.3)
    save_adapter(model, tmp_path / "adapter")
    prompts = _prompts(cfg, [3, 7, 5], seed=6)
    params = SamplingParams(10, temperature=0)
    unmerged = generate(model, prompts, params, stop_ids=[], pad_id=PAD)
    base = generate(engine.load_model(path, device="cpu"), prompts, params, stop_ids=[], pad_id=PAD)
    assert [g.token_ids for g in unmerged] != [g.token_ids for g in base]   # the adapter matters
    merged = generate(merge_adapter(model), prompts, params, stop_ids=[], pad_id=PAD)
    assert [g.token_ids for g in merged] == [g.token_ids for g in unmerged]
    peft = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ids, mask = _left_pad(prompts)
    with torch.no_grad():
        ref = peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                            pad_token_id=PAD, eos_token_id=None)[:, ids.shape[1]:].tolist()
    peft.unload()
    assert [g.token_ids for g in unmerged] == ref


def test_context_limit_and_bad_params(one):
    _, ours, cfg, _ = one
    ctx = cfg["max_position_embeddings"]
    with pytest.raises(EngineError, match="max_position_embeddings"):
        generate(ours, [[1, 2], [3] * ctx], SamplingParams(4), stop_ids=[], pad_id=PAD)
    with pytest.raises(EngineError, match="empty"):
        generate(ours, [[]], SamplingParams(4), stop_ids=[], pad_id=PAD)
    out = generate(ours, [[5] * (ctx - 3)], SamplingParams(10, temperature=0), stop_ids=[], pad_id=PAD)
    assert len(out[0].token_ids) == 3 and not out[0].finished   # stops where the context is full
    for bad in [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                dict(top_k=-2)]:
        with pytest.raises(EngineError):
            SamplingParams(**bad)
    with pytest.raises(EngineError, match="batch size"):
        generate(ours, [[1]], SamplingParams(2), stop_ids=[], pad_id=PAD, batch_size=0)
