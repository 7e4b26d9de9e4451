"""Checks across rollout records that one line alone cannot make: a group is one prompt's K
rollouts (the same id written one way, one prompt per id), a completion's text is what its
completion_ids decode to. A failure names the file and the
line(s); with on_bad="skip" the offending line is skipped and counted like any bad line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from engine.errors import EngineError

def check_groups(rollouts: Sequence[Any], path: Path, on_bad: str, skipped: Any) -> list[Any]:
    """The rollouts whose group id agrees with its first use: same spelling (1 vs "1") and same prompt."""
    first: dict[str, Any] = {}
    kept = []
    for r in rollouts:
        seen = first.setdefault(r.group, r)
        problem = None
        if seen.group_is_int != r.group_is_int:
            problem = (f"group {r.group} is written as a {'number' if r.group_is_int else 'string'} here and as a "
                       f"{'number' if seen.group_is_int else 'string'} on line {seen.line}: two different ids "
                       "that would be merged; write them one way")
        elif _prompt_key(seen) != _prompt_key(r):
            problem = (f"group {r.group!r} holds a different prompt than on line {seen.line}; a group is one "
                       "prompt's K rollouts (give this prompt its own group id)")
        if problem is None:
            kept.append(r)
            continue
        err = EngineError(problem, path=path, line=r.line, field="group")
        if on_bad == "fail":
            raise err
        skipped.add(err)
    return kept


def _prompt_key(r: Any) -> str:
    return json.dumps(r.prompt, sort_keys=True)


def ids_text_mismatch(tokenizer: Any, r: Any, path: Path) -> "EngineError | None":
    """completion_ids are trained on, the text is graded and shown: they must say the same thing."""
    if r.completion_ids is None:
        return None
    try:
        decoded = tokenizer.decode(r.completion_ids, skip_special_tokens=False)
    except Exception:  # noqa: BLE001 - the tokenizers library raises bare Exceptions (e.g. ids past its vocabulary)
        return None    # the vocabulary check that follows names the bad id
    if decoded == r.completion:
        return None
    at = next((i for i, (a, b) in enumerate(zip(decoded, r.completion)) if a != b),
              min(len(decoded), len(r.completion)))
    return EngineError(f"completion text differs from what completion_ids decode to (from character {at}: "
                       f"{r.completion[at:at + 20]!r} vs {decoded[at:at + 20]!r})", path=path, line=r.line,
                       field="completion")
