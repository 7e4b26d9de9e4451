"""Hardened inputs: property-based fuzzing (hypothesis) of the rollouts parser, the TOML config loader
on random and mutated inputs -- nothing but EngineError ever comes out, and it names the file, the line
and the field. (The adapter loader's fuzzing: tests/test_lora.py; untrusted files: tests/test_untrusted_files.py.)

Example counts are modest (see helpers.MAX_EXAMPLES) so the file stays fast; the counts actually tried are
printed at the end of the module (run with -s)."""
import json
import math
import string
from pathlib import Path

import pytest
from hypothesis import example, given, strategies as st

from engine.train.rollouts import read_rollouts
from engine.errors import EngineError
from engine.train.train_config import TrainConfig, load_config
from helpers import FUZZ, JSON, report_counts, tried  # noqa: F401 (report_counts: autouse)


def no_surrogates(s: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF for c in s)


# ---- rollouts (engine/train/rollouts.py read_rollouts) -----------------------------------------------------
ROLLOUT_FIELDS = ("prompt", "completion", "reward", "group", "behavior_logps", "finished", "completion_ids",
                  "stop_id", "enable_thinking")
REQUIRED = ("prompt", "completion", "reward", "group")
VALID_ROLLOUT = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=20) | st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=20)}),
        min_size=1, max_size=3),
     "completion": st.text(min_size=1, max_size=30).filter(str.strip),
     "reward": st.integers(-5, 5) | st.floats(-10, 10, allow_nan=False),
     "group": st.text(max_size=6) | st.integers(-99, 99)},
    optional={"behavior_logps": st.lists(st.floats(-20, 0), max_size=4), "finished": st.booleans(),
              "completion_ids": st.lists(st.integers(0, 10 ** 6), max_size=4),
              "answer": JSON, "source": JSON})
# Values each field must reject, beside the random ones.
INVALID = {
    "prompt": st.sampled_from(["", [], [{"role": "user"}], [{"role": 1, "content": "x"}], 5, None, ["x"]]),
    "completion": st.sampled_from(["", "   \n", 3, None, ["x"]]),
    "reward": st.sampled_from([float("nan"), float("inf"), "1", True, None, [1], 10 ** 400]),
    "group": st.sampled_from([None, True, 1.5, [1], {"a": 1}]),
    "behavior_logps": st.sampled_from([[0.5], ["x"], [float("nan")], 3, [True], [10 ** 400]]),
    "finished": st.sampled_from([0, 1, "yes", None]),
    "completion_ids": st.sampled_from([[-1], ["x"], [True], 5, [1.5], {"a": 1}]),
    "stop_id": st.sampled_from([-1, "x", True, 1.5, [1], {"a": 1}]),
    "enable_thinking": st.sampled_from([0, 1, "false", [True], {"a": 1}]),
}


def mutation():
    """(kind, field, value) applied to one valid record; `field` is the only field it can break."""
    return st.one_of(
        st.tuples(st.just("drop"), st.sampled_from(REQUIRED), st.none()),
        st.tuples(st.just("set"), st.sampled_from(ROLLOUT_FIELDS), JSON),
        st.sampled_from(ROLLOUT_FIELDS).flatmap(lambda f: st.tuples(st.just("invalid"), st.just(f), INVALID[f])),
        st.tuples(st.just("surrogate"), st.sampled_from(["completion", "prompt"]), st.none()),
        st.tuples(st.just("truncate"), st.none(), st.integers(0, 200)),
        st.tuples(st.just("text"), st.none(), st.text(max_size=40).filter(lambda s: "\n" not in s and "\r" not in s)),
        st.tuples(st.just("bytes"), st.none(), st.binary(max_size=40).filter(lambda b: b"\n" not in b)),
        st.tuples(st.just("deep"), st.none(), st.integers(2000, 50000)),
    )


def render(record: dict, mut) -> tuple[bytes, str | None]:
    """The mutated line and the field an error about it must name ('*' = any, None = the line)."""
    kind, field, value = mut
    rec = dict(record)
    if kind == "drop":
        rec.pop(field)
        return json.dumps(rec).encode(), field
    if kind in ("set", "invalid"):
        rec[field] = value
        return json.dumps(rec).encode(), field
    if kind == "surrogate":
        rec[field] = "x\ud800y"
        return json.dumps(rec).encode(), field  # json escapes it as \ud800: valid JSON, invalid text
    if kind == "truncate":
        return json.dumps(rec).encode()[:value], None
    if kind == "text":
        return value.encode("utf-8", "surrogatepass"), "*"
    if kind == "bytes":
        return value, "*"
    return b"[" * value + b"]" * value, None


@FUZZ
@example(before=[], record={"prompt": "0", "completion": "0", "reward": 0, "group": ""},  # found by a long run
         mut=("text", None, "\x1f"), after=[], blank=False)
@given(before=st.lists(VALID_ROLLOUT, max_size=3), record=VALID_ROLLOUT, mut=mutation(),
       after=st.lists(VALID_ROLLOUT, max_size=2), blank=st.booleans())
def test_rollouts_parser_only_raises_engine_errors_naming_file_line_field(tmp_path, before, record, mut,
                                                                         after, blank):
    tried("rollouts")
    bad_line, field = render(record, mut)
    lines = [json.dumps(r).encode() for r in before] + ([b"   "] if blank else []) + [bad_line] + \
        [json.dumps(r).encode() for r in after]
    line_no = len(before) + (2 if blank else 1)
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        rollouts, _ = read_rollouts(path)
    except EngineError as e:
        if not bad_line.strip(b" \t\r\n"):  # JSON's whitespace only (not \x0b, \x0c or \x1c-\x1f)
            assert not before and not after and e.line is None and "no rollouts" in e.message
            return
        assert e.path == str(path) and e.line == line_no, (str(e), line_no)
        assert str(e).startswith(f"{path}:{line_no}: ")
        if field == "*":
            assert e.field in ROLLOUT_FIELDS + (None,)
        else:
            assert e.field == field, (str(e), field)
        if e.field is None:
            assert e.message.startswith(("not valid JSON", "expected a JSON object", "not UTF-8 text"))
        # Skipping bad lines keeps every good one and counts the bad one.
        if before or after:
            kept, skipped = read_rollouts(path, on_bad="skip")
            assert len(kept) == len(before) + len(after) and skipped.count == 1
        return
    # Accepted: the mutation left a valid record, read back as written.
    expected = before + [json.loads(bad_line)] + after if bad_line.strip(b" \t\r\n") else before + after
    assert len(rollouts) == len(expected)
    for got, want in zip(rollouts, expected):
        assert got.completion == want["completion"] and got.group == str(want["group"])
        assert got.reward == float(want["reward"]) and math.isfinite(got.reward)
        assert got.prompt == want["prompt"]


RAW_SEPARATORS = "\u2028\u2029\x85\x1c\x1d\x1e"  # str.splitlines() breaks at these; JSON strings hold them raw


def test_jsonl_readers_break_lines_at_newline_only(tmp_path):
    """Rollouts, task data and per-item eval files whose strings hold U+2028, U+0085, \\x1c... unescaped
    (as json.dumps(..., ensure_ascii=False) writes them) read back whole; a line of a lone \\x1f (blank
    to str.strip(), not to JSON) is an error on its own line, not a silently skipped gap."""
    from analysis.stats import read_items
    from engine.tasks.registry import load_task
    text = f"a{RAW_SEPARATORS}b"
    rollouts = tmp_path / "r.jsonl"
    rows = [{"prompt": text, "completion": f"{text} #### 3", "reward": 1.0, "group": "g"}] * 2
    rollouts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    got, _ = read_rollouts(rollouts)
    assert [r.completion for r in got] == [rows[0]["completion"]] * 2 and got[0].prompt == text
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text("\n" + json.dumps({"question": text, "answer": "#### 7"}, ensure_ascii=False)
                                     + "\n", encoding="utf-8")
    [item] = load_task("gsm8k", "test", data_dir=tmp_path / "data")
    assert item.question == text and item.gold == "7"
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": i, "completion": text, "correct": i == 1}, ensure_ascii=False) + "\n"
                             for i in range(3)), encoding="utf-8")
    assert read_items(items) == {"0": False, "1": True, "2": False}
    for path in (rollouts, items):
        path.write_text(path.read_text(encoding="utf-8") + "\x1f\n", encoding="utf-8")
    with pytest.raises(EngineError) as e:
        read_rollouts(rollouts)
    assert e.value.line == 3 and "not valid JSON" in e.value.message
    with pytest.raises(EngineError) as e:
        read_items(items)
    assert e.value.line == 4


# ---- TOML config (engine/train/train_config.py load_config) ------------------------------------------
CONFIG_FIELDS = sorted(TrainConfig.__dataclass_fields__)
TOML_SCALAR = st.one_of(st.booleans(), st.integers(-(2 ** 63), 2 ** 63 - 1), st.sampled_from([10 ** 30, -1, 0]),
                        st.floats(), st.text(max_size=10).filter(no_surrogates),
                        st.sampled_from(["fail", "skip", "one", "all", "float32", "q_proj", "a\x00b"]))
TOML_VALUE = st.recursive(TOML_SCALAR, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=6), inner, max_size=2),
                          max_leaves=6)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


BASE_TOML = 'steps = 3\nlr = 0.001\nbatch_size = 8\n\n[lr_per_loss]\ndpo = 0.0001\n'


@FUZZ
@given(key=st.sampled_from(CONFIG_FIELDS) | st.text(string.ascii_lowercase + "_", min_size=1, max_size=10),
       value=TOML_VALUE, as_table=st.booleans())
def test_config_loader_names_file_line_field(tmp_path, key, value, as_table):
    """One setting with a random value, written as `key = value` (or a [key] table): accepted and
    stored as written, or rejected naming the file, the key's line and the key."""
    tried("config-values")
    if key in ("steps", "lr", "batch_size", "lr_per_loss"):
        key = "seed"
    path = tmp_path / "c.toml"
    if as_table and isinstance(value, dict) and value:
        text = BASE_TOML + f"\n[{key}]\n" + "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in value.items())
        key_line = BASE_TOML.count("\n") + 2
    else:
        text = f"{key} = {toml_value(value)}\n" + BASE_TOML
        key_line = 1
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(path)
    except EngineError as e:
        assert e.path == str(path), str(e)
        if e.message.startswith("not valid TOML"):
            assert e.line is not None and e.field is None   # TOML syntax (e.g. a raw DEL in a string)
        else:
            assert (e.field, e.line) == (key, key_line), (str(e), key, key_line)
            assert str(e).startswith(f"{path}:{key_line}: field '{key}': ")
        return
    got = getattr(cfg, key)
    assert got == value or (isinstance(value, int) and got == float(value)) or \
        (isinstance(value, list) and got == [float(x) for x in value]) or \
        (isinstance(value, dict) and got == {k: float(x) for k, x in value.items()})
    assert (cfg.steps, cfg.lr, cfg.lr_per_loss) == (3, 0.001, {"dpo": 0.0001})


CPU_TOML = (Path(__file__).resolve().parents[1] / "configs" / "cpu.toml").read_bytes()


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(CPU_TOML)), st.integers(0, 3), st.binary(max_size=3)),
                      min_size=1, max_size=4))
def test_config_loader_on_mutated_files(tmp_path, edits):
    """Byte-level mutations (replace / insert / delete) of the shipped config preset."""
    tried("config-mutations")
    data = bytearray(CPU_TOML)
    for at, remove, insert in edits:
        data[at:at + remove] = insert
    path = tmp_path / "c.toml"
    path.write_bytes(bytes(data))
    try:
        load_config(path)
    except EngineError as e:
        assert e.path == str(path)
        if e.field is not None or e.message.startswith(("not valid TOML", "not UTF-8")):
            assert e.line is not None and 1 <= e.line <= bytes(data).count(b"\n") + 1, str(e)


def test_config_loader_edge_cases(tmp_path):
    """Inputs that once escaped as other exceptions (RecursionError, OverflowError, ValueError) or
    were accepted although unusable: (text of line 2, the field named, the line named)."""
    cases = [(b"seed = " + b"[" * 3000 + b"]" * 3000, None, None), (b"lr = nan", "lr", 2),
             (b"seed = 1" + b"0" * 40, "seed", 2), (b"\xff\xfe = 1", None, 2), (b"save_every = 10000000000000", "save_every", 2),
             (b"adam_betas = [0.9]", "adam_betas", 2), (b"lora_targets = [1]", "lora_targets", 2),
             (b"loss_hparams = {dpo = 1}", "loss_hparams", 2), (b'model = "a\\u0000b"', "model", 2),
             (b"lr = 1" + b"0" * 400, "lr", 2), (b"[lr_per_loss]\ndpo = -inf", "lr_per_loss", 2)]
    for text, field, line in cases:
        path = tmp_path / "c.toml"
        path.write_bytes(b"steps = 3\n" + text + b"\n")
        with pytest.raises(EngineError) as info:
            load_config(path)
        e = info.value
        assert (e.path, e.field, e.line) == (str(path), field, line), str(e)
