"""Run real `cli.py` processes for the bad-input tests: one thread, offline, output captured."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO

EMBEDDED = REPO / "embedded" / "base"


def run_cli(*args: object, timeout: float = 120, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
                **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=REPO, **popen)


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


# Many probes in one process: torch is imported once. Each runs `cli.main` exactly as `python cli.py
# ARGS` would (click's standalone mode: SystemExit with the exit code); an exception escaping it is
# what the user would have seen as a traceback, so it is reported as exit 1 with "Traceback".
_BATCH_DRIVER = r'''
import contextlib, io, json, sys, traceback
sys.path.insert(0, sys.argv[1])
import cli
for args in json.loads(sys.stdin.read()):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            cli.main(args, prog_name="cli.py")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    print(json.dumps([code, err.getvalue(), out.getvalue()]), flush=True)
'''


def run_cli_batch(probes: list[list[object]], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`run_cli` for each probe, all in one interpreter; one CompletedProcess-like result per probe."""
    import json
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", _BATCH_DRIVER, str(REPO)], capture_output=True, text=True,
                          input=json.dumps([[str(a) for a in p] for p in probes]), timeout=timeout, env=env,
                          cwd=REPO)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(results) == len(probes), proc.stderr[-3000:]
    return [subprocess.CompletedProcess(p, code, out, err) for p, (code, err, out) in zip(probes, results)]
