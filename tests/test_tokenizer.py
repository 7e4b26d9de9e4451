"""The chat tokenizer equals transformers' apply_chat_template on real GSM8K questions, for the real Qwen3
tokenizer and for the embedded model's (which ships Qwen3's chat template for transformers and vLLM)."""
import json

import pytest

import engine
from helpers import DATA, QWEN3_TOKENIZER, REPO


@pytest.fixture(scope="module", params=[QWEN3_TOKENIZER, REPO / "embedded" / "base"], ids=["qwen3", "embedded"])
def tokenizers(request):
    from transformers import AutoTokenizer
    return engine.load_tokenizer(request.param), AutoTokenizer.from_pretrained(str(request.param))


def _questions(n=25):
    lines = (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()
    return [json.loads(line)["question"] for line in lines[:: len(lines) // n][:n]]


def _hf_ids(hf, messages, **kw):
    out = hf.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("gen", [True, False])
def test_chat_ids_match_transformers(tokenizers, gen):
    ours, hf = tokenizers
    for q in _questions():
        messages = [{"role": "user", "content": q}]
        assert ours.encode_chat(messages, add_generation_prompt=gen) == _hf_ids(
            hf, messages, add_generation_prompt=gen)


def test_thinking_off_and_multi_turn(tokenizers):
    ours, hf = tokenizers
    q = _questions(3)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": q[0]},
                {"role": "assistant", "content": "<think>\nhmm\n</think>\n\n#### 18"},
                {"role": "user", "content": q[1]}]
    assert ours.encode_chat(messages, enable_thinking=False) == _hf_ids(
        hf, messages, add_generation_prompt=True, enable_thinking=False)
    final = messages[:2] + [{"role": "assistant", "content": "The answer is 18."}]
    assert ours.encode_chat(final, add_generation_prompt=False) == _hf_ids(hf, final, add_generation_prompt=False)


def test_special_ids():
    ours = engine.load_tokenizer(QWEN3_TOKENIZER)
    assert (ours.im_start_id, ours.im_end_id, ours.endoftext_id, ours.pad_id) == (151644, 151645, 151643, 151643)
    assert set(ours.stop_ids) == {151645, 151643}
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert ours.decode(ours.encode(text)) == text


def test_bad_tokenizer_dir(tmp_path):
    with pytest.raises(engine.EngineError, match="tokenizer.json not found"):
        engine.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(engine.EngineError, match="cannot read tokenizer"):
        engine.load_tokenizer(tmp_path)
