"""Qwen chat tokenizer on the `tokenizers` library: `tokenizer.json` + `tokenizer_config.json`.

The chat format is written out here (no jinja): a turn is `<|im_start|>{role}\n{content}<|im_end|>\n`,
the generation prompt is `<|im_start|>assistant\n`, and hybrid-thinking Qwen3 with thinking off
appends `<think>\n\n</think>\n\n`. Assistant turns after the last user query carry their think block,
as Qwen3's template renders them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from engine.errors import EngineError
from engine.jsonread import read_json_object

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK_OFF = "<think>\n\n</think>\n\n"
Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


class ChatTokenizer:
    def __init__(self, tokenizer: Tokenizer, config: dict, path: str = "") -> None:
        self.tok = tokenizer
        self.config = config
        self.path = path
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        missing = [t for t in (IM_START, IM_END, ENDOFTEXT) if t not in vocab]
        if missing:
            raise EngineError(f"tokenizer lacks the Qwen chat tokens {missing}", path=path)
        self.im_start_id = vocab[IM_START]
        self.im_end_id = vocab[IM_END]
        self.endoftext_id = vocab[ENDOFTEXT]
        pad = config.get("pad_token") or ENDOFTEXT
        self.pad_id = vocab.get(pad if isinstance(pad, str) else pad.get("content"), self.endoftext_id)
        eos = config.get("eos_token") or IM_END
        eos_id = vocab.get(eos if isinstance(eos, str) else eos.get("content"), self.im_end_id)
        self.stop_ids = tuple(dict.fromkeys([self.im_end_id, self.endoftext_id, eos_id]))
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # Text of the special (control) tokens: in a message's content it would become the control token.
        self.special_texts = tuple(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Message] | str, add_generation_prompt: bool = True,
                            enable_thinking: bool | None = None) -> str:
        """Render messages as Qwen chat text. A plain string is one user turn.

        enable_thinking=False appends the empty think block after the generation prompt (hybrid Qwen3
        with thinking off); None appends nothing (Instruct-2507, which never thinks)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        last_query = len(messages) - 1
        for i in range(len(messages) - 1, -1, -1):
            if messages[i].get("role") == "user":
                last_query = i
                break
        out = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise EngineError(f"message {i}: expected role system/user/assistant and string content, "
                                  f"got role={role!r}", field="messages")
            control = next((t for t in self.special_texts if t in content), None)
            if control is not None:  # it would silently turn into a real turn boundary / control token
                raise EngineError(f"message {i} ({role}): content holds the control-token text {control!r}",
                                  field="messages")
            if role == "assistant":
                reasoning = m.get("reasoning_content")
                if not isinstance(reasoning, str):
                    reasoning = ""
                    if "</think>" in content:
                        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                        content = content.split("</think>")[-1].lstrip("\n")
                if i > last_query and (i == len(messages) - 1 or reasoning):
                    content = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
            out.append(f"{IM_START}{role}\n{content}{IM_END}\n")
        if add_generation_prompt:
            out.append(f"{IM_START}assistant\n")
            if enable_thinking is False:
                out.append(THINK_OFF)
        return "".join(out)

    def encode_chat(self, messages: Sequence[Message] | str, add_generation_prompt: bool = True,
                    enable_thinking: bool | None = None) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, enable_thinking))


def load_tokenizer(path: str | os.PathLike) -> ChatTokenizer:
    """Load `tokenizer.json` (+ `tokenizer_config.json` when present) from a directory or hub id."""
    from engine.model.weights import resolve_model_dir
    directory = resolve_model_dir(path)
    tj = directory / "tokenizer.json"
    if not tj.is_file():
        raise EngineError("tokenizer.json not found", path=directory)
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as e:  # the tokenizers library raises a bare Exception on bad files
        raise EngineError(f"cannot read tokenizer ({e})", path=tj) from None
    config: dict = {}
    tc = directory / "tokenizer_config.json"
    if os.path.lexists(tc):
        config = read_json_object(tc, "tokenizer_config.json")
        for key in ("pad_token", "eos_token"):  # what ChatTokenizer reads: a token string or {"content": ...}
            value = config.get(key)
            if value is not None and not isinstance(value, str) and not (
                    isinstance(value, dict) and isinstance(value.get("content"), str)):
                raise EngineError(f"expected a token string or an object with string 'content', got "
                                  f"{str(value)[:60]!r}", path=tc, field=key)
    return ChatTokenizer(tok, config, str(directory))
