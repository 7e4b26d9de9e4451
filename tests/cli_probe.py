"""Run real `cli.py` processes for the bad-input tests: one thread, offline, output captured."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO

EMBEDDED = REPO / "embedded" / "base"


def run_cli(*args: object, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
                **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=REPO)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, one `error:` line that contains every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def rollout_args(out: Path, *extra: object, limit: int = 2) -> list[object]:
    return ["rollout", "--model", EMBEDDED, "--task", "synthetic", "--limit", limit, "--k", 2,
            "--max-new-tokens", 8, "--device", "cpu", "--batch-size", 8, "--out", out, *extra]
