"""The repository carries every file its commands and tests read: data/ matches data/SOURCES.md byte for
byte, the engine defaults to it, and no tracked code path reads the `shared/` folder beside the repository."""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys

from helpers import DATA, REPO

import engine.tasks.registry


def _listed() -> dict[str, str]:
    """{relative path: sha256} from the table of data/SOURCES.md."""
    rows = re.findall(r"^\| `([^`]+)` \| [^|]+ \| `([0-9a-f]{64})` \|$", (DATA / "SOURCES.md").read_text(), re.M)
    return dict(rows)


def test_every_data_file_is_listed_with_its_sha256():
    listed = _listed()
    assert len(listed) == 12, listed
    present = {p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file() and p.name != "SOURCES.md"}
    assert present == set(listed), (present ^ set(listed))
    for rel, digest in listed.items():
        assert hashlib.sha256((DATA / rel).read_bytes()).hexdigest() == digest, rel


def test_engine_defaults_to_the_repository_data(monkeypatch):
    monkeypatch.delenv("ENGINE_DATA_DIR", raising=False)
    assert engine.tasks.registry.default_data_dir() == DATA == engine.tasks.registry.DATA_DIR
    assert engine.tasks.registry.QWEN3_CONFIGS == DATA / "qwen3-configs"
    assert len(engine.tasks.registry.load_task("gsm8k", "test", limit=2)) == 2


def test_no_tracked_code_reads_the_shared_folder():
    """A clone has nothing beside it: no code, script, config or doc link may point at ../shared."""
    if not (REPO / ".git").exists():  # an exported tree (no git): scan the files on disk instead
        files = [p.relative_to(REPO).as_posix() for p in REPO.rglob("*") if p.is_file()]
    else:
        files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"(?:\.\./|/work/)shared\b|parent\s*/\s*[\"']shared[\"']")
    hits = []
    for rel in files:
        if rel.endswith((".py", ".sh", ".md", ".toml", ".json", ".cfg", ".ini")) or rel in ("Makefile", ".ci/run"):
            if rel == "tests/test_data_folder.py":
                continue
            text = (REPO / rel).read_text(encoding="utf-8", errors="replace")
            hits += [f"{rel}:{n}" for n, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_eval_without_a_data_file_names_what_it_expected(tmp_path):
    """`cli.py eval --task gsm8k` with an empty data directory: one line, exit 2, the file it expected."""
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "eval", "--model", str(REPO / "embedded" / "base"),
                           "--task", "gsm8k", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "expected gsm8k/test.jsonl" in proc.stderr and "--data-dir" in proc.stderr, proc.stderr
