"""The study driver end to end on the embedded model at a toy budget: two seeds in two worker processes,
the DPO run at the other losses' learning rate, the two-thirds checkpoint analysed and evaluated."""
from __future__ import annotations

import json

import pytest

from engine.recipes.study import StudyRun, analysis_step, checkpoint_name, run_config, run_study, study_runs
from helpers import REPO

CPU = REPO / "configs" / "cpu.toml"


def test_runs_and_checkpoints():
    assert [r.name for r in study_runs(["sft", "dpo"])] == ["sft", "dpo", "dpo_lr_matched"]
    assert [r.name for r in study_runs(["sft", "grpo"])] == ["sft", "grpo"]
    assert [analysis_step(n) for n in (1, 2, 3, 60, 1500)] == [1, 1, 2, 40, 1000]
    assert checkpoint_name(1) == "final" and checkpoint_name(60) == "step-40"


def test_lr_matched_dpo_trains_at_the_shared_rate(tmp_path):
    dpo = run_config(CPU, StudyRun("dpo", "dpo"), 7, tmp_path / "a", None)
    matched = run_config(CPU, StudyRun("dpo_lr_matched", "dpo"), 7, tmp_path / "b", None)
    sft = run_config(CPU, StudyRun("sft", "sft"), 7, tmp_path / "c", None)
    assert dpo.lr_for("dpo") == pytest.approx(sft.lr / 10)           # the preset's DPO rate, 10x lower
    assert matched.lr_for("dpo") == sft.lr_for("sft") and matched.loss == "dpo" and matched.seed == 7
    assert 60 in sft.checkpoint_steps and run_config(CPU, StudyRun("sft", "sft"), 7, tmp_path, 9).checkpoint_steps == [6]


@pytest.mark.slow
def test_two_seeds_in_two_processes(tmp_path):
    out = tmp_path / "demo"
    report = run_study(out, seeds=(5, 6), loss_names=["sft", "dpo"], steps=3, eval_limit=3, max_new_tokens=12,
                       n_items=3, workers=2, echo=lambda m: None)
    seeds = json.loads((report / "seeds.json").read_text())
    assert seeds["runs"] == ["sft", "dpo", "dpo_lr_matched"] and seeds["seeds"] == 2
    assert set(seeds["same_loss_floor"]) == {"sft", "dpo", "dpo_lr_matched"}
    for seed in (5, 6):
        metrics = json.loads((out / f"report-seed-{seed}" / "metrics.json").read_text())
        assert metrics["checkpoint"] == "step-2"
        assert all(r["adapter_dir"].endswith("step-2") for r in metrics["runs"])
        state = json.loads((out / f"seed-{seed}" / "dpo_lr_matched" / "step-2" / "trainer_state.json").read_text())
        assert state["config"]["seed"] == seed and "dpo" not in state["config"]["lr_per_loss"]
        assert metrics["geometry"]["init_alignment"]["runs"][0]["seed"] == seed
        for run in seeds["runs"]:
            for split in ("test", "hard"):  # the easy split and the hard one
                assert (out / "eval" / f"seed-{seed}" / run / f"synthetic_{split}.jsonl").is_file()
    verdict_v = next(r for r in seeds["verdicts"] if r["claim"].startswith("(v)"))
    assert sorted(p["label"].split(":")[0] for p in verdict_v["parts"]) == ["synthetic_hard", "synthetic_test"]
    text = (report / "report.md").read_text()
    build = json.loads((REPO / "embedded" / "BUILD.json").read_text())
    assert "- Teacher: 6 layers" in text and f"{build['rollouts']['mean_reward']:.1%} correct" in text
    # A rerun reuses every finished piece: same reports, nothing retrained.
    before = (report / "report.md").read_text()
    run_study(out, seeds=(5, 6), loss_names=["sft", "dpo"], steps=3, eval_limit=3, max_new_tokens=12, n_items=3,
              workers=1, echo=lambda m: None)
    assert (report / "report.md").read_text() == before
