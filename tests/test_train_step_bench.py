"""`cli.py bench` / `cli.py profile --train-step`: both sides train the same thing (equal losses step
after step), the table and its last line come out, bad input is an EngineError."""
import json
import re

import pytest
import torch
from click.testing import CliRunner

from benchmarks import bench_train
from cli import main
from engine.recipes import train_step_bench as bench
from engine.errors import EngineError
from helpers import tiny_config


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "config.json"
    path.write_text(json.dumps(tiny_config(vocab_size=301, hidden_size=32, intermediate_size=48,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           tie_word_embeddings=True)))
    return path


@pytest.mark.parametrize("loss,batch", [("sft", 1), pytest.param("dpo", 2, marks=pytest.mark.slow)])
def test_bench_sides_train_the_same_thing(config_path, tmp_path, loss, batch):
    out = tmp_path / "result.json"
    res = CliRunner().invoke(main, ["bench", "--model-config", str(config_path), "--batch", str(batch), "--seq", "24",
                                    "--loss", loss, "--steps", "1", "--rank", "4", "--alpha", "8", "--lr", "5e-2",
                                    "--threads", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    last = res.output.strip().splitlines()[-1]
    assert re.fullmatch(r"engine/hf tok_s ratio=\d+\.\d+ peak_mem ratio=\d+\.\d+", last), last
    result = json.loads(out.read_text())
    engine_losses, hf_losses = result["rows"]["engine"]["losses"], result["rows"]["hf"]["losses"]
    assert len(engine_losses) == len(hf_losses) == 2
    assert engine_losses[0] != engine_losses[-1]  # the adapters do train (lr 5e-2), so equality means something
    assert max(abs(a - b) for a, b in zip(engine_losses, hf_losses)) < 1e-4
    for side in ("engine", "hf"):
        row = result["rows"][side]
        assert row["tok_s"] > 0 and row["peak"] > row["built_now"] * 0.5 > 0


def test_profile_train_step(config_path, tmp_path):
    out = tmp_path / "profile.json"
    res = CliRunner().invoke(main, ["profile", "--train-step", "--model-config", str(config_path), "--seq", "20",
                                    "--steps", "1", "--rank", "4", "--loss", "grpo", "--batch", "2", "--ops", "5",
                                    "--json", str(out)])
    assert res.exit_code == 0, res.output
    phases = {r["phase"]: r for r in json.loads(out.read_text())["phases"]}
    assert set(phases) == set(bench.PHASES)
    assert all(r["ms"] > 0 for r in phases.values())
    assert "aten::" in res.output


def test_step_phases_equal_the_plain_step(config_path):
    """The profiler's cut at the hidden states changes nothing: same loss, same adapter update."""
    spec = bench.BenchSpec(model_config=str(config_path), seq=16, batch=2, rank=4, loss="grpo")
    a, b = bench.EngineRunner(spec), bench.EngineRunner(spec)
    batch = bench.make_batch(spec, spec.config().vocab_size)
    la, lb = a.step(batch), b.phases(batch, lambda phase: None)
    assert la == pytest.approx(lb, rel=1e-6, abs=1e-7)
    for (n, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        if pa.requires_grad:
            assert torch.allclose(pa, pb, atol=1e-6), n


def test_step_flops_counts_the_head_on_scored_tokens_only(config_path):
    spec = bench.BenchSpec(model_config=str(config_path), seq=40, prompt_frac=0.25)
    cfg = spec.config()
    all_scored = bench.BenchSpec(model_config=str(config_path), seq=40, prompt_frac=0.0)
    head_per_token = 4 * cfg.vocab_size * cfg.hidden_size
    assert bench.step_flops(all_scored, cfg) - bench.step_flops(spec, cfg) == head_per_token * (39 - 30)


def test_bad_input(config_path, tmp_path):
    with pytest.raises(EngineError, match="even batch"):
        bench.BenchSpec(model_config=str(config_path), loss="dpo", batch=3)
    with pytest.raises(EngineError, match="not found"):
        bench.BenchSpec(model_config=str(tmp_path / "missing.json"))
    with pytest.raises(EngineError):
        bench.BenchSpec(model_config=str(config_path), prompt_frac=1.0)
    spec = bench.BenchSpec(model_config=str(config_path), device="cpu")
    with pytest.raises(EngineError, match="cpu-mem-limit"):
        bench_train.find_max_seq(spec, "engine", 64)
    res = CliRunner().invoke(main, ["bench", "--model-config", str(tmp_path / "missing.json")])
    assert res.exit_code == 2 and "not found" in res.output
