"""Class 1 of issue 20: a command never truncates, replaces or deletes a path it did not recognisably
write. Real `cli.py` processes; every refused path must be left byte for byte."""
import json
from pathlib import Path

import pytest

from cli_probe import EMBEDDED, assert_one_line_error, rollout_args, run_cli, run_cli_batch

FOREIGN_TEXT = "my notes\nline two\n{\"not\": \"a rollout\"}\n"


def snapshot(path: Path) -> dict:
    """Every file under `path` (or the file itself) with its bytes."""
    if path.is_file():
        return {path: path.read_bytes()}
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    """An uninterrupted rollout file (2 groups of K = 2)."""
    out = tmp_path_factory.mktemp("ref") / "rollouts.jsonl"
    proc = run_cli(*rollout_args(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_bytes()


def foreign_rollout_outs(tmp: Path, reference: bytes) -> dict[str, Path]:
    data = tmp / "data"
    data.mkdir()
    cases = {
        "text file": "my notes\nline two\n",
        "task data file": "".join(json.dumps({"question": f"q{i}", "answer": "#### 1"}) + "\n" for i in range(3)),
        "unterminated foreign line": "just one line without a newline",
        "records then foreign tail": reference.decode() + "user text appended later",
        "records then foreign line": reference.decode() + "a line of mine\n",
        "foreign line then records": "a line of mine\n" + reference.decode(),
        "not utf-8": "caf\xe9\n",
    }
    paths = {}
    for i, (name, text) in enumerate(cases.items()):
        p = data / f"case{i}.jsonl"
        p.write_bytes(text.encode("latin-1") if name == "not utf-8" else text.encode())
        paths[name] = p
    return paths


def test_rollout_refuses_files_it_did_not_write(tmp_path, reference):
    outs = foreign_rollout_outs(tmp_path, reference)
    before = {name: path.read_bytes() for name, path in outs.items()}
    directory = tmp_path / "a-dir"
    directory.mkdir()
    results = run_cli_batch([rollout_args(path) for path in outs.values()] + [rollout_args(directory)])
    for (name, path), proc in zip(outs.items(), results):
        assert_one_line_error(proc, str(path))
        assert path.read_bytes() == before[name], name
    assert_one_line_error(results[-1], str(directory), "not a file")


def test_rollout_resume_cuts_only_its_own_torn_tail(tmp_path, reference):
    lines = reference.split(b"\n")
    assert len(lines) == 5 and lines[-1] == b""
    nl = b"\n"
    torn = {"first byte": lines[0][:1],                                            # killed in the first write
            "second group's first line": nl.join(lines[:2]) + nl + lines[2][:len(lines[2]) // 2],
            "last line": nl.join(lines[:4])}                                        # no final newline
    for name, text in torn.items():
        out = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        out.write_bytes(text)
        proc = run_cli(*rollout_args(out))
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        assert out.read_bytes() == reference, name


def test_eval_analyze_bench_build_train_refuse_foreign_outputs(tmp_path):
    foreign = tmp_path / "foreign"
    (foreign / "eval").mkdir(parents=True)
    (foreign / "eval" / "synthetic_test.jsonl").write_text(FOREIGN_TEXT)
    (foreign / "report").mkdir()
    (foreign / "report" / "report.md").write_text("# my own report\n")
    (foreign / "metrics").mkdir()
    (foreign / "metrics" / "metrics.json").write_text('{"mine": 1}\n')
    (foreign / "bench.json").write_text('{"mine": 1}\n')
    (foreign / "build" / "runs" / "build-embedded").mkdir(parents=True)
    (foreign / "build" / "runs" / "build-embedded" / "thesis.tex").write_text("years of work\n")
    (foreign / "build2" / "out" / "base").mkdir(parents=True)
    (foreign / "build2" / "out" / "base" / "photo.jpg").write_text("jpeg\n")
    (foreign / "build3" / "out").mkdir(parents=True)
    (foreign / "build3" / "out" / "rollouts.jsonl").write_text(FOREIGN_TEXT)
    before = snapshot(foreign)

    eval_out = foreign / "eval"
    cases = [
        (["eval", "--model", EMBEDDED, "--task", "synthetic", "--limit", 2, "--max-new-tokens", 4, "--device", "cpu",
          "--out", eval_out], [str(eval_out / "synthetic_test.jsonl"), "not a per-item eval file"]),
        (["analyze", tmp_path / "no-run", "--out", foreign / "report"], ["report.md"]),
        (["analyze", tmp_path / "no-run", "--out", foreign / "metrics"], ["metrics.json"]),
        (["bench", "--model-config", tmp_path / "none.json", "--json", foreign / "bench.json"],
         ["bench.json", "not a bench result"]),
        (["build-embedded", "--out", foreign / "build" / "out"], ["build-embedded"]),
        (["build-embedded", "--out", foreign / "build2" / "out"], ["base"]),
        (["build-embedded", "--out", foreign / "build3" / "out"], ["rollouts.jsonl"]),
    ]
    for (_, needles), proc in zip(cases, run_cli_batch([args for args, _ in cases])):
        assert_one_line_error(proc, *needles)
    assert snapshot(foreign) == before


def test_train_refuses_a_foreign_metrics_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(FOREIGN_TEXT)
    before = snapshot(out)
    proc = run_cli("train", "--loss", "sft", "--steps", 1, "--out", out, "--quiet")
    assert_one_line_error(proc, "metrics.jsonl", "not a training metrics log")
    assert {p: b for p, b in snapshot(out).items() if p.name != ".lock"} == before  # the lock is the run's


def test_eval_rerun_replaces_its_own_output(tmp_path):
    out = tmp_path / "eval"
    args = ("eval", "--model", EMBEDDED, "--task", "synthetic", "--limit", 2, "--max-new-tokens", 4,
            "--device", "cpu", "--out", out)
    for _ in range(2):
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((out / "synthetic_test.jsonl").read_text().splitlines()) == 2


def test_train_resume_keeps_a_foreign_final_directory(tmp_path):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "final" / "notes.txt").write_text("mine\n")
    proc = run_cli("train", "--loss", "sft", "--steps", 1, "--out", out, "--quiet", "--resume")
    assert_one_line_error(proc, str(out / "final"), "not a checkpoint directory")
    assert (out / "final" / "notes.txt").read_text() == "mine\n"
