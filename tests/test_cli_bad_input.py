"""Class 2 of issue 20: whatever the user's input or environment gets wrong reaches them as one
`error:` line naming the file and field, exit code 2, never a traceback. Real `cli.py` code: most
probes run through `cli.main` in one interpreter (run_cli_batch), the rest as their own processes."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import save_file
import torch

from cli_probe import EMBEDDED, REPO, assert_one_line_error, rollout_args, run_cli, run_cli_batch
from helpers import hf_model, save_hf, tiny_config

DEEP = "[" * 100000 + "]" * 100000


def model_copy(root: Path, name: str, file: str, content: "str | bytes | None") -> Path:
    """The embedded model with `file` replaced by `content` (None: a directory in its place)."""
    d = root / name
    shutil.copytree(EMBEDDED, d)
    (d / file).unlink()
    if content is None:
        (d / file).mkdir()
    else:
        (d / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    return d


def with_field(file: str, **fields) -> str:
    d = json.loads((EMBEDDED / file).read_text())
    d.update(fields)
    return json.dumps(d)


def eval_args(model, *extra):
    return ["eval", "--model", model, "--task", "synthetic", "--limit", 2, "--max-new-tokens", 4, *extra]


def test_bad_model_dirs_and_devices(tmp_path):
    cases = []   # (args, what the error names)
    for file in ("config.json", "tokenizer_config.json"):
        for name, content in (("dir", None), ("latin1", b"\xff\xfe{}"), ("deep", DEEP), ("list", "[1, 2]"),
                              ("digits", '{"a": ' + "9" * 5000 + "}")):
            d = model_copy(tmp_path, f"{file}-{name}", file, content)
            cases.append((eval_args(d, "--device", "cpu"), [str(d / file)]))
    for field, value in (("tie_word_embeddings", "yes"), ("eos_token_id", "x"), ("architectures", "Qwen3"),
                         ("rms_norm_eps", [1]), ("max_position_embeddings", 1.5)):
        d = model_copy(tmp_path, f"cfg-{field}", "config.json", with_field("config.json", **{field: value}))
        cases.append((eval_args(d, "--device", "cpu"), [str(d / "config.json"), field]))
    for field, value in (("pad_token", [1]), ("eos_token", 5)):
        d = model_copy(tmp_path, f"tok-{field}", "tokenizer_config.json",
                       with_field("tokenizer_config.json", **{field: value}))
        cases.append((eval_args(d, "--device", "cpu"), [str(d / "tokenizer_config.json"), field]))
    for device in ("cuda", "foo", "cuda:7", "meta", "cuda:x"):
        cases.append((eval_args(EMBEDDED, "--device", device), ["device"]))
        cases.append((rollout_args(tmp_path / f"r-{device}.jsonl")[:-4] + ["--device", device, "--out",
                                                                          tmp_path / f"r-{device}.jsonl"], ["device"]))
    cases.append((["train", "--loss", "sft", "--steps", 1, "--device", "foo", "--out", tmp_path / "t"], ["--device"]))
    config = tmp_path / "dev.toml"
    config.write_text('steps = 1\ndevice = "quantum"\n')
    cases.append((["train", "--loss", "sft", "--config", config, "--out", tmp_path / "t2"], [f"{config}:2", "device"]))
    results = run_cli_batch([args for args, _ in cases])
    for (args, needles), proc in zip(cases, results):
        assert_one_line_error(proc, *needles)


def vocab50_model(root: Path) -> Path:
    """A model whose vocabulary (50) is smaller than its tokenizer's (the embedded one)."""
    d = save_hf(hf_model(tiny_config(vocab_size=50, hidden_size=32, intermediate_size=64, head_dim=8,
                                     tie_word_embeddings=True)), root / "vocab50")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(EMBEDDED / f, d / f)
    return d


def absurd_adapter(root: Path) -> Path:
    d = root / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 10 ** 9, "lora_alpha": 16,
                                                        "target_modules": ["q_proj"]}))
    save_file({"x": torch.zeros(1)}, str(d / "adapter_model.safetensors"))
    return d


def test_vocab_adapter_outputs_seeds(tmp_path):
    small = vocab50_model(tmp_path)
    adapter = absurd_adapter(tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("mine\n")
    cases = [
        (eval_args(small, "--device", "cpu"), ["outside the model's vocabulary", "prompt"]),
        (["train", "--loss", "sft", "--model", small, "--steps", 1, "--out", tmp_path / "t"],
         ["rollouts.jsonl:1", "prompt", "outside the model's vocabulary"]),
        (eval_args(EMBEDDED, "--device", "cpu", "--adapter", adapter), [str(adapter / "adapter_config.json"), "'r'"]),
        (eval_args(EMBEDDED, "--device", "cpu", "--out", a_file), [str(a_file), "not a directory"]),
        (["analyze", tmp_path / "no-run", "--out", a_file], [str(a_file), "not a directory"]),
        (rollout_args(a_file / "r.jsonl"), [str(a_file)]),
        (rollout_args(Path("/dev/full")), ["/dev/full", "not a file"]),
    ]
    for seeds in ("1,x", "", "1,1", "-3", "7,,8"):
        cases.append((["demo", "--seeds", seeds, "--out", tmp_path / "demo"], ["--seeds"]))
    results = run_cli_batch([args for args, _ in cases])
    for (args, needles), proc in zip(cases, results):
        assert_one_line_error(proc, *needles)
    assert a_file.read_text() == "mine\n" and not (tmp_path / "demo").exists()


def _small_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))  # like a disk that fills up mid-write


def test_full_disk_during_eval_and_rollout(tmp_path):
    eval_out = tmp_path / "eval"
    proc = run_cli(*eval_args(EMBEDDED, "--device", "cpu", "--out", eval_out), preexec_fn=_small_files)
    assert_one_line_error(proc, "File too large")
    # Nothing half-written: no temp files left, and what was renamed into place is whole.
    assert not list(eval_out.glob(".*")), list(eval_out.iterdir())
    for f in eval_out.glob("*.jsonl"):
        assert all(json.loads(line) for line in f.read_text().splitlines())
    out = tmp_path / "r.jsonl"
    assert_one_line_error(run_cli(*rollout_args(out), preexec_fn=_small_files), "File too large")


def bench_args(tmp_path, *extra):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_config(hidden_size=32, intermediate_size=64, head_dim=8)))
    return ["bench", "--model-config", cfg, "--seq", 8, "--warmup", 0, "--device", "cpu", "--sides", "engine",
            "--rank", 4, *extra]


def test_bench_worker_error_is_one_line(tmp_path):
    proc = run_cli(*bench_args(tmp_path, "--steps", 1, "--rank", 1000))
    assert_one_line_error(proc, "engine worker", "LoRA rank 1000", "field '--rank'")


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def test_bench_worker_dies_with_its_parent(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, str(REPO / "cli.py"),
                               *map(str, bench_args(tmp_path, "--steps", 100000))], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        workers: list[int] = []
        while time.time() < deadline and not workers:
            time.sleep(0.2)
            workers = [c for c in _children(parent.pid) if "spawn" in Path(f"/proc/{c}/cmdline").read_text()
                       .replace("\0", " ")] if parent.poll() is None else []
        assert workers, "no worker process appeared"
        time.sleep(1.0)    # inside the worker now
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
            time.sleep(0.2)
        assert not any(Path(f"/proc/{w}").exists() for w in workers), "a worker outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
