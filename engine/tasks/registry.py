"""Math evaluation tasks: GSM8K, AIME 2024/2025/2026 and MATH-500 loaders, prompts and gold answer text.

`load_task(name, split)` reads `<data_dir>/<task>/<file>.jsonl` into `TaskItem`s. The data directory is,
in order: the `data_dir` argument, `$ENGINE_DATA_DIR`, the repository's own `data/` folder (`DATA_DIR`;
its SOURCES.md gives each file's origin, licence and sha256).
Other modules add tasks with `register_task(name, loader)`; `engine.tasks.synthetic` (if present) is imported
on the first lookup of an unknown name so its tasks register themselves.
Every problem with a data file raises `EngineError` naming the file, line and field.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Callable

from engine.errors import EngineError
from engine.fsio import jsonl_objects

__all__ = ["DATA_DIR", "QWEN3_CONFIGS", "TaskItem", "TaskLoader", "register_task", "task_names", "load_task",
           "default_data_dir", "default_style",
           "build_prompt", "answer_text", "PROMPT_STYLES"]


DATA_DIR = Path(__file__).resolve().parents[2] / "data"   # shipped with the repository (data/SOURCES.md)
QWEN3_CONFIGS = DATA_DIR / "qwen3-configs"                 # the real Qwen3 shapes, for random-weight models


@dataclass(frozen=True)
class TaskItem:
    """One evaluation problem. `gold` is the final answer only; `solution` the reference working, if any."""
    id: str
    question: str
    gold: str
    source: str
    solution: str | None = None
    where: tuple[str, int] | None = dataclass_field(default=None, compare=False)  # data file and line


TaskLoader = Callable[[str, Path], list[TaskItem]]  # (split, data_dir) -> items; raises EngineError
_REGISTRY: dict[str, TaskLoader] = {}
_STYLES: dict[str, str] = {}  # task -> the answer style its prompts use by default (else "boxed")
_PLUGIN_MODULES = ("engine.tasks.synthetic",)  # modules that register tasks when imported
_plugins_loaded = False


def register_task(name: str, loader_fn: TaskLoader, *, overwrite: bool = False, style: str = "boxed") -> None:
    """Make `load_task(name, ...)` call `loader_fn(split, data_dir)`; names are lower-case identifiers.
    `style` is the answer format (a `PROMPT_STYLES` key) that prompts for this task use by default."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
        raise ValueError(f"task name {name!r} must be lower-case letters, digits, '_', '.', '-'")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not loader_fn:
        raise ValueError(f"task {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = loader_fn
    _STYLES[name] = style


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in _PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the plugin exists but is broken: say so
                raise


def task_names() -> list[str]:
    """All registered task names (built-in and plugins), sorted."""
    _load_plugins()
    return sorted(_REGISTRY)


def default_style(task: str) -> str:
    """The answer style a task's prompts use unless the caller names one ("boxed" for unknown tasks)."""
    key = str(task).strip().lower()
    if key not in _REGISTRY:
        _load_plugins()
    return _STYLES.get(key, "boxed")


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: the argument, else `$ENGINE_DATA_DIR`, else the repository's `data/`."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("ENGINE_DATA_DIR"):
        return Path(os.environ["ENGINE_DATA_DIR"])
    return DATA_DIR


def load_task(name: str, split: str = "test", data_dir: str | os.PathLike | None = None,
              limit: int | None = None) -> list[TaskItem]:
    """Items of task `name` (e.g. "gsm8k", "aime2026", "aime" = 2024+2025+2026, "math500") and `split`,
    in file order, the first `limit` of them when given."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise EngineError(f"expected a non-negative integer, got {limit!r}", field="limit")
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        _load_plugins()
    if key not in _REGISTRY:
        raise EngineError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_REGISTRY))}", field="task")
    items = _REGISTRY[key](split, default_data_dir(data_dir))
    return items if limit is None else items[:limit]


# ---------------------------------------------------------------- file reading
def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name the file and line."""
    if not path.is_file():
        relative = f"{path.parent.name}/{path.name}"
        shipped = DATA_DIR / relative
        where = (f"the repository ships it as {shipped}" if shipped.is_file() and shipped != path else
                 f"data/SOURCES.md names the public source of data/{relative}")
        raise EngineError(f"data file not found: expected {relative} under the data directory; {where}; "
                          f"pass --data-dir DIR (or set ENGINE_DATA_DIR) to a folder holding {relative}", path=path)
    rows = list(jsonl_objects(path, "data file"))
    if not rows:
        raise EngineError("data file has no records", path=path)
    return rows


def _field(record: dict, field: str, path: Path, line: int, *, allow_int: bool = False) -> str:
    """A required non-empty string field (an integer too when `allow_int`)."""
    if field not in record:
        raise EngineError("missing field", path=path, line=line, field=field)
    value = record[field]
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise EngineError(f"expected a non-empty string, got {value!r:.60}", path=path, line=line, field=field)
    return value


def _check_split(task: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise EngineError(f"task {task!r} has no split {split!r}; expected one of {', '.join(allowed)}",
                          field="split")


def _unique_ids(items: list[TaskItem], lines: list[int], path: Path) -> list[TaskItem]:
    seen: dict[str, int] = {}
    for item, line in zip(items, lines):
        if item.id in seen:
            raise EngineError(f"duplicate id {item.id!r} (first on line {seen[item.id]})", path=path, line=line,
                              field="id")
        seen[item.id] = line
    return items


# ---------------------------------------------------------------- built-in tasks
_GSM8K_GOLD = re.compile(r"-?\d+(?:\.\d+)?")


def _load_gsm8k(split: str, data_dir: Path) -> list[TaskItem]:
    _check_split("gsm8k", split, ("train", "test"))
    path = data_dir / "gsm8k" / f"{split}.jsonl"
    items = []
    for index, (line, rec) in enumerate(_read_jsonl(path)):
        question, answer = _field(rec, "question", path, line), _field(rec, "answer", path, line)
        if "####" not in answer:
            raise EngineError("expected a final '#### <number>' line", path=path, line=line, field="answer")
        gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
        if not _GSM8K_GOLD.fullmatch(gold):
            raise EngineError(f"expected a number after '####', got {gold!r:.40}", path=path, line=line,
                              field="answer")
        items.append(TaskItem(f"gsm8k-{split}-{index}", question, gold, "gsm8k", answer, where=(str(path), line)))
    return items


def _aime_loader(year: int) -> TaskLoader:
    def load(split: str, data_dir: Path) -> list[TaskItem]:
        _check_split(f"aime{year}", split, ("test",))
        path = data_dir / "aime" / f"{year}.jsonl"
        rows = _read_jsonl(path)
        items = []
        for line, rec in rows:
            answer = _field(rec, "answer", path, line, allow_int=True).strip()
            if not re.fullmatch(r"\d+", answer):
                raise EngineError(f"expected an integer answer, got {answer!r:.40}", path=path, line=line,
                                  field="answer")
            items.append(TaskItem(_field(rec, "id", path, line), _field(rec, "problem", path, line),
                                  str(int(answer)), f"aime{year}", where=(str(path), line)))
        return _unique_ids(items, [line for line, _ in rows], path)
    return load


def _load_aime_all(split: str, data_dir: Path) -> list[TaskItem]:
    _check_split("aime", split, ("test",))
    return [item for year in (2024, 2025, 2026) for item in _aime_loader(year)(split, data_dir)]


def _load_math500(split: str, data_dir: Path) -> list[TaskItem]:
    _check_split("math500", split, ("test",))
    path = data_dir / "math500" / "test.jsonl"
    rows = _read_jsonl(path)
    items = [TaskItem(_field(rec, "unique_id", path, line), _field(rec, "problem", path, line),
                      _field(rec, "answer", path, line, allow_int=True).strip(), "math500",
                      _field(rec, "solution", path, line), where=(str(path), line)) for line, rec in rows]
    return _unique_ids(items, [line for line, _ in rows], path)


register_task("gsm8k", _load_gsm8k)
for _year in (2024, 2025, 2026):
    register_task(f"aime{_year}", _aime_loader(_year))
register_task("aime", _load_aime_all)
register_task("math500", _load_math500)


# ---------------------------------------------------------------- prompts and answers
PROMPT_STYLES: dict[str, str] = {
    # The Qwen math-eval suffix (the AIME source files carried exactly this line).
    "boxed": "Please reason step by step, and put your final answer within \\boxed{}.",
    "gsm8k": "Please reason step by step, and write your final answer on the last line as '#### <answer>'.",
    # The bare question (answer as `#### n`): the embedded tiny model's format, learned from its data.
    "plain": "",
}


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise EngineError(f"unknown answer style {style!r}; expected one of {', '.join(PROMPT_STYLES)}",
                          field="style")


def build_prompt(item: TaskItem, style: str = "boxed") -> list[dict[str, str]]:
    """Chat messages (one user turn) asking for step-by-step reasoning and the answer in `style`."""
    _check_style(style)
    suffix = PROMPT_STYLES[style]
    return [{"role": "user", "content": f"{item.question}\n{suffix}" if suffix else item.question}]


def answer_text(item: TaskItem, style: str = "boxed") -> str:
    """The gold answer written as the answer format of `style`: `\\boxed{18}` or `#### 18`."""
    _check_style(style)
    return f"\\boxed{{{item.gold}}}" if style == "boxed" else f"#### {item.gold}"
