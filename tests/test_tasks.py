"""Task loaders: counts and golds of the real data files, the registry, prompts, and clear errors for bad
files (written into tmp_path)."""
import json
import re
from pathlib import Path

import pytest

from engine.errors import EngineError
from engine.tasks.grading import grade
from engine.tasks.registry import (PROMPT_STYLES, TaskItem, answer_text, build_prompt, default_data_dir, default_style,
                                   load_task, register_task, task_names)
from engine.tasks import registry as tasks_module
from helpers import DATA


@pytest.mark.parametrize("name,split,count,source", [
    ("gsm8k", "test", 1319, "gsm8k"), ("gsm8k", "train", 7473, "gsm8k"), ("math500", "test", 500, "math500"),
    ("aime2024", "test", 30, "aime2024"), ("aime2025", "test", 30, "aime2025"), ("aime2026", "test", 30, "aime2026"),
])
def test_counts_ids_and_sources(name, split, count, source):
    items = load_task(name, split, data_dir=DATA)
    assert len(items) == count
    assert len({it.id for it in items}) == count
    assert all(isinstance(it, TaskItem) and it.source == source and it.question.strip() for it in items)


def test_gsm8k_golds_match_the_final_line():
    rows = [json.loads(line) for line in open(DATA / "gsm8k" / "test.jsonl", encoding="utf-8")]
    items = load_task("gsm8k", "test", data_dir=DATA)
    for row, item in zip(rows, items):
        last_line = row["answer"].strip().splitlines()[-1]
        assert last_line.startswith("####")
        assert item.gold == last_line[4:].strip().replace(",", "")
        assert re.fullmatch(r"-?\d+", item.gold)
        assert item.question == row["question"] and item.solution == row["answer"]
    by_id = {it.id: it for it in items}
    assert by_id["gsm8k-test-0"].gold == "18"  # Janet's ducks
    assert any("," in r["answer"].rsplit("####", 1)[1] for r in rows)  # separators occur and were removed
    assert sum(it.gold.startswith("-") for it in items) == 2


def test_aime_golds_and_union():
    all_items = load_task("aime", "test", data_dir=DATA)
    assert len(all_items) == 90
    assert [it.source for it in all_items[::30]] == ["aime2024", "aime2025", "aime2026"]
    for item in all_items:
        assert re.fullmatch(r"\d{4}-(I|II)-\d+", item.id)
        assert 0 <= int(item.gold) <= 999 and item.gold == str(int(item.gold)) and item.solution is None
    first = load_task("aime2026", "test", data_dir=DATA)[0]
    assert (first.id, first.gold) == ("2026-I-1", "277")


def test_math500_fields():
    items = load_task("math500", "test", data_dir=DATA)
    first = items[0]
    assert first.id == "test/precalculus/807.json"
    assert first.gold == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert "\\boxed" in first.solution
    assert all(grade(it.solution, it.gold) for it in items)


def test_limit_data_dir_env_and_default(tmp_path, monkeypatch):
    assert [it.id for it in load_task("gsm8k", "test", data_dir=DATA, limit=3)] == [
        "gsm8k-test-0", "gsm8k-test-1", "gsm8k-test-2"]
    assert load_task("aime2024", "test", data_dir=DATA, limit=0) == []
    (tmp_path / "aime").mkdir()
    (tmp_path / "aime" / "2025.jsonl").write_text('{"id": "x-1", "problem": "p?", "answer": "007"}\n\n')
    monkeypatch.setenv("ENGINE_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    assert load_task("aime2025", "test") == [TaskItem("x-1", "p?", "7", "aime2025", None)]
    assert len(load_task("aime2025", "test", data_dir=DATA)) == 30  # the argument wins over the env var
    monkeypatch.delenv("ENGINE_DATA_DIR")
    assert default_data_dir().resolve() == DATA.resolve()
    assert len(load_task("AIME2025", "test")) == 30


@pytest.mark.parametrize("limit", [-1, 1.5, "3", True])
def test_bad_limit(limit):
    with pytest.raises(EngineError, match="limit"):
        load_task("aime2024", "test", data_dir=DATA, limit=limit)


def test_unknown_task_and_split():
    with pytest.raises(EngineError, match="unknown task 'gsm9k'.*gsm8k"):
        load_task("gsm8k".replace("8", "9"), "test", data_dir=DATA)
    for name, split in [("gsm8k", "validation"), ("aime2026", "train"), ("math500", "train"), ("aime", "dev")]:
        with pytest.raises(EngineError, match=f"field 'split'.*{split}"):
            load_task(name, split, data_dir=DATA)


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


GOOD_GSM = json.dumps({"question": "q?", "answer": "work\n#### 1,234"})
GOOD_MATH = json.dumps({"problem": "p", "solution": "\\boxed{2}", "answer": "2", "subject": "Algebra",
                        "level": 1, "unique_id": "test/algebra/1.json"})


@pytest.mark.parametrize("task,relpath,lines,where", [
    ("gsm8k", "gsm8k/test.jsonl", [GOOD_GSM, "{not json"], ":2: not valid JSON"),
    ("gsm8k", "gsm8k/test.jsonl", [GOOD_GSM, '{"question": "q"}'], ":2: field 'answer': missing field"),
    ("gsm8k", "gsm8k/test.jsonl", ['{"question": "q", "answer": "no final line"}'], ":1: field 'answer': expected a final"),
    ("gsm8k", "gsm8k/test.jsonl", ['{"question": "q", "answer": "x\\n#### twelve"}'], ":1: field 'answer': expected a number"),
    ("gsm8k", "gsm8k/test.jsonl", ['{"question": 5, "answer": "#### 1"}'], ":1: field 'question': expected a non-empty string"),
    ("gsm8k", "gsm8k/test.jsonl", ['["question", "answer"]'], ":1: expected a JSON object"),
    ("gsm8k", "gsm8k/test.jsonl", [], "no records"),
    ("gsm8k", "gsm8k/test.jsonl", ["", "   "], "no records"),
    ("aime2024", "aime/2024.jsonl", ['{"id": "a", "problem": "p", "answer": "1/2"}'], ":1: field 'answer': expected an integer"),
    ("aime2024", "aime/2024.jsonl", ['{"id": "a", "problem": "p", "answer": "1"}', '{"id": "a", "problem": "q", "answer": "2"}'],
     ":2: field 'id': duplicate id 'a' (first on line 1)"),
    ("aime2024", "aime/2024.jsonl", ['{"id": "a", "answer": "1"}'], ":1: field 'problem': missing field"),
    ("aime", "aime/2024.jsonl", ['{"id": "a", "problem": "p", "answer": ""}'], ":1: field 'answer': expected a non-empty"),
    ("math500", "math500/test.jsonl", [GOOD_MATH, GOOD_MATH.replace('"answer": "2", ', "")], ":2: field 'answer': missing"),
    ("math500", "math500/test.jsonl", [GOOD_MATH, GOOD_MATH], ":2: field 'id': duplicate id"),
])
def test_bad_files_name_file_line_field(tmp_path, task, relpath, lines, where):
    _write(tmp_path / relpath, lines)
    with pytest.raises(EngineError) as info:
        load_task(task, "test", data_dir=tmp_path)
    message = str(info.value)
    assert message.startswith(str(tmp_path / relpath)), message
    assert where in message, message


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(EngineError, match="data file not found") as info:
        load_task("math500", "test", data_dir=tmp_path)
    assert info.value.path == str(tmp_path / "math500" / "test.jsonl")
    # The message says which file it expected, where the repository keeps its copy, and how to point at one.
    assert "expected math500/test.jsonl" in str(info.value), str(info.value)
    assert f"ships it as {DATA / 'math500' / 'test.jsonl'}" in str(info.value), str(info.value)
    assert "--data-dir" in str(info.value) and "ENGINE_DATA_DIR" in str(info.value)
    with pytest.raises(EngineError, match="expected gsm8k/dev.jsonl.*SOURCES.md names the public source"):
        tasks_module._read_jsonl(tmp_path / "gsm8k" / "dev.jsonl")  # not a shipped file: no copy to point at
    path = tmp_path / "gsm8k" / "train.jsonl"
    path.parent.mkdir()
    path.write_bytes(b'{"question": "\xff", "answer": "#### 1"}\n')
    with pytest.raises(EngineError, match="not UTF-8"):
        load_task("gsm8k", "train", data_dir=tmp_path)


def test_good_tmp_files_parse(tmp_path):
    _write(tmp_path / "gsm8k" / "train.jsonl", [GOOD_GSM, "", GOOD_GSM.replace("1,234", "-7")])
    items = load_task("gsm8k", "train", data_dir=tmp_path)
    assert [(it.id, it.gold) for it in items] == [("gsm8k-train-0", "1234"), ("gsm8k-train-1", "-7")]
    _write(tmp_path / "math500" / "test.jsonl", [GOOD_MATH])
    assert load_task("math500", "test", data_dir=tmp_path) == [
        TaskItem("test/algebra/1.json", "p", "2", "math500", "\\boxed{2}")]


def test_register_task_hook(monkeypatch):
    task_names()  # plugins register into the real registry before it is swapped for a copy
    monkeypatch.setattr(tasks_module, "_REGISTRY", dict(tasks_module._REGISTRY))
    seen = []

    def loader(split, data_dir):
        seen.append((split, data_dir))
        return [TaskItem(f"syn-{k}", f"{k} + {k} = ?", str(2 * k), "toy") for k in range(5)]

    register_task("toy", loader)
    register_task("toy", loader)  # re-registering the same function (module re-import) is fine
    assert "toy" in task_names()
    assert [it.gold for it in load_task("toy", "train", data_dir="/nowhere", limit=2)] == ["0", "2"]
    assert seen == [("train", Path("/nowhere"))]
    with pytest.raises(ValueError, match="already registered"):
        register_task("toy", lambda split, data_dir: [])
    register_task("toy", lambda split, data_dir: [], overwrite=True)
    assert load_task("toy", "test") == []
    with pytest.raises(ValueError, match="lower-case"):
        register_task("Bad Name", loader)


def test_prompt_and_answer_text():
    item = load_task("gsm8k", "test", data_dir=DATA, limit=1)[0]
    messages = build_prompt(item)
    assert messages == [{"role": "user", "content": item.question + "\n" + PROMPT_STYLES["boxed"]}]
    assert "\\boxed{}" in messages[0]["content"] and "step by step" in messages[0]["content"]
    native = build_prompt(item, style="gsm8k")[0]["content"]
    assert native.startswith(item.question) and "####" in native
    assert answer_text(item) == "\\boxed{18}"
    assert answer_text(item, style="gsm8k") == "#### 18"
    for style in PROMPT_STYLES:  # the gold written in each format grades correct
        assert grade("reasoning\n" + answer_text(item, style), item.gold)
    math_item = load_task("math500", "test", data_dir=DATA, limit=1)[0]
    assert answer_text(math_item) == "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}"
    assert grade(answer_text(math_item), math_item.gold)
    with pytest.raises(EngineError, match="field 'style'"):
        build_prompt(item, style="latex")
    with pytest.raises(EngineError, match="field 'style'"):
        answer_text(item, style="latex")


def test_default_style_is_what_the_task_was_written_for():
    """The synthetic task's prompts are the bare question (what the embedded model learned); the rest ask for
    a boxed answer. Unknown names fall back to boxed, and the lookup ignores case as load_task does."""
    assert default_style("synthetic") == default_style(" Synthetic ") == "plain"
    assert [default_style(t) for t in ("gsm8k", "aime2026", "math500", "no-such-task")] == ["boxed"] * 4
    register_task("styled-test-task", lambda split, d: [], overwrite=True, style="gsm8k")
    assert default_style("styled-test-task") == "gsm8k"
