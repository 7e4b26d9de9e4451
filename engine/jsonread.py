"""Reading one JSON file a user handed us (a model's config.json, tokenizer_config.json, ...): every
way it can be wrong (unreadable, not UTF-8, not JSON, nested too deeply, not an object) is one
EngineError naming the file, never a traceback."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from engine.errors import EngineError


# A JSON-lines record past this many bytes (or characters) is refused before it is parsed or tokenised: a
# 32k-token rollout with its behavior_logps and completion_ids, or any task problem, stays far below it.
MAX_LINE_BYTES = 16 * 2 ** 20


def check_line_size(data: "bytes | str", path: "str | os.PathLike", line: int) -> None:
    if len(data) > MAX_LINE_BYTES:
        raise EngineError(f"line of {len(data) / 2 ** 20:.1f} MiB exceeds the {MAX_LINE_BYTES // 2 ** 20} MiB a "
                          "record may hold", path=path, line=line)


def read_json(path: str | os.PathLike, what: str) -> Any:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise EngineError(f"cannot read the {what} ({e.strerror})", path=path) from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise EngineError(f"{what} is not UTF-8 text ({e.reason} at byte {e.start})", path=path, line=line) from None
    except json.JSONDecodeError as e:
        raise EngineError(f"{what} is not valid JSON ({e.msg}, column {e.colno})", path=path, line=e.lineno) from None
    except RecursionError:
        raise EngineError(f"{what} is nested too deeply", path=path) from None
    except ValueError as e:  # e.g. an integer with too many digits
        raise EngineError(f"{what} is not valid JSON ({str(e)[:80]})", path=path) from None


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise EngineError(f"{what}: expected a JSON object, got {type(obj).__name__}", path=path)
    return obj
