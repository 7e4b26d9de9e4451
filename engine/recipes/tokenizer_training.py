"""Train a small Qwen-style byte-level BPE tokenizer with the `tokenizers` library.

The result is laid out exactly as a real Qwen3 tokenizer directory (`tokenizer.json` +
`tokenizer_config.json`), so `engine.load_tokenizer` and transformers' `AutoTokenizer` read it through
the same code paths: NFC normaliser, Qwen's split regex (which isolates every digit, so arithmetic is
learnable digit by digit) followed by a ByteLevel pre-tokenizer without its own regex, ByteLevel decoder,
and the chat tokens appended after the learned vocabulary as in Qwen (`<|endoftext|>`, `<|im_start|>`,
`<|im_end|>` special; `<think>`, `</think>` added but not special, as Qwen3 marks them).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

from engine.errors import EngineError
from engine.fsio import write_json, write_text
from engine.model.tokenizer import ENDOFTEXT, IM_END, IM_START
from engine.tasks.registry import DATA_DIR

# Qwen2/Qwen3's pre-tokenizer split pattern (`\p{N}` alone: one token per digit).
QWEN_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # special: skipped when decoding
THINK_TOKENS = ("<think>", "</think>")           # single ids, but kept in decoded text (as Qwen3)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + len(THINK_TOKENS)  # the byte alphabet must fit


def _empty_qwen_style_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def _added(content: str, special: bool) -> AddedToken:
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)


def qwen3_chat_template() -> str:
    """Qwen3's jinja chat template, from the real Qwen3 tokenizer_config.json the repository carries."""
    return json.loads((DATA_DIR / "qwen3-tokenizer" / "tokenizer_config.json").read_text())["chat_template"]


def tokenizer_config(tok: Tokenizer, model_max_length: int) -> dict:
    """The `tokenizer_config.json` a Qwen3 checkpoint ships, with Qwen3's own chat template: the engine
    writes the chat format out in `engine.model.tokenizer` and does not read the template, but
    transformers and vLLM do, so they chat-format prompts for the embedded model exactly as the engine."""
    decoder = {}
    for content in SPECIAL_TOKENS + THINK_TOKENS:
        decoder[str(tok.token_to_id(content))] = {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": content in SPECIAL_TOKENS}
    return {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": [IM_START, IM_END], "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": IM_END, "errors": "replace",
        "model_max_length": model_max_length, "pad_token": ENDOFTEXT, "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None, "chat_template": qwen3_chat_template(),
    }


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
                    model_max_length: int = 512) -> Tokenizer:
    """Learn byte-level BPE merges on `texts` and write `tokenizer.json` + `tokenizer_config.json` to
    `out_dir`. `vocab_size` counts everything: 256 byte tokens, the merges, and the 5 chat tokens
    (fewer merges when the corpus runs out of pairs seen twice). Same texts -> byte-identical files."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise EngineError(f"expected an integer >= {MIN_VOCAB} (256 bytes + 5 chat tokens), got {vocab_size!r}",
                          field="vocab_size")
    tok = _empty_qwen_style_tokenizer()
    trainer = BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(THINK_TOKENS), min_frequency=2,
                         show_progress=False, special_tokens=[],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # Appended after the learned vocabulary, as in Qwen (ids 151643.. there, vocab end here).
    tok.add_special_tokens([_added(t, True) for t in SPECIAL_TOKENS])
    tok.add_tokens([_added(t, False) for t in THINK_TOKENS])
    out = Path(out_dir)
    # tokenizer.json is serialised by the library (sorted vocab, fixed merge order): deterministic text.
    write_text(out / "tokenizer.json", tok.to_str(pretty=True) + "\n")
    write_json(out / "tokenizer_config.json", tokenizer_config(tok, model_max_length))
    return tok


def token_stats(tok: Tokenizer, texts: Iterable[str]) -> dict[str, float]:
    """Mean and max tokens per text: how long prompts and solutions are for the tiny model."""
    lengths = [len(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    if not lengths:
        return {"mean": 0.0, "max": 0.0}
    return {"mean": sum(lengths) / len(lengths), "max": float(max(lengths))}

