"""`cli.py rollout` / `cli.py eval` on a tiny random-weight model with the real Qwen3 tokenizer."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import engine
from cli import main
from engine.tasks.grading import extract_answer, grade
from engine.generate.rollout import encode_prompts, wilson_interval
from engine.generate.sampler import Generation, SamplingParams, generate, sequence_seed
from engine.tasks.registry import build_prompt, load_task
from helpers import QWEN3_TOKENIZER, hf_model, save_hf, tiny_config

QUESTIONS = [("Tom has 3 apples and buys 4 more. How many apples does he have?", "7"),
             ("A box holds 12 eggs. How many eggs are in 5 boxes?", "60"),
             ("Sara reads 9 pages a day for a week. How many pages does she read?", "63"),
             ("There are 20 birds; 8 fly away. How many are left?", "12"),
             ("What is 6 times 7?", "42")]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread is faster, and on a shared 2-core machine OpenMP threads that
    wait for each other make these tests ~8x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_gsm8k(data_dir, rows, split="train"):
    d = data_dir / "gsm8k"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{split}.jsonl", "w") as f:
        for q, a in rows:
            f.write(json.dumps({"question": q, "answer": f"Work.\n#### {a}"}) + "\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Qwen3 (hidden 32) with the full Qwen3 vocab, the tokenizer copied beside it, and data."""
    root = tmp_path_factory.mktemp("rollout")
    cfg = tiny_config(vocab_size=151936, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True)
    model_dir = save_hf(hf_model(cfg, seed=3), root / "model")
    for f in QWEN3_TOKENIZER.iterdir():
        shutil.copy(f, model_dir / f.name)
    data = root / "data"
    _write_gsm8k(data, QUESTIONS, "train")
    _write_gsm8k(data, QUESTIONS[:4], "test")
    return model_dir, data


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def _rollout(setup, out, *extra):
    model_dir, data = setup
    return _cli("rollout", "--model", model_dir, "--task", "gsm8k", "--split", "train", "--data-dir", data,
                "--k", 2, "--max-new-tokens", 6, "--temperature", 1.0, "--seed", 3, "--out", out, *extra)


def _by_group(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    return rows, groups


def _same_groups(got, want):
    """Equal records; behavior log-probs to float tolerance (batch composition changes the rounding)."""
    assert sorted(got) == sorted(want)
    for gid in want:
        assert len(got[gid]) == len(want[gid])
        for a, b in zip(got[gid], want[gid]):
            assert a["behavior_logps"] == pytest.approx(b["behavior_logps"], abs=1e-5)
            assert {**a, "behavior_logps": None} == {**b, "behavior_logps": None}


def test_rollout_records(setup, tmp_path):
    model_dir, data = setup
    out = tmp_path / "r.jsonl"
    res = _rollout(setup, out, "--limit", 4, "--batch-size", 3)
    assert res.exit_code == 0, res.output
    rows, groups = _by_group(out)
    items = load_task("gsm8k", "train", data_dir=data, limit=4)
    assert len(rows) == 8 and sorted(groups) == sorted(i.id for i in items)
    tok = engine.load_tokenizer(model_dir)
    model = engine.load_model(model_dir, device="cpu")
    for item in items:
        rs = groups[item.id]
        assert len(rs) == 2 and all(r["prompt"] == build_prompt(item) for r in rs)
        # Each line equals a direct sampler call with the documented per-sample seed.
        _, prompts = encode_prompts(tok, [item], "boxed", None)
        gens = generate(model, prompts * 2, SamplingParams(6, temperature=1.0), stop_ids=tok.stop_ids,
                        pad_id=tok.pad_id, seeds=[sequence_seed(3, item.id, j) for j in range(2)])
        for r, g in zip(rs, gens):
            assert r["behavior_logps"] == pytest.approx(g.behavior_logps, abs=1e-5)
            assert r["finished"] == g.finished
            body = g.token_ids[:-1] if g.finished else g.token_ids
            assert r["completion_ids"] == body and r["completion"] == tok.decode(body, skip_special_tokens=False)
            assert len(r["behavior_logps"]) == len(body) + r["finished"]
            assert r.get("stop_id") == (g.token_ids[-1] if g.finished else None)
            assert r["reward"] == float(grade(r["completion"], item.gold))
            assert r["answer"] == item.gold and r["source"] == "gsm8k"
    # The trainer's reader accepts the file as written.
    from engine.train.rollouts import read_rollouts
    assert len(read_rollouts(out)[0]) == 8


def test_rollout_rewards_and_stop_token(setup, tmp_path, monkeypatch):
    """A fixed 'model output' per item: correct answers get reward 1, the stop token is stripped."""
    import engine.generate.rollout as rollout_mod
    model_dir, data = setup
    tok = engine.load_tokenizer(model_dir)
    items = load_task("gsm8k", "train", data_dir=data)
    prompt_to_gold = dict(zip(map(tuple, encode_prompts(tok, items, "boxed", None)[1]), (i.gold for i in items)))

    def fake_generate(model, prompts, params, **kw):
        outs = []
        for j, p in enumerate(prompts):
            gold = prompt_to_gold[tuple(p)]
            answer = gold if j % 2 == 0 else str(int(gold) + 1)
            ids = tok.encode(f"So the answer is \\boxed{{{answer}}}.")
            stop = tok.stop_ids[j // 2 % len(tok.stop_ids)]   # both stop tokens, each with both rewards
            outs.append(Generation(ids + [stop], [-0.5] * (len(ids) + 1), True))
        return outs

    monkeypatch.setattr(rollout_mod, "generate", fake_generate)
    out = tmp_path / "r.jsonl"
    assert _rollout(setup, out).exit_code == 0
    rows, groups = _by_group(out)
    assert len(rows) == 10
    for rs in groups.values():
        assert [r["reward"] for r in rs] == [1.0, 0.0]
        assert all(r["completion"].endswith("}.") and "<|im_end|>" not in r["completion"] for r in rs)
    # Each record names the stop token it ended on, and the trainer's tokens end with that one.
    from engine.train.rollouts import read_rollouts, tokenize_rollouts
    assert {r["stop_id"] for r in rows} == set(tok.stop_ids) and len(tok.stop_ids) == 2
    examples = tokenize_rollouts(read_rollouts(out)[0], tok, max_len=512)
    assert [e.ids[-1] for e in examples] == [r["stop_id"] for r in rows]
    assert [e.ids[e.prompt_len:-1] for e in examples] == [r["completion_ids"] for r in rows]


@pytest.fixture(scope="module")
def full_rollout(setup, tmp_path_factory):
    """An uninterrupted rollout of all 5 items (K = 2); tests copy it, never change it."""
    full = tmp_path_factory.mktemp("full") / "full.jsonl"
    assert _rollout(setup, full).exit_code == 0
    return full


def test_rollout_resume_and_torn_tail(setup, full_rollout, tmp_path):
    full = tmp_path / "full.jsonl"
    shutil.copy(full_rollout, full)
    _, want = _by_group(full)
    # An interrupted run: 2 groups, then extend to all 5 with --limit dropped.
    part = tmp_path / "part.jsonl"
    assert _rollout(setup, part, "--limit", 2).exit_code == 0
    res = _rollout(setup, part)
    assert res.exit_code == 0 and "skipped 2" in res.output
    _same_groups(_by_group(part)[1], want)
    # A torn last line, and a last group missing a line: both dropped and regenerated.
    text = full.read_text()
    lines = text.splitlines(keepends=True)
    for cut in [text[:len(text) - len(lines[-1]) // 2], "".join(lines[:-1])]:
        torn = tmp_path / "torn.jsonl"
        torn.write_text(cut)
        res = _rollout(setup, torn)
        assert res.exit_code == 0, res.output
        rows, groups = _by_group(torn)
        _same_groups(groups, want)
        assert len(rows) == 10
    # Already complete: nothing written.
    before = full.read_bytes()
    assert "wrote 0 groups" in _rollout(setup, full).output and full.read_bytes() == before


@pytest.mark.parametrize("damage", ["middle", "k", "task"])
def test_rollout_refuses_damaged_or_foreign_files(setup, full_rollout, tmp_path, damage):
    out = tmp_path / "r.jsonl"
    lines = full_rollout.read_text().splitlines(keepends=True)
    if damage == "middle":
        lines[1] = "{not json\n"
    elif damage == "task":
        lines = [line.replace('"source": "gsm8k"', '"source": "math500"') for line in lines]
    out.write_text("".join(lines))
    before = out.read_bytes()
    res = _rollout(setup, out, *(["--k", 3] if damage == "k" else []))
    assert res.exit_code == 2 and res.output.startswith("error: ")
    assert out.read_bytes() == before   # never truncated on a refusal


def test_thinking_off_appends_empty_think_block(setup, tmp_path):
    model_dir, data = setup
    tok = engine.load_tokenizer(model_dir)
    items = load_task("gsm8k", "train", data_dir=data, limit=1)
    _, (auto,) = encode_prompts(tok, items, "boxed", None)
    _, (off,) = encode_prompts(tok, items, "boxed", False)
    assert off[:len(auto)] == auto and tok.decode(off[len(auto):]) == "<think>\n\n</think>\n\n"
    assert tok.decode(auto[-3:], skip_special_tokens=False) == "<|im_start|>assistant\n"
    # The rollout file records the switch, so the trainer rebuilds the prompt that was sampled from.
    from engine.train.rollouts import read_rollouts, tokenize_rollouts
    for flag, want, field in (("off", off, False), ("auto", auto, None)):
        out = tmp_path / f"{flag}.jsonl"
        assert _rollout(setup, out, "--limit", 1, "--thinking", flag).exit_code == 0
        assert [json.loads(line).get("enable_thinking") for line in out.read_text().splitlines()] == [field] * 2
        examples = tokenize_rollouts(read_rollouts(out)[0], tok, max_len=512)
        assert [e.ids[:e.prompt_len] for e in examples] == [want, want]


def test_eval_greedy_files_and_interval(setup, tmp_path):
    model_dir, data = setup
    out = tmp_path / "eval"
    res = _cli("eval", "--model", model_dir, "--task", "gsm8k", "--data-dir", data, "--max-new-tokens", 5,
               "--batch-size", 3, "--out", out)
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (out / "gsm8k_test.jsonl").read_text().splitlines()]
    summary = json.loads((out / "gsm8k_test_summary.json").read_text())
    items = load_task("gsm8k", "test", data_dir=data)
    assert [r["id"] for r in records] == [i.id for i in items]
    tok, model = engine.load_tokenizer(model_dir), engine.load_model(model_dir, device="cpu")
    _, prompts = encode_prompts(tok, items, "boxed", None)
    gens = generate(model, prompts, SamplingParams(5, temperature=0), stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    for r, g, item in zip(records, gens, items):
        body = g.token_ids[:-1] if g.finished else g.token_ids
        assert r["completion"] == tok.decode(body, skip_special_tokens=False)
        assert r["extracted"] == extract_answer(r["completion"]) and r["gold"] == item.gold
        assert r["correct"] == grade(r["completion"], item.gold)
    assert summary["n"] == 4 and summary["correct"] == sum(r["correct"] for r in records)
    assert f"({summary['correct']}/4)" in res.output and "Wilson" in res.output


def test_eval_counts_correct_answers(setup, tmp_path, monkeypatch):
    import engine.generate.rollout as rollout_mod
    model_dir, data = setup
    tok = engine.load_tokenizer(model_dir)
    items = load_task("gsm8k", "test", data_dir=data)
    outputs = ["#### 7", "The answer is \\boxed{61}", "so 63 pages", "\\boxed{12}"]
    by_prompt = dict(zip(map(tuple, encode_prompts(tok, items, "boxed", None)[1]), outputs))

    def fake_generate(model, prompts, params, **kw):
        assert params.greedy
        return [Generation(tok.encode(by_prompt[tuple(p)]), [0.0], False) for p in prompts]

    monkeypatch.setattr(rollout_mod, "generate", fake_generate)
    res = _cli("eval", "--model", model_dir, "--task", "gsm8k", "--data-dir", data, "--out", tmp_path)
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (tmp_path / "gsm8k_test.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in records] == [True, False, True, True]
    assert [r["extracted"] for r in records] == ["7", "61", "63", "12"]
    summary = json.loads((tmp_path / "gsm8k_test_summary.json").read_text())
    assert summary["accuracy"] == 0.75 and summary["ci95_wilson"] == pytest.approx(wilson_interval(3, 4))


@pytest.mark.parametrize("k,n", [(3, 4), (0, 10), (10, 10), (1154, 1319), (1, 30)])
def test_wilson_interval_equals_scipy(k, n):
    from scipy.stats import binomtest
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_bad_input_exits_2(setup, tmp_path):
    model_dir, data = setup
    base = ["--model", model_dir, "--data-dir", data]
    res = _cli("eval", *base, "--task", "nosuchtask")
    assert res.exit_code == 2 and "unknown task" in res.output
    empty = tmp_path / "empty"
    (empty / "gsm8k").mkdir(parents=True)
    (empty / "gsm8k" / "test.jsonl").write_text("")
    res = _cli("eval", "--model", model_dir, "--data-dir", empty, "--task", "gsm8k")
    assert res.exit_code == 2 and "test.jsonl" in res.output
    (empty / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
    res = _cli("rollout", "--model", model_dir, "--data-dir", empty, "--task", "gsm8k", "--split", "test",
               "--out", tmp_path / "r.jsonl")
    assert res.exit_code == 2 and "test.jsonl:2" in res.output
    # A prompt longer than the model's context (256 tokens): named by its item id.
    long_data = tmp_path / "long"
    _write_gsm8k(long_data, [("What is 2 + 2? " * 60, "4")], "test")
    res = _cli("eval", "--model", model_dir, "--data-dir", long_data, "--task", "gsm8k")
    assert res.exit_code == 2 and "gsm8k-test-0" in res.output and "max_position_embeddings" in res.output
    res = _cli("rollout", *base, "--task", "gsm8k", "--out", tmp_path / "x.jsonl", "--top-p", 0)
    assert res.exit_code == 2 and "top_p" in res.output
    res = _cli("rollout", *base, "--task", "gsm8k", "--out", tmp_path / "x.jsonl", "--k", 0)
    assert res.exit_code == 2


def test_eval_with_adapter(setup, tmp_path):
    """--adapter: the adapter's greedy completions (merged for decoding) equal the unmerged model's."""
    from engine.model.lora import LoRAConfig, apply_lora, lora_modules, save_adapter
    model_dir, data = setup
    model = engine.load_model(model_dir, device="cpu")
    apply_lora(model, LoRAConfig(r=2, alpha=4), seed=0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.5)
    save_adapter(model, tmp_path / "adapter")
    base = ["eval", "--model", model_dir, "--task", "gsm8k", "--data-dir", data, "--max-new-tokens", 4]
    assert _cli(*base, "--out", tmp_path / "base").exit_code == 0
    res = _cli(*base, "--adapter", tmp_path / "adapter", "--threads", 1, "--out", tmp_path / "lora")
    assert res.exit_code == 0, res.output
    tok = engine.load_tokenizer(model_dir)
    items = load_task("gsm8k", "test", data_dir=data)
    gens = generate(model, encode_prompts(tok, items, "boxed", None)[1], SamplingParams(4, temperature=0),
                    stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    want = [tok.decode(g.token_ids[:-1] if g.finished else g.token_ids, skip_special_tokens=False) for g in gens]
    completions = {run: [json.loads(line)["completion"] for line in
                         (tmp_path / run / "gsm8k_test.jsonl").read_text().splitlines()] for run in ("base", "lora")}
    assert completions["lora"] == want != completions["base"]
    summary = json.loads((tmp_path / "lora" / "gsm8k_test_summary.json").read_text())
    assert summary["adapter"] == str(tmp_path / "adapter")
