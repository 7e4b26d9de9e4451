"""The training loop: every loss lowers its objective, accumulation equals one batch, exact resume,
PEFT interoperability, and clear errors for bad input."""
import json

import pytest
import torch

import engine
from engine.errors import EngineError, TrainingDiverged
from engine.model.lora import load_adapter
from engine.train.train_config import load_config
from engine.train.trainer import Trainer, train
from helpers import tiny_model_dir, write_rollouts

LOSSES = ["sft", "rft", "dft", "rift", "grpo", "dpo"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = tiny_model_dir(root / "model")
    rollouts = write_rollouts(root / "rollouts.jsonl")
    return root, model, rollouts


def _cfg(setup, tmp_path, **kw):
    _, model, rollouts = setup
    base = dict(model=str(model), rollouts=str(rollouts), out=str(tmp_path / "run"), steps=20, lr=2e-2,
                batch_size=16, micro_batch_size=16, lora_r=4, lora_alpha=8.0, warmup_ratio=0.0, max_len=128)
    base.update(kw)
    return load_config(None, **base)


@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_lowers_its_objective(setup, tmp_path, loss):
    """DFT's gradient is that of -sum p (its value -sum sg(p) log p is not what it descends), so for
    DFT the objective checked is the mean completion-token probability."""
    trainer = Trainer(_cfg(setup, tmp_path, loss=loss), progress=False)
    objective = _mean_token_prob(trainer) if loss == "dft" else trainer.objective
    before = objective()
    for step in range(trainer.cfg.steps):
        trainer.train_step(step)
    after = objective()
    assert after < before - 1e-3, (before, after)


def _mean_token_prob(trainer):
    from engine.train.batching import collate
    from engine.model.logprobs import token_logprobs

    @torch.no_grad()
    def negative_mean_prob():
        b = collate(trainer.examples, list(range(len(trainer.examples))), trainer.tokenizer.pad_id)
        s = token_logprobs(trainer.model, b.input_ids, b.attention_mask, score_mask=b.mask)
        return -float(s.exp()[b.mask].mean())
    return negative_mean_prob


@pytest.mark.parametrize("loss", ["grpo", "dpo", "dft"])
def test_accumulation_equals_one_batch(setup, tmp_path, loss):
    """Micro-batches with the step-wide normaliser give one big batch's gradient (B made non-zero
    first so every LoRA gradient is non-trivial), and the step's logged stats are the big batch's:
    counts add up, means are weighted by what they average over, extremes stay extremes."""
    grads, stats = [], []
    hparams = {}
    if loss == "grpo":  # the clipped ratio and KL stats too (behavior log-probs drawn at random)
        from engine.model.tokenizer import load_tokenizer
        rollouts = write_rollouts(tmp_path / "behavior.jsonl", behavior=True, tokenizer=load_tokenizer(setup[1]))
        hparams = dict(rollouts=str(rollouts), loss_hparams={"grpo": {"clip_eps": 0.2, "kl_beta": 0.05}})
    for mb in (16, 4):
        t = Trainer(_cfg(setup, tmp_path / f"mb{mb}", loss=loss, steps=2, micro_batch_size=mb, **hparams),
                    progress=False)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in engine.model.lora.lora_modules(t.model).values():
                m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=gen))
        micro = t._micro_batches([t.units.rows[u] for u in t.plan[0]])
        if mb == 4:
            assert len(micro) >= 4
        loss_value, step_stats, _, _ = t._accumulate(micro, 0, backward=True)
        assert step_stats["loss"] == pytest.approx(loss_value, rel=1e-9, abs=1e-12)
        stats.append(step_stats)
        grads.append(torch.cat([p.grad.flatten() for n, p in t.model.named_parameters() if "lora_" in n]))
    assert grads[0].norm() > 0
    assert (grads[0] - grads[1]).norm() <= 1e-5 * grads[0].norm()
    assert stats[0].keys() == stats[1].keys()
    for key, value in stats[0].items():
        assert stats[1][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("all_wrong", [False, True], ids=["mixed", "no-correct-rollout"])
def test_rft_skips_incorrect_rows_with_the_same_updates(setup, tmp_path, all_wrong):
    """RFT never forwards the incorrect rollouts (they add exactly 0): the adapters after a few steps
    equal those of a run that forwards every row, with fewer tokens per step. A step without a correct
    rollout forwards nothing and still steps the optimizer (weight decay) as the full run does."""
    runs = []
    for skip in (True, False):
        t = Trainer(_cfg(setup, tmp_path / f"skip{skip}", loss="rft", steps=3, micro_batch_size=5,
                         weight_decay=0.1), progress=False)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in engine.model.lora.lora_modules(t.model).values():
                m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=gen))
        if all_wrong:
            for e in t.examples:
                e.reward = 0.0
            t.counted = [False] * len(t.examples)
        assert t.counted is not None and sum(t.counted) < len(t.examples)
        if not skip:
            t.counted = None
        start = {n: p.detach().clone() for n, p in t.model.named_parameters() if "lora_" in n}
        tokens = [t.train_step(step)["tokens"] for step in range(3)]
        runs.append((tokens, {n: p.detach().clone() for n, p in t.model.named_parameters() if "lora_" in n}))
    (skip_tokens, skipped), (full_tokens, full) = runs
    assert all(a < b for a, b in zip(skip_tokens, full_tokens)), (skip_tokens, full_tokens)
    if all_wrong:
        assert skip_tokens == [0, 0, 0]
    for name, value in full.items():
        assert torch.allclose(skipped[name], value, atol=1e-6, rtol=1e-5), name
    assert max(float((full[n] - start[n]).abs().max()) for n in full) > 1e-4   # the steps did update


def test_rft_filters_first_then_batches_correct_rows(setup, tmp_path):
    """An RFT step holds `batch_size` correct rows (whole groups, so at most one group's worth more), never
    a group without one; the other losses count every row of the same groups."""
    t = Trainer(_cfg(setup, tmp_path / "rft", loss="rft", steps=6, batch_size=6), progress=False)
    correct = [e.reward == 1.0 for e in t.examples]
    assert 0 < sum(correct) < len(correct)
    most = max(sum(correct[i] for i in g) for g in t.units.rows)
    for step in t.plan:
        rows = [i for u in step for i in t.units.rows[u]]
        assert 6 <= sum(correct[i] for i in rows) < 6 + most, step
        assert all(any(correct[i] for i in t.units.rows[u]) for u in step)
    sft = Trainer(_cfg(setup, tmp_path / "sft", loss="sft", steps=6, batch_size=6), progress=False)
    assert all(6 <= sum(len(sft.units.rows[u]) for u in step) for step in sft.plan)
    no_correct = tmp_path / "wrong.jsonl"
    no_correct.write_text("".join(json.dumps({**json.loads(line), "reward": 0.0}) + "\n"
                                  for line in setup[2].read_text().splitlines()))
    with pytest.raises(EngineError, match="no rollout counts for rft"):
        Trainer(_cfg(setup, tmp_path / "none", loss="rft", steps=1, rollouts=str(no_correct)), progress=False)


def test_rft_still_refuses_non_binary_rewards(setup, tmp_path):
    """Incorrect rows never reach the RFT loss (and its check), so the row selection checks instead."""
    lines = [json.loads(line) for line in setup[2].read_text().splitlines()]
    lines[3]["reward"] = 0.5
    half = tmp_path / "half.jsonl"
    half.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(EngineError, match="rft"):
        Trainer(_cfg(setup, tmp_path / "half", loss="rft", steps=1, rollouts=str(half)), progress=False)


def test_resume_is_bit_identical(setup, tmp_path):
    full = train(_cfg(setup, tmp_path / "a", loss="dpo", steps=6, save_every=3), progress=False)
    # An interrupted run: 3 steps and a checkpoint, then the process is gone.
    cfg = _cfg(setup, tmp_path / "b", loss="dpo", steps=6, save_every=3)
    t = Trainer(cfg, progress=False)
    from engine.train import checkpoints as checkpointing
    for step in range(3):
        t.train_step(step)
    checkpointing.save(t.out / "step-3", t.model, t.optimizer, cfg, 3)
    del t
    resumed = train(cfg, resume=True, progress=False)
    a = (full / "adapter_model.safetensors").read_bytes()
    b = (resumed / "adapter_model.safetensors").read_bytes()
    assert a == b
    rows = [json.loads(l) for l in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "step" in r] == [4, 5, 6]


def test_adapter_round_trip_and_peft(setup, tmp_path):
    _, model_dir, _ = setup
    final = train(_cfg(setup, tmp_path, loss="sft", steps=3), progress=False)
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    ours = engine.load_model(model_dir, device="cpu", adapter=final)
    ids = torch.randint(0, ours.config.vocab_size, (2, 11))
    with torch.no_grad():
        logits = ours(ids).logits
    assert any(m.lora_B.abs().sum() > 0 for m in engine.model.lora.lora_modules(ours).values())
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(final)).eval()
    with torch.no_grad():
        ref = peft_model(ids).logits
    assert (logits - ref).abs().max() < 1e-4
    # PEFT's own save loads into our engine with the same logits.
    peft_model.save_pretrained(str(tmp_path / "peft_saved"))
    again = engine.load_model(model_dir, device="cpu", adapter=tmp_path / "peft_saved")
    with torch.no_grad():
        assert (again(ids).logits - ref).abs().max() < 1e-4
    # Merging for export is one call and changes nothing.
    engine.model.lora.merge_adapter(ours)
    with torch.no_grad():
        assert (ours(ids).logits - logits).abs().max() < 1e-4


def test_bad_inputs(setup, tmp_path):
    with pytest.raises(EngineError, match="unknown loss"):
        Trainer(_cfg(setup, tmp_path, loss="ppo"), progress=False)
    with pytest.raises(EngineError, match="longer than the maximum length"):
        Trainer(_cfg(setup, tmp_path, loss="sft", max_len=20), progress=False)
    with pytest.raises(EngineError, match="behavior_logps"):
        Trainer(_cfg(setup, tmp_path, loss="grpo", loss_hparams={"grpo": {"clip_eps": 0.2}}), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "completion": "x", "reward": 1, "group": 1}\n{"prompt": "hi", "reward": 1}\n')
    with pytest.raises(EngineError, match=r"bad.jsonl:2: field 'completion': missing"):
        Trainer(_cfg(setup, tmp_path, loss="sft", rollouts=str(bad)), progress=False)
    t = Trainer(_cfg(setup, tmp_path / "skip", loss="sft", rollouts=str(bad), on_bad="skip"), progress=False)
    assert t.skipped.count == 1 and len(t.examples) == 1


def test_resume_with_other_rank_refuses(setup, tmp_path):
    train(_cfg(setup, tmp_path, loss="sft", steps=2, save_every=1), progress=False)
    with pytest.raises(EngineError, match="lora_r"):
        train(_cfg(setup, tmp_path, loss="sft", steps=2, lora_r=8), resume=True, progress=False)
    with pytest.raises(EngineError, match="already holds a run"):
        train(_cfg(setup, tmp_path, loss="sft", steps=2), progress=False)


def test_nan_stops_and_keeps_last_checkpoint(setup, tmp_path, monkeypatch):
    cfg = _cfg(setup, tmp_path, loss="sft", steps=4, save_every=2)
    import losses.sft
    real = losses.sft.loss
    calls = {"n": 0}

    def poisoned(inputs, **kw):
        calls["n"] += 1
        loss, stats = real(inputs, **kw)
        return (loss * float("nan") if calls["n"] > 2 else loss), stats
    monkeypatch.setattr(losses.sft, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 3"):
        train(cfg, progress=False)
    assert (tmp_path / "run" / "step-2" / "manifest.json").is_file()
    assert not (tmp_path / "run" / "final").exists()


def test_cli_says_which_preset_a_real_model_trains_with(setup, tmp_path):
    """`train --model M` without --preset/--config trains with configs/cpu.toml (the embedded model's
    settings) and says so on stderr; with a preset it says nothing."""
    from click.testing import CliRunner
    from cli import main
    _, model, rollouts = setup
    common = ["train", "--loss", "sft", "--model", str(model), "--rollouts", str(rollouts), "--steps", "1",
              "--batch-size", "4", "--quiet"]
    plain = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "a")], catch_exceptions=False)
    assert plain.exit_code == 0 and "uses configs/cpu.toml" in plain.stderr
    chosen = CliRunner().invoke(main, [*common, "--preset", "cpu", "--out", str(tmp_path / "b")],
                                catch_exceptions=False)
    assert chosen.exit_code == 0 and "configs/cpu.toml" not in chosen.stderr


def test_epochs_are_logged_and_read_back(setup, tmp_path):
    """Each step's row says how many passes over the data (rows that train) the run has made; the analysis
    reads the analysed checkpoint's seed, step, loss, lr and epochs back from the run's own files."""
    from analysis.run_info import training_info
    cfg = _cfg(setup, tmp_path / "rft", loss="rft", steps=4, batch_size=5, checkpoint_steps=[3], seed=11)
    trainer = Trainer(cfg, progress=False)
    final = trainer.run()
    run = tmp_path / "rft" / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in rows if r.get("event") == "start")
    correct = sum(e.reward == 1.0 for e in trainer.examples)
    assert start["examples_per_epoch"] == correct
    steps = [r for r in rows if "step" in r and "epoch" in r]
    done = 0
    for row, units in zip(steps, trainer.plan):
        done += sum(sum(trainer.examples[i].reward == 1.0 for i in trainer.units.rows[u]) for u in units)
        assert row["epoch"] == pytest.approx(done / correct)
    info = training_info(run / "step-3")
    assert {k: info[k] for k in ("seed", "step", "loss", "lr", "epochs")} == {"seed": 11, "step": 3, "loss": "rft", "lr": cfg.lr, "epochs": steps[2]["epoch"]}
    assert info["examples_per_epoch"] == correct and info["data"]["positives"] == correct
    assert training_info(final)["step"] == 4 and training_info(tmp_path) is None
