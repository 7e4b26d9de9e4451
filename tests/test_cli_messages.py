"""Class 4 of issue 20: errors found after the input was read (templating a chat prompt, the LoRA
config against the model, a loss hyperparameter's value, max_len against the context) still name the
file, the line and the field the user wrote; an oversized line is refused before it is tokenised."""
import json
import textwrap
import time
from pathlib import Path

import pytest

from cli_probe import EMBEDDED, assert_one_line_error, run_cli_batch
from helpers import tiny_model_dir, write_rollouts


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("msg")
    return root, tiny_model_dir(root / "model"), write_rollouts(root / "r.jsonl", n_groups=4, k=2)


def config(root: Path, name: str, model: Path, rollouts: Path, extra: str) -> Path:
    path = root / f"{name}.toml"
    path.write_text(f'model = "{model}"\nrollouts = "{rollouts}"\nsteps = 1\nbatch_size = 8\nlora_r = 2\n'
                    + textwrap.dedent(extra))
    return path


def test_late_checks_keep_file_line_and_field(setup, tmp_path):
    root, model, rollouts = setup
    cases = [   # (loss, extra TOML, what the one error line must name)
        ("sft", 'lora_targets = ["q_proj", "qq_proj"]\n', [":6", "field 'lora_targets'", "qq_proj"]),
        ("sft", "max_len = 4096\n", [":6", "field 'max_len'"]),
        ("grpo", "[loss_hparams.grpo]\nstd_scale = 3\n", [":7", "field 'loss_hparams.grpo.std_scale'"]),
        ("sft", "[loss_hparams.sft]\ntemperature = 1\n", [":7", "loss_hparams.sft.temperature"]),
    ]
    probes = []
    for i, (loss, extra, needles) in enumerate(cases):
        cfg = config(tmp_path, f"c{i}", model, rollouts, extra)
        needles.insert(0, str(cfg))
        probes.append(["train", "--loss", loss, "--config", cfg, "--out", tmp_path / f"out{i}", "--quiet"])
    # A chat prompt that cannot be templated, in a task's data file: that file and line.
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text(json.dumps({"question": "2+2?", "answer": "#### 4"}) + "\n"
                                     + json.dumps({"question": "hi <|im_start|>system", "answer": "#### 1"}) + "\n")
    probes.append(["eval", "--model", EMBEDDED, "--task", "gsm8k", "--data-dir", tmp_path / "data",
                   "--device", "cpu", "--max-new-tokens", 2])
    cases.append((None, None, [f"{data / 'test.jsonl'}:2", "field 'question'", "control-token"]))
    for (_, _, needles), proc in zip(cases, run_cli_batch(probes)):
        assert_one_line_error(proc, *needles)


def test_a_huge_line_is_refused_before_it_is_tokenised(setup, tmp_path):
    root, model, rollouts = setup
    huge = tmp_path / "huge.jsonl"
    good = rollouts.read_text()
    big = json.dumps({"prompt": "x", "completion": "y " * (25 * 2 ** 20), "reward": 1.0, "group": "big"})
    huge.write_text(good + big + "\n")
    n = len(good.splitlines()) + 1
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text(json.dumps({"question": "q " * (25 * 2 ** 20), "answer": "#### 1"}) + "\n")
    cfg = config(tmp_path, "huge", model, huge, "")
    t0 = time.perf_counter()
    results = run_cli_batch([
        ["train", "--loss", "sft", "--config", cfg, "--out", tmp_path / "a", "--quiet"],
        ["train", "--loss", "sft", "--config", cfg, "--out", tmp_path / "b", "--quiet", "--on-bad", "skip"],
        ["eval", "--model", EMBEDDED, "--task", "gsm8k", "--data-dir", tmp_path / "data", "--device", "cpu"],
    ])
    elapsed = time.perf_counter() - t0
    assert_one_line_error(results[0], f"{huge}:{n}", "MiB")
    assert results[1].returncode == 0 and "skipped 1 bad rollout lines" in results[1].stdout + results[1].stderr
    assert_one_line_error(results[2], f"{data / 'test.jsonl'}:1", "MiB")
    assert elapsed < 60, elapsed   # was 80 s and 9.7 GB for one such line
