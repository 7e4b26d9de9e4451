"""The embedded default's teacher / student build (engine.recipes.embedded): the shipped files agree with
their BUILD.json, the rollouts are off-policy for the student (no rollout prompt, nor its arithmetic, in
the pretraining data), and the whole build runs end to end at a toy size."""
import json
import math
import re

import pytest

import engine
from engine.recipes import embedded
from engine.recipes.embedded_inputs import arithmetic
from engine.tasks import synthetic
from engine.tasks.registry import load_task
from helpers import REPO

SHIPPED = REPO / "embedded"


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def build_json():
    return json.loads((SHIPPED / "BUILD.json").read_text())


def test_shipped_rollouts_match_build_json(build_json):
    """BUILD.json's rollout numbers are those of the shipped file, recounted here by hand."""
    rows = _rows(SHIPPED / "rollouts.jsonl")
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r["reward"])
    r = build_json["rollouts"]
    assert r["rows"] == len(rows) == r["k"] * r["groups"] and r["groups"] == len(groups)
    assert r["mean_reward"] == pytest.approx(sum(x["reward"] for x in rows) / len(rows), abs=1e-12)
    mixed = [g for g in groups.values() if 0 < sum(g) < len(g)]
    assert r["groups_with_both_outcomes"] == r["dpo_pairs"] == len(mixed)
    assert r["dpo_pairs_all"] == sum(sum(g) * (len(g) - sum(g)) for g in mixed)
    stats = embedded.rollout_stats(SHIPPED / "rollouts.jsonl")
    assert {k: r[k] for k in stats} == stats


def test_rollouts_are_off_policy_for_the_student(build_json):
    """The rollout prompts are synthetic/train's first items; neither they nor their arithmetic were
    pretrained on."""
    rows = _rows(SHIPPED / "rollouts.jsonl")
    prompts = load_task("synthetic", "train", limit=build_json["rollouts"]["groups"])
    asked: dict = {}
    for r in rows:
        asked[r["prompt"][-1]["content"]] = asked.get(r["prompt"][-1]["content"], 0) + 1
    assert asked == {p.question: build_json["rollouts"]["k"] for p in prompts}
    pretrain = _rows(SHIPPED / "sft_train.jsonl")
    assert len(pretrain) == build_json["pretraining_data"]["rows"]
    assert not {r["prompt"][0]["content"] for r in pretrain} & {p.question for p in prompts}
    chains = {arithmetic(p) for p in prompts}
    assert not any(tuple(re.findall(r"<<([^>]*)>>", r["completion"])) in chains for r in pretrain)


def test_shipped_models_are_what_build_json_says(build_json):
    for name, directory in (("student", "base"), ("teacher", "teacher")):
        m = build_json["models"][name]
        cfg = engine.Qwen3Config.from_json(SHIPPED / directory / "config.json")
        assert m["path"] == directory
        for key, value in m["shape"].items():
            assert getattr(cfg, key) == value, (name, key)
        from safetensors import safe_open
        with safe_open(str(SHIPPED / directory / "model.safetensors"), "pt") as f:
            n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        assert n == m["parameters"], name
        for split in embedded.EVAL_SPLITS:
            g = m["greedy"][split]
            assert g["n"] == synthetic.DEFAULT_SIZES[split] and g["ci95_wilson"][0] <= g["accuracy"] <= g["ci95_wilson"][1]
    assert build_json["models"]["student"]["shape"]["num_hidden_layers"] >= 6
    assert build_json["regime"] == embedded.regime(build_json["models"], build_json["rollouts"])


def test_regime_bands_on_planted_numbers():
    def models(student_easy, student_hard, layers=6):
        g = lambda a: {"accuracy": a}  # noqa: E731
        return {"student": {"greedy": {"test": g(student_easy), "hard": g(student_hard)},
                            "shape": {"num_hidden_layers": layers}},
                "teacher": {"greedy": {"test": g(0.95), "hard": g(0.4)}, "shape": {"num_hidden_layers": 6}}}
    good = embedded.regime(models(0.70, 0.10), {"mean_reward": 0.85})["in_band"]
    assert all(good.values())
    bad = embedded.regime(models(0.90, 0.30, layers=4), {"mean_reward": 0.95})["in_band"]
    assert not any(bad.values())
    edge = embedded.regime(models(0.751, 0.05), {"mean_reward": 0.85})["in_band"]
    assert not edge["student_10_points_below"] and edge["student_hard_5_20"]


def test_build_end_to_end_at_toy_size(tmp_path, monkeypatch):
    """Every stage of `cli.py build-embedded` (tokenizer, two pretrainings, greedy evaluation on both
    splits, teacher rollouts, the student's samples, BUILD.json), on a few items and steps."""
    monkeypatch.setattr(synthetic, "DEFAULT_SIZES", {"train": 4000, "test": 6, "hard": 5})
    monkeypatch.setattr(embedded, "MAX_NEW_TOKENS", 24)
    out = tmp_path / "embedded"
    summary = embedded.build(out, student_steps=2, teacher_steps=3, rollout_prompts=3, work=tmp_path / "work",
                             echo=lambda _: None)
    assert json.loads((out / "BUILD.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["models"]["teacher"]["pretrain_steps"] == 3 and summary["models"]["student"]["pretrain_steps"] == 2
    assert summary["models"]["student"]["greedy"]["hard"]["n"] == 5
    assert summary["rollouts"]["rows"] == 12 and len(_rows(out / "rollouts.jsonl")) == 12
    assert summary["models"]["student"]["samples_on_rollout_prompts"]["rows"] == 12
    for d in ("base", "teacher"):
        assert sorted(p.name for p in (out / d).iterdir()) == ["config.json", "generation_config.json",
                                                               "model.safetensors", "tokenizer.json",
                                                               "tokenizer_config.json"]
    # The teacher's checkpoints are dropped once the chosen one is installed; its training log stays.
    assert not [p.name for p in (tmp_path / "work" / "pretrain-teacher").iterdir() if p.is_dir()]
    assert (tmp_path / "work" / "pretrain-teacher" / "metrics.jsonl").is_file()
    assert engine.Qwen3Config.from_json(out / "teacher" / "config.json").hidden_size > \
        engine.Qwen3Config.from_json(out / "base" / "config.json").hidden_size
    # A rebuild replaces its own output (the work directory and every file are recognised as ours).
    embedded.build(out, student_steps=1, teacher_steps=1, rollout_prompts=2, work=tmp_path / "work",
                   echo=lambda _: None)
    assert json.loads((out / "BUILD.json").read_text())["rollouts"]["groups"] == 2


@pytest.mark.parametrize("curve, chosen, evaluated", [
    ({300: 0.60, 350: 0.80, 400: 0.87, 450: 0.95}, 400, [300, 350, 400]),   # 0.87 is closer than 0.80
    ({300: 0.60, 350: 0.83, 400: 0.97, 450: 0.99}, 350, [300, 350, 400]),   # overshoot: the one before
    ({300: 0.90, 350: 0.95, 400: 0.97, 450: 0.99}, 300, [300]),              # the first check already there
    ({300: 0.20, 350: 0.30, 400: 0.40, 450: 0.50}, 450, [300, 350, 400, 450]),  # never reached: the last
])
def test_teacher_is_the_checkpoint_closest_to_the_target(tmp_path, monkeypatch, curve, chosen, evaluated):
    """The selection rule on a planted accuracy curve (steps 250 and below are never candidates)."""
    run = tmp_path / "run"
    for step in (250, 300, 350, 400):
        (run / f"step-{step}").mkdir(parents=True)
    (run / "final").mkdir()
    seen = []
    import engine.generate.rollout as rollout
    monkeypatch.setattr(rollout, "load_for_generation", lambda ckpt: (ckpt, None))

    def fake_rollout(model, tok, prompts, out, sampling, **kw):
        step = 450 if model.name == "final" else int(model.name[5:])
        seen.append(step)
        out.write_text(json.dumps({"step": step}))
    monkeypatch.setattr(rollout, "rollout_items", fake_rollout)
    monkeypatch.setattr(embedded, "rollout_stats", lambda p: {"mean_reward": curve[json.loads(p.read_text())["step"]]})
    step, got = embedded._choose_teacher(run, 450, ["prompt"], None, 0, tmp_path / "cal", lambda _: None)
    assert step == chosen and seen == evaluated and [c["step"] for c in got] == evaluated
