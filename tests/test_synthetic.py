"""The synthetic math task and the embedded tiny model's tokenizer/config.

Solutions are checked by an independent evaluator (Python's `ast` over Fractions), not by the generator's
own arithmetic; the tokenizer is checked against transformers' fast tokenizer reading the same files.
"""
import ast
import json
import operator
import re
from fractions import Fraction

import pytest

import engine
from engine.tasks import synthetic
from engine.errors import EngineError
from engine.tasks.grading import grade
from engine.recipes.embedded_inputs import build_embedded
from engine.tasks.synthetic import Difficulty, generate_problems
from helpers import REPO

ANNOTATION = re.compile(r"(\d+) ([-+*/]) (\d+) = \$?<<([^=<>]+)=([^<>]+)>>(\d+)")
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
NUMBER_WORDS = {"twice": 2, "half": 2, "a third": 3, "a quarter": 4, "a fifth": 5}
WIDE = Difficulty(min_ops=2, max_ops=4, max_start=20, max_operand=10, max_factor=5, max_value=100)


def evaluate(expr: str) -> Fraction:
    """A tiny exact evaluator for `a op b op ...` (integers, + - * /)."""
    def ev(node):
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        raise ValueError(f"unexpected expression {expr!r}")
    return ev(ast.parse(expr, mode="eval").body)


def steps(item):
    """[(left, op, right, value)] from the solution's annotated lines, checking each line's shape."""
    lines = item.solution.split("\n")
    out = []
    for line in lines[:-1]:
        found = ANNOTATION.findall(line)
        assert len(found) == 1, f"one annotated step per line: {line!r}"
        a, op, b, expr, value, shown = found[0]
        assert expr == f"{a}{op}{b}" and value == shown, line
        exact = evaluate(expr)
        assert exact.denominator == 1 and exact == int(value), f"wrong arithmetic in {line!r}"
        out.append((int(a), op, int(b), int(value)))
    assert lines[-1] == f"#### {item.gold}"
    return out


@pytest.fixture(scope="module")
def train():
    return generate_problems(1500, seed=7, split="train", difficulty=WIDE)


@pytest.fixture(scope="module")
def test_items():
    return generate_problems(400, seed=7, split="test", difficulty=WIDE)


def test_deterministic_by_seed():
    a, b = generate_problems(60, seed=3, split="test"), generate_problems(60, seed=3, split="test")
    assert a == b
    c = generate_problems(60, seed=4, split="test")
    assert [x.question for x in a] != [x.question for x in c]
    assert [x.id for x in a] == [f"synthetic-test-{i}" for i in range(60)]


def test_splits_disjoint(train, test_items):
    """No question, and no arithmetic chain (start value and every operation), is in both splits, even
    across seeds; within a split questions are unique."""
    other_seed = generate_problems(400, seed=8, split="test", difficulty=WIDE)
    assert len({x.question for x in train}) == len(train)
    assert not {x.question for x in train} & {x.question for x in test_items + other_seed}
    chains = lambda items: {tuple(steps(x)) for x in items}  # noqa: E731
    assert not chains(train) & chains(test_items + other_seed)
    assert len(chains(test_items)) > 0.9 * len(test_items)


def test_solutions_are_correct_chains(train, test_items):
    op_counts = {"+": 0, "-": 0, "*": 0, "/": 0}
    lengths = set()
    for item in train + test_items:
        chain = steps(item)
        lengths.add(len(chain))
        for prev, cur in zip(chain, chain[1:]):
            assert cur[0] == prev[3], f"each step continues from the last result: {item.solution!r}"
        assert int(item.gold) == chain[-1][3]
        assert all(v >= 2 for s in chain for v in (s[0], s[2], s[3]))
        for _, op, _, _ in chain:
            op_counts[op] += 1
        # Every number the solution brings in is stated in the question (digits or words).
        stated = {int(n) for n in re.findall(r"\d+", item.question)}
        stated |= {v for w, v in NUMBER_WORDS.items() if re.search(rf"\b{w}\b", item.question)}
        assert chain[0][0] in stated and all(s[2] in stated for s in chain), item
        assert item.source == "synthetic" and item.question.endswith("?")
    assert lengths == {2, 3, 4}
    total = sum(op_counts.values())
    assert all(c > 0.1 * total for c in op_counts.values()), op_counts


def test_difficulty_knobs():
    d = Difficulty(min_ops=3, max_ops=3, max_start=9, max_operand=5, max_factor=3, max_value=40)
    for item in generate_problems(300, seed=1, split="train", difficulty=d):
        chain = steps(item)
        assert len(chain) == 3
        assert chain[0][0] <= 9 or chain[0][1] == "*"
        for a, op, b, v in chain:
            assert v <= 40 and b <= (5 if op in "+-" else 3)
    with pytest.raises(EngineError, match="max_ops"):
        Difficulty(max_ops=synthetic.MAX_OPS + 1)
    with pytest.raises(EngineError, match="max_factor"):
        Difficulty(max_factor=1)
    with pytest.raises(EngineError, match="no split"):
        generate_problems(3, split="dev")
    # Values in {2, 4} allow a handful of chains, none of which hashes into the test split.
    with pytest.raises(EngineError, match="distinct"):
        generate_problems(5, split="test", difficulty=Difficulty(max_ops=2, max_start=2, max_operand=2,
                                                                 max_factor=2, max_value=4))


def test_hard_split_is_longer_and_held_out(test_items):
    """The hard split (the AIME analogue): 5 correct steps each (training has 2-4), arithmetic from the held-out fifth
    (never a train chain), the registered split being the default seed's first 500."""
    hard = generate_problems(300, seed=7, split="hard")
    train = generate_problems(3000, seed=7, split="train", difficulty=synthetic.HARD)
    lengths = set()
    for item in hard:
        chain = steps(item)
        lengths.add(len(chain))
        assert int(item.gold) == chain[-1][3] and synthetic.split_of(_chain_text(chain)) == "test"
    assert lengths == {synthetic.HARD.min_ops} == {synthetic.HARD.max_ops} == {5}
    assert not {tuple(steps(x)) for x in hard} & {tuple(steps(x)) for x in train}
    assert hard[0].id == "synthetic-hard-0" and hard != generate_problems(300, seed=7, split="test")
    from engine.tasks.registry import load_task
    assert load_task("synthetic", "hard", limit=7) == generate_problems(7, synthetic.DEFAULT_SEED, "hard")


def _chain_text(chain) -> str:
    """The generator's chain string (`12+5-3/2`; a product opening `4*3...` reads the same) from parsed steps."""
    return str(chain[0][0]) + "".join(f"{op}{b}" for _, op, b, _ in chain)


def test_pretraining_items_drop_held_out_prompts_and_their_arithmetic():
    from engine.recipes.embedded_inputs import arithmetic, pretraining_items
    from engine.tasks.registry import TaskItem
    items = generate_problems(200, seed=2, split="train")
    held = items[:10]
    # A re-worded problem doing held-out arithmetic (the same annotations) must go too.
    twin = TaskItem("twin", "Another story entirely?", held[3].gold, "synthetic", held[3].solution.replace(
        held[3].solution.split(" ")[0], "Zed", 1))
    kept, removed = pretraining_items(items + [twin], held)
    assert arithmetic(twin) == arithmetic(held[3]) != ()
    assert twin not in kept and not {x.question for x in kept} & {x.question for x in held}
    assert not {arithmetic(x) for x in kept} & {arithmetic(x) for x in held}
    assert removed == len(items) + 1 - len(kept) >= 11
    assert kept == [x for x in items[10:] if arithmetic(x) not in {arithmetic(h) for h in held}]


def test_grader_accepts_gold_and_rejects_perturbed(train):
    for item in train[:400]:
        assert grade(item.solution, item.gold)
        assert not grade(item.solution, str(int(item.gold) + 1))
        wrong = item.solution.rsplit("\n", 1)[0] + f"\n#### {int(item.gold) - 1}"
        assert not grade(wrong, item.gold)


def test_registered_task(test_items):
    from engine.tasks.registry import load_task, task_names
    assert "synthetic" in task_names()
    items = load_task("synthetic", "test")
    assert items == generate_problems(synthetic.DEFAULT_SIZES["test"], synthetic.DEFAULT_SEED, "test")
    d = Difficulty()  # the registered task uses the default difficulty
    for item in items:
        chain = steps(item)
        assert d.min_ops <= len(chain) <= d.max_ops and max(s[3] for s in chain) <= d.max_value
    assert len(load_task("synthetic", "train", limit=5)) == 5
    with pytest.raises(EngineError, match="no split"):
        load_task("synthetic", "validation")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded")
    summary = build_embedded(out, seed=5, n_train=400, vocab_size=600)
    return out, summary


def test_shipped_embedded_files_are_a_fresh_build(tmp_path):
    """embedded/ was written by another process; rebuilding must give the same tokenizer bytes (the BPE
    trainer is deterministic, and its merges depend on the generated corpus) and the same architecture
    (the trainer rewrites config.json in its own key order)."""
    shipped = REPO / "embedded"
    build_embedded(tmp_path)
    assert (tmp_path / "sft_train.jsonl").read_bytes() == (shipped / "sft_train.jsonl").read_bytes()
    for model in ("base", "teacher"):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (tmp_path / model / name).read_bytes() == (shipped / model / name).read_bytes(), (model, name)
        fresh = engine.Qwen3Config.from_json(tmp_path / model / "config.json").to_dict()
        ours = engine.Qwen3Config.from_json(shipped / model / "config.json").to_dict()
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "tie_word_embeddings", "eos_token_id", "rope_theta"):
            assert fresh[key] == ours[key], (model, key)


def test_tokenizer_round_trip_and_special_tokens(built):
    out, summary = built
    tok = engine.load_tokenizer(out / "base")
    assert summary["tokenizer"]["vocab_size"] == tok.vocab_size <= 600
    for content in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        ids = tok.encode(content)
        assert len(ids) == 1 and ids[0] >= tok.vocab_size - 5, content
    assert tok.stop_ids == (tok.im_end_id, tok.endoftext_id) and tok.pad_id == tok.endoftext_id
    # Unseen words and characters still round-trip (byte-level), and decoding keeps <think> as Qwen3 does.
    texts = [x.question + "\n" + x.solution for x in generate_problems(50, seed=9, split="test")]
    texts += ["Zoë paid €3.50 — naïve 😀 tab\there", "<think>\nok\n</think>\n\n#### 12"]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    chat = tok.encode_chat([{"role": "user", "content": "Mia has 5 apples."}])
    assert chat[0] == tok.im_start_id and tok.im_end_id in chat
    assert tok.decode(chat, skip_special_tokens=False) == (
        "<|im_start|>user\nMia has 5 apples.<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_splits_digits_and_matches_transformers(built):
    from transformers import AutoTokenizer
    out, _ = built
    tok = engine.load_tokenizer(out / "base")
    for token, _ in tok.tok.get_vocab(with_added_tokens=False).items():
        text = tok.tok.decoder.decode([token])
        assert not re.search(r"\d", text) or re.fullmatch(r"\d", text), f"multi-digit token {text!r}"
    assert len(tok.encode("12345")) == 5
    hf = AutoTokenizer.from_pretrained(str(out / "base"))
    rows = [json.loads(line) for line in (out / "sft_train.jsonl").read_text().splitlines()[:40]]
    for row in rows:
        text = tok.apply_chat_template(row["prompt"]) + row["completion"] + "<|im_end|>"
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"


def test_config_and_sft_rows_load_through_the_engine(built):
    import torch
    from engine.train.rollouts import read_rollouts, tokenize_rollouts
    out, summary = built
    cfg = engine.Qwen3Config.from_json(out / "base" / "config.json")
    tok = engine.load_tokenizer(out / "base")
    assert cfg.vocab_size % 64 == 0 and tok.vocab_size <= cfg.vocab_size < tok.vocab_size + 64
    assert cfg.tie_word_embeddings and cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.eos_token_id == tok.im_end_id and cfg.max_position_embeddings >= 256
    model = engine.Qwen3ForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n_params < 10_000_000
    rollouts, skipped = read_rollouts(out / "sft_train.jsonl")
    data = summary["data"]
    assert len(rollouts) == data["rows"] == 400 - data["removed_as_held_out_or_same_arithmetic"] > 300
    assert skipped.count == 0
    assert all(r.reward == 1.0 and r.prompt[0]["role"] == "user" for r in rollouts)
    assert len({r.group for r in rollouts}) == data["rows"]
    examples = tokenize_rollouts(rollouts, tok, max_len=cfg.max_position_embeddings)
    assert max(len(e.ids) for e in examples) <= 256  # short enough for the tiny context
    ex = examples[0]
    assert tok.decode(ex.ids[ex.prompt_len:], skip_special_tokens=False) == rollouts[0].completion + "<|im_end|>"
    logits = model(torch.tensor([ex.ids])).logits
    assert logits.shape == (1, len(ex.ids), cfg.vocab_size) and torch.isfinite(logits).all()


def test_train_tokenizer_rejects_tiny_vocab(tmp_path):
    from engine.recipes.tokenizer_training import train_tokenizer
    with pytest.raises(EngineError, match="vocab_size"):
        train_tokenizer(["a b c"], 100, tmp_path)
