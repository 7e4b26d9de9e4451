"""Which existing paths the engine may replace, truncate or delete: only what it recognisably wrote.

A user path handed to `--out` (or derived from it) may already hold something else: a task's data
file, a report of their own, a directory of unrelated files. Every writer that would replace, cut or
remove an existing path first calls `claim(path, kind)`: the path must be absent or hold what a
writer of that kind produces (its schema, checked on the content), otherwise one EngineError names the
path and nothing on disk is touched. Rollout resume, which may cut a torn tail, uses `torn_tail_ok`
so only the last unterminated line of a file of its own records is ever cut.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from engine.errors import EngineError
from engine.fsio import jsonl_lines

# Keys every rollout record written by engine.generate.rollout holds (older files and hand-made ones that lack
# them are still readable by the trainer; they are just not resumed into).
ROLLOUT_KEYS = frozenset({"prompt", "completion", "reward", "group", "source"})
# json.dumps of a rollout record starts with its first key: a torn last line of ours starts like this.
ROLLOUT_LINE_PREFIX = b'{"prompt": '


def _json_object(path: Path, keys: set[str]) -> bool:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and keys <= obj.keys()


def _jsonl_objects(path: Path, keys: frozenset[str] | set[str]) -> bool:
    """Every non-blank line a JSON object with `keys` (an empty file counts: nothing to lose)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return False
    for _, line in jsonl_lines(text):
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return False
        if not isinstance(obj, dict) or not keys <= obj.keys():
            return False
    return True


def _jsonl_log(path: Path) -> bool:
    """A JSONL log of objects appended line by line: only the unterminated last line may be torn."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return False
    body, _, tail = text.rpartition("\n")
    return (not tail.strip() or tail.lstrip().startswith("{")) and _jsonl_text_objects(body)


def _jsonl_text_objects(text: str) -> bool:
    for _, line in jsonl_lines(text):
        try:
            if not isinstance(json.loads(line), dict):
                return False
        except (ValueError, RecursionError):
            return False
    return True


def _text_starting(path: Path, *heads: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except (OSError, ValueError):
        return False
    return first.startswith(heads)


def _png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def only_names(*names: str) -> Callable[[Path], bool]:
    """A directory holding nothing but entries named `names` (what one writer creates there)."""
    def check(path: Path) -> bool:
        try:  # `.name.*.tmp`: what an interrupted atomic write of ours leaves
            return all(p.name in names or (p.name.startswith(".") and p.name.endswith(".tmp"))
                       for p in path.iterdir())
        except OSError:
            return False
    return check


# kind -> (description for the message, is a directory, recogniser of existing content)
KINDS: dict[str, tuple[str, bool, Callable[[Path], bool]]] = {
    "rollouts": ("rollouts file", False, lambda p: _jsonl_objects(p, ROLLOUT_KEYS)),
    "eval-items": ("per-item eval file", False, lambda p: _jsonl_objects(p, {"id", "completion", "correct"})),
    "eval-summary": ("eval summary", False, lambda p: _json_object(p, {"n", "correct", "accuracy"})),
    "metrics": ("analysis metrics file", False, lambda p: _json_object(p, {"schema_version", "runs"})),
    "seeds": ("seed summary", False, lambda p: _json_object(p, {"seeds", "runs", "reports"})),
    "report": ("report", False, lambda p: _text_starting(p, "# LoRA update geometry report", "# The study over ",
                                                         "# Spread over ")),
    "plot": ("plot", False, _png),
    "build": ("build summary", False, lambda p: _json_object(p, {"models", "rollouts"})
              or _json_object(p, {"parameters", "rollout_groups"})),  # the second: builds before the teacher
    "bench": ("bench result", False, lambda p: _json_object(p, {"spec"}) or _json_object(p, {"rows"})),
    "train-metrics": ("training metrics log", False, _jsonl_log),
    "sft-data": ("synthetic pretraining data", False, lambda p: _jsonl_objects(p, {"prompt", "completion"})),
    # A checkpoint directory the trainer replaces (step-N/, final/): one of ours holds its state or manifest.
    "checkpoint": ("checkpoint directory", True,
                   lambda p: (p / "trainer_state.json").is_file() or (p / "manifest.json").is_file()),
    "embedded-base": ("embedded base model directory", True,
                      only_names("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                 "generation_config.json")),
    "embedded-work": ("build-embedded work directory", True,
                      only_names("base", "teacher", "init", "pretrain", "init-base", "init-teacher",
                                 "pretrain-base", "pretrain-teacher", "calibration", "eval", "sft_train.jsonl",
                                 "student-samples.jsonl")),
}


def claim(path: str | os.PathLike, kind: str) -> Path:
    """Allow replacing, truncating or deleting `path`: it is absent or recognisably a `kind` written by
    this engine. Otherwise EngineError, and the path is left as it is."""
    path = Path(path)
    what, is_dir, recognise = KINDS[kind]
    if not os.path.lexists(path):
        return path
    if not (path.is_dir() if is_dir else path.is_file()):  # a device or fifo is no file of ours either
        expected = "a directory" if is_dir else "a file"
        raise EngineError(f"exists and is not {expected}; the {what} goes here (move it or choose another --out)",
                          path=path)
    if not recognise(path):
        raise EngineError(f"exists and is not a {what} written by this engine; not replacing it "
                          "(move it or choose another --out)", path=path)
    return path


def claim_dir(path: str | os.PathLike) -> Path:
    """An output directory: absent (created later) or a directory, not a file."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise EngineError("exists and is not a directory; --out names the output directory here", path=path)
    return path


def torn_tail_ok(tail: bytes) -> bool:
    """A last line without a newline that this engine's rollout writer could have torn."""
    return ROLLOUT_LINE_PREFIX.startswith(tail) or tail.startswith(ROLLOUT_LINE_PREFIX)
