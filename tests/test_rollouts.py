"""Rollout parsing and validation, tokenisation with the completion mask (engine.train.rollouts)."""
import json

import pytest

from engine.train.batching import collate
from engine.train.rollouts import read_rollouts, tokenize_rollouts
from engine.errors import EngineError
from helpers import write_rollouts

GOOD = {"prompt": "What is 2+2?", "completion": "#### 4", "reward": 1.0, "group": "a"}


@pytest.mark.parametrize("line,field,message", [
    ("{not json", None, "not valid JSON"),
    ("[1, 2]", None, "expected a JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "reward"}), "reward", "missing required field"),
    (json.dumps({**GOOD, "reward": float("nan")}).replace("NaN", "NaN"), "reward", "finite"),
    (json.dumps({**GOOD, "reward": "1"}), "reward", "finite number"),
    (json.dumps({**GOOD, "completion": "  "}), "completion", "empty completion"),
    (json.dumps({**GOOD, "prompt": [{"role": "user"}]}), "prompt", "messages"),
    (json.dumps({**GOOD, "group": None}), "group", "string or integer"),
    (json.dumps({**GOOD, "behavior_logps": [0.5]}), "behavior_logps", "log-probs"),
    (json.dumps({**GOOD, "stop_id": -3}), "stop_id", "non-negative token id"),
    (json.dumps({**GOOD, "stop_id": True}), "stop_id", "non-negative token id"),
    (json.dumps({**GOOD, "stop_id": 151643, "finished": False}), "stop_id", "did not finish"),
    (json.dumps({**GOOD, "enable_thinking": "no"}), "enable_thinking", "true, false or null"),
])
def test_validation_names_file_line_field(tmp_path, line, field, message):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(EngineError) as info:
        read_rollouts(path)
    e = info.value
    assert e.line == 2 and e.field == field and message in str(e) and str(path) in str(e)
    rollouts, skipped = read_rollouts(path, on_bad="skip")
    assert len(rollouts) == 1 and skipped.count == 1


def test_completion_mask_and_chat_template(tok, tmp_path):
    path = write_rollouts(tmp_path / "r.jsonl", n_groups=3)
    rollouts, _ = read_rollouts(path)
    examples = tokenize_rollouts(rollouts, tok, max_len=256)
    e = examples[0]
    prompt_text = tok.decode(e.ids[:e.prompt_len], skip_special_tokens=False)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert e.ids[-1] == tok.im_end_id
    assert tok.decode(e.ids[e.prompt_len:-1]) == rollouts[0].completion
    b = collate(examples, [0, 5, 2], tok.pad_id)
    for j, i in enumerate([0, 5, 2]):
        n, p = len(examples[i].ids), examples[i].prompt_len
        assert b.mask[j].nonzero().flatten().tolist() == list(range(p, n))
        assert b.attention_mask[j].sum() == n


def test_finished_rollout_ends_on_the_stop_id_it_sampled(tok, tmp_path):
    """A rollout that stopped on <|endoftext|> trains on that token, not on an <|im_end|> it never
    sampled (its behavior log-prob belongs to the token it did sample); without stop_id, <|im_end|>."""
    endoftext = tok.encode("<|endoftext|>")[0]
    assert endoftext != tok.im_end_id
    body = tok.encode("#### 4")
    rows = [{**GOOD, "completion_ids": body, "stop_id": endoftext, "behavior_logps": [-0.5] * (len(body) + 1)},
            {**GOOD, "completion_ids": body},
            {**GOOD, "completion_ids": body, "finished": False},
            {**GOOD, "completion_ids": body, "stop_id": 10 ** 7}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rollouts, _ = read_rollouts(path)
    examples = tokenize_rollouts(rollouts[:3], tok, max_len=256)
    assert [e.ids[e.prompt_len:] for e in examples] == [body + [endoftext], body + [tok.im_end_id], body]
    with pytest.raises(EngineError, match="outside the vocabulary") as info:
        tokenize_rollouts(rollouts, tok, max_len=256, path=str(path))
    assert info.value.line == 4 and info.value.field == "stop_id"


def test_prompt_templated_with_the_thinking_switch_it_was_sampled_with(tok, tmp_path):
    rows = [{**GOOD, "enable_thinking": False}, GOOD, {**GOOD, "enable_thinking": None}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rollouts, _ = read_rollouts(path)
    off = tok.encode_chat(GOOD["prompt"], add_generation_prompt=True, enable_thinking=False)
    as_is = tok.encode_chat(GOOD["prompt"], add_generation_prompt=True)
    assert off != as_is   # Qwen3's template appends an empty think block when thinking is off
    examples = tokenize_rollouts(rollouts, tok, max_len=256)
    assert [e.ids[:e.prompt_len] for e in examples] == [off, as_is, as_is]
    # The config's switch applies where the record has none; a contradicting one is an error.
    examples = tokenize_rollouts(rollouts, tok, max_len=256, enable_thinking=False)
    assert [e.ids[:e.prompt_len] for e in examples] == [off, off, off]
    with pytest.raises(EngineError, match="sampled with enable_thinking=False") as info:
        tokenize_rollouts(rollouts, tok, max_len=256, enable_thinking=True, path=str(path))
    assert info.value.line == 1 and info.value.field == "enable_thinking"
    kept = tokenize_rollouts(rollouts, tok, max_len=256, enable_thinking=True, on_bad="skip")
    assert [e.line for e in kept] == [2, 3]


def test_too_long_and_behavior_length(tok, tmp_path):
    path = write_rollouts(tmp_path / "r.jsonl", n_groups=2)
    rollouts, _ = read_rollouts(path)
    with pytest.raises(EngineError, match="longer than the maximum length 10"):
        tokenize_rollouts(rollouts, tok, max_len=10, path=str(path))
    rollouts[0].behavior_logps = [-1.0, -2.0]
    with pytest.raises(EngineError, match="behavior log-probs") as info:
        tokenize_rollouts(rollouts, tok, max_len=256, path=str(path))
    assert info.value.line == 1
