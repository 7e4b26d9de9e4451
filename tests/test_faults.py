"""Never lose a run: kill -9 at any moment then --resume gives the uninterrupted result bit for bit,
torn checkpoints are passed over with a warning, failed writes change nothing and say why, a second
writer is refused, and a non-finite gradient stops the run keeping the last good checkpoint.

The kills are real: `cli.py train` subprocesses get SIGKILL, either from the test at a random moment
of training or from themselves at an exact point of a checkpoint write (ENGINE_TEST_FAULT, a
test-only hook in engine/train/checkpoints.py)."""
import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import engine.fsio
from engine.train import checkpoints as ckpt
from engine.errors import EngineError
from engine.train.train_config import load_config
from engine.train.trainer import train
from helpers import REPO, tiny_model_dir, write_rollouts

LOSS, STEPS = "grpo", 10
KILLS = {"scheduled": 0, "random": 0}   # kills survived, reported at the end of the module


@contextlib.contextmanager
def one_thread():
    """The CLI subprocesses run with OMP_NUM_THREADS=1; so does an in-process reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, rollouts, a config with dropout (so the RNG state must survive a resume too),
    and the uninterrupted run every interrupted one must equal."""
    root = tmp_path_factory.mktemp("faults")
    model = tiny_model_dir(root / "model")
    rollouts = write_rollouts(root / "rollouts.jsonl", n_groups=6)
    config = root / "cfg.toml"
    config.write_text(textwrap.dedent(f"""\
        model = "{model}"
        rollouts = "{rollouts}"
        steps = {STEPS}
        lr = 2e-2
        batch_size = 8
        micro_batch_size = 4
        lora_r = 4
        lora_alpha = 8.0
        lora_dropout = 0.1
        warmup_ratio = 0.0
        max_len = 128
        save_every = 2
        """))
    with one_thread():
        reference = train(load_config(config, loss=LOSS, out=str(root / "reference")), progress=False)
    yield root, config, reference
    print(f"\nkills survived: {KILLS}")


def cli_args(config, out, *extra):
    return [sys.executable, str(REPO / "cli.py"), "train", "--loss", LOSS, "--config", str(config),
            "--out", str(out), "--quiet", *extra]


def cli_env(fault=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop(ckpt.FAULT_ENV, None)
    if fault:
        env[ckpt.FAULT_ENV] = fault
    return env


def run_cli(config, out, *extra, fault=None):
    return subprocess.run(cli_args(config, out, *extra), env=cli_env(fault), capture_output=True, text=True,
                          timeout=180)


def same_bytes(a: Path, b: Path) -> bool:
    """The adapter file byte for byte, and the optimizer state tensor for tensor (its safetensors
    header lists two metadata keys in a per-process hash order, so its bytes may differ)."""
    if (a / "adapter_model.safetensors").read_bytes() != (b / "adapter_model.safetensors").read_bytes():
        return False
    sa, sb = (load_file(str(d / "optimizer" / "optimizer.safetensors")) for d in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and \
        (a / "optimizer" / "optimizer.json").read_bytes() == (b / "optimizer" / "optimizer.json").read_bytes()


def rows(out: Path) -> list[dict]:
    """metrics.jsonl rows (a line torn by a kill is skipped, as the trainer does)."""
    if not (out / "metrics.jsonl").is_file():
        return []
    found = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            found.append(json.loads(line))
    return found


def step_rows(out: Path) -> list[int]:
    return [r["step"] for r in rows(out) if "step" in r]


def kill_at_random_moment(config, out, rng) -> int | None:
    """Start a resume and SIGKILL it a random moment after its first training step (mid-step,
    between steps or mid-checkpoint); returns its exit code (None if it finished first)."""
    starts = sum(r.get("event") == "start" for r in rows(out))
    proc = subprocess.Popen(cli_args(config, out, "--resume"), env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        found = rows(out)
        last_start = max((i for i, r in enumerate(found) if r.get("event") == "start"), default=-1)
        if sum(r.get("event") == "start" for r in found) > starts and any("step" in r for r in found[last_start:]):
            break
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.15))
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def test_kill_9_at_any_moment_then_resume_is_bit_identical(setup, tmp_path):
    root, config, reference = setup
    out = tmp_path / "run"
    # 1. Killed right after the step-2 checkpoint was renamed into place.
    r = run_cli(config, out, fault="kill:save-done:2")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert ckpt.verify(out / "step-2") is None and not (out / "final").exists()
    KILLS["scheduled"] += 1
    # 2. Resumed, then killed in the middle of writing step 4 (adapter and optimizer in the temp dir).
    r = run_cli(config, out, "--resume", fault="kill:save-mid:4")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    torn = [p for p in out.iterdir() if p.name.startswith(".step-4.")]
    assert len(torn) == 1 and (torn[0] / "adapter_model.safetensors").is_file()
    assert not (torn[0] / "manifest.json").exists() and not (out / "step-4").exists()
    KILLS["scheduled"] += 1
    # 3. Killed by the test at random moments of training.
    rng = random.Random(int(time.time()))
    for _ in range(2):
        code = kill_at_random_moment(config, out, rng)
        KILLS["random"] += code == -signal.SIGKILL
    # 4. The last resume finishes: same bytes as the run that was never interrupted.
    r = run_cli(config, out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert same_bytes(reference, out / "final")
    assert step_rows(out) == list(range(1, STEPS + 1))
    assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_second_writer_is_refused(setup, tmp_path):
    """Two real processes on one output directory: the second stops with one clear line and
    changes nothing; the lock dies with the first (kill -9), so a later resume can take it."""
    _, config, _ = setup
    out = tmp_path / "run"
    first = subprocess.Popen(cli_args(config, out), env=cli_env("pause:save-done:2"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "step-2").is_dir():
            assert first.poll() is None and time.monotonic() < deadline, "first run did not reach step 2"
            time.sleep(0.05)
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        metrics_before = (out / "metrics.jsonl").read_bytes()
        second = run_cli(config, out, "--resume")
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"error: {out}: another run is writing to this output directory (locked)"]
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
        assert (out / "metrics.jsonl").read_bytes() == metrics_before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with ckpt.OutputLock(out):
        pass


def test_torn_checkpoint_is_detected_and_the_previous_one_used(setup, tmp_path, capsys):
    root, config, reference = setup
    out = tmp_path / "run"
    with one_thread():
        cfg = load_config(config, loss=LOSS, out=str(out), steps=STEPS)
        train(cfg, progress=False)
    # Damage the newest checkpoints in ways a crash or a bad disk would.
    (out / f"step-{STEPS - 2}" / "manifest.json").unlink()
    blob = bytearray((out / "final" / "adapter_model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (out / "final" / "adapter_model.safetensors").write_bytes(bytes(blob))
    capsys.readouterr()
    with one_thread():
        final = train(cfg, resume=True, progress=False)
    said = capsys.readouterr().out
    assert f"checkpoint {out / 'final'} is incomplete or corrupt (adapter_model.safetensors: checksum " \
           "mismatch); using an earlier one" in said
    assert f"checkpoint {out / f'step-{STEPS - 2}'} is incomplete or corrupt (missing or unreadable manifest)" in said
    assert [r["resumed_from"] for r in rows(out) if r.get("event") == "start"] == [0, STEPS - 4]
    assert step_rows(out) == list(range(1, STEPS + 1))
    assert same_bytes(reference, final)


@pytest.mark.parametrize("damage,problem", ids=["file-missing", "truncated", "bad-manifest", "deep-manifest",
                                                 "empty-manifest", "traversal"], argvalues=[
    (lambda d: (d / "optimizer" / "optimizer.json").unlink(), "optimizer/optimizer.json: missing or wrong size"),
    (lambda d: (d / "rng.safetensors").write_bytes((d / "rng.safetensors").read_bytes()[:-3]),
     "rng.safetensors: missing or wrong size"),
    (lambda d: (d / "manifest.json").write_text("{\"files\": {\"a\": 5}}"), "missing or unreadable manifest"),
    (lambda d: (d / "manifest.json").write_text("[" * 100000), "missing or unreadable manifest"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({"files": {}})), "empty manifest"),
    (lambda d: (d / "manifest.json").write_text(json.dumps(
        {"files": {"../outside": {"size": 1, "sha256": "0"}}})), "outside the checkpoint directory"),
])
def test_verify_names_what_is_wrong(setup, tmp_path, damage, problem):
    root, _, reference = setup
    import shutil
    copy = tmp_path / "ckpt"
    shutil.copytree(reference, copy)
    assert ckpt.verify(copy) is None
    damage(copy)
    assert problem in ckpt.verify(copy)


def _ls(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): (p.read_bytes() if p.is_file() else b"") for p in sorted(out.rglob("*"))
            if "metrics" not in p.name}


def test_disk_full_keeps_the_previous_checkpoint(setup, tmp_path, monkeypatch):
    """ENOSPC half way through writing the final checkpoint: one line, exit 2, the step-8
    checkpoint and the directory exactly as they were, and a later resume completes the run."""
    from cli import main
    root, config, reference = setup
    out = tmp_path / "run"
    real = Path.write_bytes
    seen = {}

    def full_disk(self, data):
        if self.name == "rng.safetensors" and self.parent.name.startswith(".final."):
            seen["before"] = _ls(out)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with one_thread():
        result = CliRunner().invoke(main, ["train", "--loss", LOSS, "--config", str(config), "--out", str(out),
                                           "--quiet"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith(f"error: {out / 'final'}: could not write the step-{STEPS} checkpoint: No space "
                               "left on device") and "the previous checkpoint is kept" in lines[0]
    assert _ls(out) == {k: v for k, v in seen["before"].items() if not k.startswith(".final.")}
    assert sorted(p.name for p in out.iterdir()) == [".lock", "metrics.jsonl", "step-2", "step-4", "step-6",
                                                     "step-8"]
    assert ckpt.verify(out / "step-8") is None
    monkeypatch.setattr(Path, "write_bytes", real)   # space freed
    with one_thread():
        final = train(load_config(config, loss=LOSS, out=str(out)), resume=True, progress=False)
    assert same_bytes(reference, final)


def test_read_only_directory_says_so_and_changes_nothing(setup, tmp_path, monkeypatch):
    root, config, _ = setup
    out = tmp_path / "run"
    with one_thread():
        train(load_config(config, loss=LOSS, out=str(out), steps=STEPS, save_every=0, checkpoint_steps=[2]),
              progress=False)
    import shutil
    shutil.rmtree(out / "final")
    before = _ls(out) | {"metrics.jsonl": (out / "metrics.jsonl").read_bytes()}
    out.chmod(0o555)
    if os.geteuid() == 0:
        # root ignores permission bits: make the two temp-file makers fail as the kernel would.
        def denied(*args, dir=None, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        monkeypatch.setattr(engine.fsio.tempfile, "mkstemp", denied)
        monkeypatch.setattr(engine.fsio.tempfile, "mkdtemp", denied)
    try:
        with pytest.raises(EngineError, match="Permission denied") as info:
            train(load_config(config, loss=LOSS, out=str(out)), resume=True, progress=False)
    finally:
        out.chmod(0o755)
    assert "Traceback" not in str(info.value) and str(out) in str(info.value)
    assert _ls(out) | {"metrics.jsonl": (out / "metrics.jsonl").read_bytes()} == before


class PoisonGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward."""
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_nan_gradient_stops_the_run_keeping_the_last_checkpoint(setup, tmp_path, monkeypatch):
    from cli import main
    import losses.grpo
    root, config, _ = setup
    out = tmp_path / "run"
    real, calls = losses.grpo.loss, {"n": 0}

    def poisoned(inputs, **kw):
        calls["n"] += 1
        if calls["n"] > 4:  # two micro-batches per step: step 3 onwards
            inputs.logps = PoisonGradient.apply(inputs.logps)
        return real(inputs, **kw)
    monkeypatch.setattr(losses.grpo, "loss", poisoned)
    with one_thread():
        result = CliRunner().invoke(main, ["train", "--loss", LOSS, "--config", str(config), "--out", str(out),
                                           "--quiet"])
    assert result.exit_code == 1, result.output
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("stopped: non-finite gradient norm at step 3 on rollout "
                                                       "lines [") and "the last good checkpoint is kept" in message[0]
    lines = json.loads(message[0].split("rollout lines ")[1].split("]")[0] + "]")
    assert len(lines) == 8 and all(1 <= n <= 24 for n in lines)  # the step's batch: 8 rollouts
    assert ckpt.verify(out / "step-2") is None and not (out / "final").exists()
    assert ckpt.latest_checkpoint(out) == out / "step-2"
    assert step_rows(out) == [1, 2]


def test_recover_tidies_what_a_kill_leaves(tmp_path):
    out = tmp_path / "run"
    (out / ".step-4.abc123.tmp").mkdir(parents=True)
    (out / ".step-4.abc123.tmp" / "adapter_model.safetensors").write_bytes(b"x")
    (out / ".metrics.jsonl.q1.tmp").write_text("partial")
    (out / ".final.old").mkdir()
    (out / ".final.old" / "manifest.json").write_text("{}")
    (out / ".user-notes.tmp").write_text("not ours")
    ckpt.recover(out)
    assert sorted(p.name for p in out.iterdir()) == [".user-notes.tmp", "final"]
    assert (out / "final" / "manifest.json").read_text() == "{}"


def test_written_files_get_the_usual_permissions(tmp_path):
    """Model and adapter directories are readable by the group and others under the usual umask
    (safetensors' save_file alone makes 0600 files; a copied read-only file would stay read-only)."""
    from engine.model.weights import save_model
    from engine.model.qwen3_config import Qwen3Config
    from engine.model.lora import LoRAConfig, apply_lora, save_adapter
    from engine.model.qwen3 import Qwen3ForCausalLM
    from helpers import tiny_config
    before = os.umask(0o022)
    try:
        model = Qwen3ForCausalLM(Qwen3Config.from_dict(tiny_config()))
        save_model(model, tmp_path / "model")
        apply_lora(model, LoRAConfig(r=2, alpha=4.0), seed=0)
        save_adapter(model, tmp_path / "adapter")
        with engine.fsio.atomic_dir(tmp_path / "copied") as d:
            (d / "tokenizer.json").write_text("{}")
            os.chmod(d / "tokenizer.json", 0o444)
    finally:
        os.umask(before)
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert len(files) >= 5 and any(f.suffix == ".safetensors" for f in files)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o644" for f in files}
