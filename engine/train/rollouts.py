"""Rollout files -> validated records -> token ids with a completion mask (`engine.train.batching` turns
those into step plans and padded batches).

A rollout file is JSONL, one completion per line: `prompt` (a string or chat messages), `completion`,
`reward` (float), `group` (shared by the K rollouts of one prompt); optional `behavior_logps` (one per
completion token, the stop token included when the rollout finished), `answer`, `source`, `finished`,
`completion_ids` (the sampled ids without the stop token), `stop_id` (the stop token a finished
rollout ended on; `<|im_end|>` when absent, so a rollout that stopped on `<|endoftext|>` trains on the
token it sampled) and `enable_thinking` (the chat template's switch the prompt was sampled with; a
training config that sets it otherwise is an error).
Bad lines fail the run by default (`on_bad="fail"`) or are skipped and counted (`on_bad="skip"`);
nothing is dropped silently.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

from engine.errors import EngineError, is_finite_number
from engine.fsio import JSON_WHITESPACE
from engine.jsonread import check_line_size
from engine.model.tokenizer import ChatTokenizer
from engine.train.rollout_checks import ids_text_mismatch


@dataclasses.dataclass
class Rollout:
    prompt: list[dict] | str
    completion: str
    reward: float
    group: str
    line: int
    behavior_logps: list[float] | None = None
    answer: str | None = None
    source: str | None = None
    finished: bool = True
    completion_ids: list[int] | None = None   # the sampled ids, when the rollout writer kept them
    stop_id: int | None = None                 # the stop token a finished rollout ended on (None: <|im_end|>)
    enable_thinking: bool | None = None        # the chat template's switch at sampling time (None: not recorded)
    group_is_int: bool = False                 # the file wrote the group as a number (1 is not "1")


@dataclasses.dataclass
class Example:
    """One tokenised rollout: ids = prompt (chat template + generation prompt) + completion (+ its stop id)."""
    ids: list[int]
    prompt_len: int
    reward: float
    group: int
    line: int
    text: str
    behavior_logps: list[float] | None = None


@dataclasses.dataclass
class Skipped:
    count: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)

    def add(self, err: EngineError) -> None:
        self.count += 1
        if len(self.reasons) < 20:
            self.reasons.append(str(err))


def _text(x: Any) -> bool:
    """A string the tokenizer can take: valid Unicode (JSON allows lone surrogates, UTF-8 does not)."""
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


def _parse_line(raw: str, path: Path, line: int) -> Rollout:
    def bad(msg: str, field: str | None = None) -> EngineError:
        return EngineError(msg, path=path, line=line, field=field)

    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise bad(f"not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # too many digits, too deeply nested
        raise bad(f"not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise bad("expected a JSON object")
    for field in ("prompt", "completion", "reward", "group"):
        if field not in obj:
            raise bad("missing required field", field)
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and _text(m.get("role")) and _text(m.get("content"))
                                 for m in prompt):
            raise bad("expected a string or a non-empty list of {role, content} messages", "prompt")
    elif not _text(prompt) or not prompt:
        raise bad("expected a non-empty string or chat messages", "prompt")
    completion = obj["completion"]
    # "" with finished: an immediate stop, as engine.rollout writes it (the stop token is what trains).
    if not _text(completion) or not completion.strip() and not (completion == "" and obj.get("finished", True) is True):
        raise bad("empty completion" if _text(completion) else "expected a (valid Unicode) string",
                  "completion")
    reward = obj["reward"]
    if not is_finite_number(reward):
        raise bad(f"expected a finite number, got {_short(reward)}", "reward")
    group = obj["group"]
    if isinstance(group, bool) or not (_text(group) or isinstance(group, int)):
        raise bad(f"expected a string or integer, got {_short(group)}", "group")
    blp = obj.get("behavior_logps")
    if blp is not None:
        if not isinstance(blp, list) or not all(is_finite_number(x) and x <= 1e-6 for x in blp):
            raise bad("expected a list of finite log-probs (<= 0)", "behavior_logps")
    finished = obj.get("finished", True)
    if not isinstance(finished, bool):
        raise bad("expected true or false", "finished")
    cids = obj.get("completion_ids")
    if cids is not None and (not isinstance(cids, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in cids)):
        raise bad("expected a list of non-negative token ids", "completion_ids")
    stop_id = obj.get("stop_id")
    if stop_id is not None:
        if isinstance(stop_id, bool) or not isinstance(stop_id, int) or stop_id < 0:
            raise bad(f"expected a non-negative token id, got {_short(stop_id)}", "stop_id")
        if not finished:
            raise bad("a stop id for a rollout that did not finish (finished is false)", "stop_id")
    thinking = obj.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise bad(f"expected true, false or null, got {_short(thinking)}", "enable_thinking")
    return Rollout(prompt=prompt, completion=completion, reward=float(reward), group=str(group), line=line,
                   group_is_int=isinstance(group, int),
                   behavior_logps=[float(x) for x in blp] if blp is not None else None,
                   answer=obj.get("answer"), source=obj.get("source"), finished=finished,
                   completion_ids=cids, stop_id=stop_id, enable_thinking=thinking)


def read_rollouts(path: str | os.PathLike, on_bad: str = "fail") -> tuple[list[Rollout], Skipped]:
    """Parse and validate a rollouts JSONL file. Returns the rollouts and what was skipped."""
    path = Path(path)
    if on_bad not in ("fail", "skip"):
        raise EngineError(f"on_bad must be 'fail' or 'skip', got {on_bad!r}", field="on_bad")
    if not path.is_file():
        raise EngineError("rollouts file not found", path=path)
    rollouts, skipped = [], Skipped()
    try:
        f = open(path, "rb")
    except OSError as e:
        raise EngineError(f"cannot read the rollouts file ({e.strerror})", path=path) from None
    with f:
        for line_no, data in enumerate(f, 1):
            try:
                try:
                    raw = data.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise EngineError(f"not UTF-8 text ({e.reason} at byte {e.start})", path=path,
                                      line=line_no) from None
                if not raw.strip(JSON_WHITESPACE):
                    continue
                check_line_size(data, path, line_no)
                rollouts.append(_parse_line(raw, path, line_no))
            except EngineError as e:
                if on_bad == "fail":
                    raise
                skipped.add(e)
    if not rollouts:
        raise EngineError("no rollouts" + (f" ({skipped.count} bad lines skipped)" if skipped.count else ""),
                          path=path)
    return rollouts, skipped


def tokenize_rollouts(rollouts: Sequence[Rollout], tokenizer: ChatTokenizer, max_len: int, path: str = "",
                      on_bad: str = "fail", enable_thinking: bool | None = None,
                      skipped: Skipped | None = None, vocab_size: int | None = None) -> list[Example]:
    """Chat-template each prompt (with the record's enable_thinking, else the argument's), append the
    completion ids and, when finished, the stop id it ended on (`<|im_end|>` unless the record names another).

    The completion mask runs from the first assistant token through the stop token. Sampled
    `completion_ids` are checked against `vocab_size` (the model's; it may exceed the tokenizer's)."""
    skipped = skipped if skipped is not None else Skipped()
    group_ids: dict[str, int] = {}
    prompt_cache: dict[str, list[int]] = {}
    examples = []
    for r in rollouts:
        if None not in (r.enable_thinking, enable_thinking) and r.enable_thinking != enable_thinking:
            conflict = EngineError(f"sampled with enable_thinking={r.enable_thinking}, but the training "
                                   f"config sets enable_thinking={enable_thinking}", path=path, line=r.line,
                                   field="enable_thinking")
            if on_bad == "fail":
                raise conflict
            skipped.add(conflict)
            continue
        thinking = r.enable_thinking if r.enable_thinking is not None else enable_thinking
        key = json.dumps([r.prompt, thinking], sort_keys=True)
        if key not in prompt_cache:
            try:
                prompt_cache[key] = tokenizer.encode_chat(r.prompt, add_generation_prompt=True,
                                                          enable_thinking=thinking)
            except EngineError as e:  # a bad role or control-token text: this line, this field
                e = EngineError(e.message, path=path, line=r.line, field="prompt")
                if on_bad == "fail":
                    raise e from None
                skipped.add(e)
                continue
        prompt_ids = prompt_cache[key]
        if max(prompt_ids, default=0) >= (vocab_size or tokenizer.vocab_size):
            bad_prompt = EngineError(f"prompt token id {max(prompt_ids)} outside the model's vocabulary "
                                     f"({vocab_size or tokenizer.vocab_size}); the tokenizer is not the model's",
                                     path=path, line=r.line, field="prompt")
            if on_bad == "fail":
                raise bad_prompt
            skipped.add(bad_prompt)
            continue
        # The sampled ids when kept: re-encoding the text can give another (canonical) tokenisation,
        # which would misalign behavior_logps and score tokens the policy never produced.
        sampled = r.completion_ids if r.completion_ids is not None else tokenizer.encode(r.completion)
        mismatch = ids_text_mismatch(tokenizer, r, path)
        if mismatch is not None:
            if on_bad == "fail":
                raise mismatch
            skipped.add(mismatch)
            continue
        stop = r.stop_id if r.stop_id is not None else tokenizer.im_end_id
        completion_ids = sampled + ([stop] if r.finished else [])
        if max(completion_ids, default=0) >= (vocab_size or tokenizer.vocab_size):
            bad_id = EngineError(f"token id {max(completion_ids)} outside the vocabulary "
                                 f"({vocab_size or tokenizer.vocab_size})", path=path, line=r.line,
                                 field="completion_ids" if max(sampled, default=0) == max(completion_ids)
                                 else "stop_id")
            if on_bad == "fail":
                raise bad_id
            skipped.add(bad_id)
            continue
        try:
            if len(prompt_ids) + len(completion_ids) > max_len:
                raise EngineError(f"prompt + completion is {len(prompt_ids) + len(completion_ids)} tokens, "
                                  f"longer than the maximum length {max_len}", path=path, line=r.line,
                                  field="completion")
            if r.behavior_logps is not None and len(r.behavior_logps) != len(completion_ids):
                raise EngineError(f"{len(r.behavior_logps)} behavior log-probs for {len(completion_ids)} "
                                  f"completion tokens (the completion re-tokenises differently)", path=path,
                                  line=r.line, field="behavior_logps")
        except EngineError as e:
            if on_bad == "fail":
                raise
            skipped.add(e)
            continue
        gid = group_ids.setdefault(r.group, len(group_ids))
        examples.append(Example(ids=prompt_ids + completion_ids, prompt_len=len(prompt_ids), reward=r.reward,
                                group=gid, line=r.line, text=r.completion, behavior_logps=r.behavior_logps))
    if not examples:
        raise EngineError("no usable rollouts after validation", path=path)
    return examples
