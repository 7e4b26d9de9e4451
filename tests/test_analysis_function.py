"""Function-space comparisons on a tiny random Qwen3: LMC against merging the weights directly, CKA
against Hugging Face transformers + PEFT hidden states, and run_analysis end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import analysis
from analysis.adapters import load_adapters
from analysis.function_space import (DeltaSetter, PathAccuracy, layer_cka, lmc_curve, prompt_batches, scored_loss,
                                     solution_batches)
from engine import load_model, load_tokenizer
from engine.errors import EngineError
from engine.model.lora import LoRAConfig, apply_lora, lora_modules, merge_adapter, save_adapter
from engine.tasks.registry import TaskItem, load_task
from helpers import tiny_model_dir
from helpers import write_adapter

ITEMS = [TaskItem(f"t{i}", f"What is {a} + {b}?", str(a + b), "test", f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}")
         for i, (a, b) in enumerate([(3, 17), (12, 42), (7, 3), (51, 17), (29, 42)])]




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fs")
    base = tiny_model_dir(root / "base", seed=3)
    runs = []
    for i, rs in enumerate((False, False, True)):
        model = load_model(base, device="cpu")
        apply_lora(model, LoRAConfig(r=4, alpha=8 + 4 * i, use_rslora=rs), seed=0)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_A.add_(0.3 * torch.randn(m.lora_A.shape, generator=g))
                m.lora_B.copy_(0.2 * torch.randn(m.lora_B.shape, generator=g))
        save_adapter(model, root / f"run{i}", str(base))
        runs.append(root / f"run{i}")
    return base, runs


def _reference_loss(model, batches) -> float:
    """Mean answer-token cross-entropy straight from the full logits (no fused log-prob path)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, attn, score in batches:
            logp = F.log_softmax(model(ids, attn).logits.double(), -1)
            picked = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
            mask = score[:, 1:]
            total -= float(picked[mask].sum())
            count += int(mask.sum())
    return total / count


def test_lmc_matches_direct_weight_merge(setup):
    base, runs = setup
    aset = load_adapters(runs, base)
    tok = load_tokenizer(base)
    batches = solution_batches(tok, ITEMS, style="gsm8k", batch_size=2)
    # The score mask covers exactly the worked solution and the stop token after the prompt.
    ids, _, score = batches[0]
    assert tok.decode(ids[0][score[0]].tolist(), skip_special_tokens=False) == "3 + 17 = <<3+17=20>>20\n#### 20<|im_end|>"
    scored = ids[0][score[0]]
    assert scored[-1] == tok.im_end_id and bool((scored[:-1] != tok.im_end_id).all())
    with pytest.raises(EngineError, match="1 of 2 items have none.*'bare'"):
        solution_batches(tok, [ITEMS[0], TaskItem("bare", "q?", "1", "test")])
    model = load_model(base, device="cpu")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    setter = DeltaSetter(model, aset)
    curve = lmc_curve(setter, 1, 2, batches, [0.0, 0.3, 0.5, 1.0])
    # Endpoints: the two runs merged by the engine into their own model copies.
    for alpha, run in ((0.0, runs[2]), (1.0, runs[1])):
        merged = merge_adapter(load_model(base, device="cpu", adapter=run))
        assert curve["loss"][curve["alphas"].index(alpha)] == pytest.approx(_reference_loss(merged, batches), rel=1e-5)
    # Interior point: W0 + 0.3 Delta_1 + 0.7 Delta_2 written into the weights by hand (float64 sum).
    direct = load_model(base, device="cpu")
    with torch.no_grad():
        for name, p in direct.named_parameters():
            if name.removesuffix(".weight") in aset.modules:
                A, B = aset.factors(name.removesuffix(".weight"))
                d = 0.3 * aset.scales[1] * B[1] @ A[1] + 0.7 * aset.scales[2] * B[2] @ A[2]
                p.copy_((p.double() + d).float())
    assert curve["loss"][1] == pytest.approx(_reference_loss(direct, batches), rel=1e-5)
    # Barriers from the curve's own numbers.
    L = curve["loss"]
    assert curve["barrier_mean_ends"] == pytest.approx(max(L) - (L[0] + L[3]) / 2)
    assert curve["barrier_midpoint"] == pytest.approx(L[2] - (L[0] + L[3]) / 2)
    assert curve["barrier"] == pytest.approx(max(lo - ((1 - a) * L[0] + a * L[3]) for a, lo in zip(curve["alphas"], L)))
    # In place on one model: the base weights never changed, and a point recomputes identically.
    for n, p in model.named_parameters():
        if not n.endswith(("lora_A", "lora_B")):
            assert torch.equal(p, w0[n]), n
    setter.set([0.0, 0.3, 0.7])
    assert scored_loss(model, batches) == curve["loss"][1]
    with pytest.raises(ValueError, match="include 0 and 1"):
        lmc_curve(setter, 0, 1, batches, [0.0, 0.5])


def _hf_states(base, adapter, batches):
    """Per-layer hidden states from transformers + PEFT (merged): the independent reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32, attn_implementation="eager")
    hf = PeftModel.from_pretrained(hf, str(adapter)).merge_and_unload().eval()
    out = []
    with torch.no_grad():
        for ids, attn, _ in batches:
            out.append([h.double() for h in hf(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[1:]])
    return out


def test_layer_cka_matches_transformers_peft(setup):
    base, runs = setup
    aset = load_adapters(runs, base)
    tok = load_tokenizer(base)
    batches = prompt_batches(tok, ITEMS, style="gsm8k", batch_size=3)
    setter = DeltaSetter(load_model(base, device="cpu"), aset)
    mean = layer_cka(setter, batches, "mean")
    tokens = layer_cka(setter, batches, "tokens")
    L = len(aset.layer_of) // 4
    assert mean.shape == tokens.shape == (3, 3, L)
    ref = [_hf_states(base, run, batches) for run in runs]            # [run][batch][layer] -> [B, T, H]
    pooled = [torch.stack([torch.cat([(st[layer] * attn[..., None]).sum(1) / attn.sum(1, keepdim=True)
                                      for st, (_, attn, _) in zip(r, batches)]) for layer in range(L)]) for r in ref]
    for a in range(3):
        for b in range(3):
            torch.testing.assert_close(mean[a, b], analysis.linear_cka(pooled[a], pooled[b]), rtol=1e-4, atol=1e-5)
            xs = [torch.stack([st[layer][attn.bool()] for layer in range(L)]) for st, (_, attn, _) in zip(ref[a], batches)]
            ys = [torch.stack([st[layer][attn.bool()] for layer in range(L)]) for st, (_, attn, _) in zip(ref[b], batches)]
            torch.testing.assert_close(tokens[a, b], analysis.minibatch_cka(xs, ys), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.diagonal(mean), torch.ones(L, 3, dtype=torch.float64))
    assert float(mean[0, 1].min()) < 0.999                            # different runs really differ


def test_run_analysis_end_to_end(setup, tmp_path):
    base, runs = setup
    for i, run in enumerate(runs):
        rows = [{"id": f"q{j}", "correct": (j * (i + 2)) % 3 != 0} for j in range(30)]
        (tmp_path / "ev" / f"run{i}").mkdir(parents=True)
        (tmp_path / "ev" / f"run{i}" / "synthetic_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    metrics = analysis.run_analysis(runs, base=base, reference="run1", eval_dir=tmp_path / "ev", out=out, k=3,
                                    task="synthetic", n_items=4, lmc_points=3, batch_size=2, cka_mode="mean",
                                    max_new_tokens=6, progress=False, echo=lambda s: None)
    strict = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert strict["reference"] == "run1" and strict["pairs"] == [["run0", "run1"], ["run0", "run2"], ["run1", "run2"]]
    fs = strict["function_space"]
    assert [(c["a"], c["b"]) for c in fs["lmc"]] == [("run0", "run1"), ("run2", "run1")]
    assert fs["lmc"][0]["alphas"] == [0.0, 0.5, 1.0] and fs["n_items"] == 4 and fs["style"] == "plain"
    assert len(fs["cka"]["per_layer"]) == 3 and len(fs["cka"]["per_layer"][0]) == 2
    # The base's own in-format loss (the yardstick for the endpoints), from the plain model's full logits.
    tok = load_tokenizer(base)
    plain = _reference_loss(load_model(base, device="cpu"), solution_batches(tok, load_task("synthetic", "test", limit=4),
                                                                             style="plain", batch_size=2))
    assert fs["base_loss"] == pytest.approx(plain, rel=1e-5)
    for c in fs["lmc"]:
        assert c["accuracy"]["alphas"] == [0.0, 0.5, 1.0] and c["accuracy"]["n"] == 4
        assert c["barrier"] >= 0.0                       # alpha = 0 and 1 lie on the chord themselves
    assert set(strict["evaluation"]["synthetic_test"]["accuracy"]) == {"run0", "run1", "run2"}
    pa = strict["geometry"]["principal_angles"]
    assert 0 < pa["random"]["left"]["smallest"] <= pa["random"]["left"]["kth"] <= 90
    assert strict["geometry"]["init_alignment"]["runs"] == [None] * 3      # adapters saved without a trainer state
    report = (out / "report.md").read_text()
    assert "Random floor:" in report and "gold worked solution" in report and "The base model's loss" in report
    for heading in ("Cosine similarity", "Principal angles", "Norms and effective ranks", "Linear mode connectivity",
                    "Per-layer CKA", "Accuracy: synthetic_test", "McNemar"):
        assert heading in report
    for png in ("cosine_heatmap.png", "per_layer_cosine_orthogonal.png", "principal_angles.png", "lmc.png",
                "cka_per_layer.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["geometry"]["cosine"]["global"] == strict["geometry"]["cosine"]["global"]


def test_geometry_only_without_weights(setup, tmp_path):
    base, runs = setup
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((base / "config.json").read_text())
    for b in (None, tmp_path / "cfg"):
        m = analysis.run_analysis(runs, base=b, reference=None, out=tmp_path / "geo", plots=False, echo=lambda s: None)
        assert m["function_space"] is None and m["reference"] == "run0" and m["plots"] == []
    with pytest.raises(EngineError, match="need the base model"):
        analysis.run_analysis(runs, reference="run0", out=tmp_path / "x", function_space=True, echo=lambda s: None)
    with pytest.raises(EngineError, match="reference run 'sft' is not one of the runs"):
        analysis.run_analysis(runs, out=tmp_path / "x", echo=lambda s: None)


def test_zero_update_gives_nan_not_crash(tmp_path):
    """An untrained adapter (B = 0): cosine undefined, written as null, and the report still renders."""
    f = {"model.layers.0.self_attn.q_proj": {"A": torch.randn(2, 6), "B": torch.randn(5, 2)}}
    zero = {"model.layers.0.self_attn.q_proj": {"A": torch.randn(2, 6), "B": torch.zeros(5, 2)}}
    dirs = [write_adapter(tmp_path / "a", f, r=2, alpha=2, targets=("q_proj",)),
            write_adapter(tmp_path / "z", zero, r=2, alpha=2, targets=("q_proj",))]
    m = analysis.run_analysis(dirs, reference="a", out=tmp_path / "rep", echo=lambda s: None)
    assert m["geometry"]["cosine"]["global"][0][1] is None
    assert m["geometry"]["norms"]["global"][1] == 0.0
    assert "n/a" in (tmp_path / "rep" / "report.md").read_text()
    assert not math.isnan(m["geometry"]["cosine"]["global"][0][0])


def test_report_sets_headline_numbers_beside_the_study(tmp_path):
    from helpers import correlated_runs
    dirs = []
    for name, f in zip(("sft", "rft", "grpo", "dpo"), correlated_runs(2, 3, 4, seed=5)):
        dirs.append(write_adapter(tmp_path / name / "step-10", f, r=3, alpha=6))
    m = analysis.run_analysis([d for d in dirs], reference="sft", out=tmp_path / "rep", plots=False,
                              echo=lambda s: None)
    assert m["reference"] == "sft/step-10"                          # matched by method name
    report = (tmp_path / "rep" / "report.md").read_text()
    cos = m["geometry"]["cosine"]["global"]
    assert f"| cosine sft-rft | 0.977 | {cos[0][1]:.3f} |" in report
    assert f"| cosine sft-dpo | 0.060 | {cos[0][3]:.3f} |" in report
    angle = m["geometry"]["principal_angles"]["left"]["smallest"]["median"][2]   # pair (sft, dpo)
    assert f"| median smallest left angle sft-dpo (deg) | 54.6 | {angle:.1f} |" in report
    frac = m["geometry"]["orthogonal_fraction"]["vector"]["global"][2]
    assert f"| orthogonal fraction grpo vs sft (global) | 0.67 | {frac:.3f} |" in report


def test_path_accuracy_is_the_eval_of_the_merged_midpoint(setup):
    """Greedy completions at alpha = 1/2 equal `evaluate_items` on W0 + Delta_1/2 + Delta_2/2 merged into the
    weights by hand; each coefficient vector is generated once, however many pairs share it."""
    from engine.generate.rollout import evaluate_items
    base, runs = setup
    aset = load_adapters(runs, base)
    tok = load_tokenizer(base)
    setter = DeltaSetter(load_model(base, device="cpu"), aset)
    acc = PathAccuracy(setter, tok, ITEMS, style="plain", enable_thinking=None, max_new_tokens=7, batch_size=4)
    path = acc.along(1, 2, [0.0, 0.5, 1.0])
    assert path["n"] == len(ITEMS) and len(path["correct"]) == 3
    assert path["accuracy"] == [c / len(ITEMS) for c in path["correct"]]
    direct = load_model(base, device="cpu")
    with torch.no_grad():
        for name, p in direct.named_parameters():
            if name.removesuffix(".weight") in aset.modules:
                A, B = aset.factors(name.removesuffix(".weight"))
                p.copy_((p.double() + 0.5 * aset.scales[1] * B[1] @ A[1] + 0.5 * aset.scales[2] * B[2] @ A[2]).float())
    want, _ = evaluate_items(direct, tok, ITEMS, max_new_tokens=7, batch_size=4, style="plain")
    got = acc.records([0.0, 0.5, 0.5])
    assert [r["completion"] for r in got] == [r["completion"] for r in want]
    acc.along(0, 2, [0.0])                               # alpha = 0 of (0, 2) is run 2, generated already
    assert sorted(acc._records) == [(0.0, 0.0, 1.0), (0.0, 0.5, 0.5), (0.0, 1.0, 0.0)]


def test_k_scales_with_the_rank_and_never_equals_it(setup, tmp_path):
    from analysis.run import check_k, default_k
    assert [default_k(r) for r in (1, 2, 4, 8, 16, 32, 64)] == [1, 1, 1, 3, 5, 10, 20]
    assert all(default_k(r) < r for r in range(2, 200))
    assert check_k(None, 32) == 10 and check_k(7, 8) == 7
    for bad in (0, -1, 2.0, True):
        with pytest.raises(EngineError, match="positive integer"):
            check_k(bad, 8)
    with pytest.raises(EngineError, match="k = 8 is not below the adapters' rank 8.*k = 3"):
        check_k(8, 8)
    base, runs = setup                                    # rank 4: k defaults to 1, k = 4 is refused
    m = analysis.run_analysis(runs, base=None, reference=None, out=tmp_path / "geo", plots=False, echo=lambda s: None)
    assert m["geometry"]["principal_angles"]["k"] == 1
    with pytest.raises(EngineError, match="not below the adapters' rank 4"):
        analysis.run_analysis(runs, base=None, reference=None, k=4, out=tmp_path / "geo", plots=False, echo=lambda s: None)


def test_analyze_command(setup, tmp_path):
    """`cli.py analyze` over the runs: the default k follows the rank; k = r is one line and exit 2."""
    from click.testing import CliRunner

    from cli import main
    base, runs = setup
    ok = CliRunner().invoke(main, ["analyze", *map(str, runs), "--reference", "run0", "--no-function-space",
                                   "--out", str(tmp_path / "rep")])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["geometry"]["principal_angles"]["k"] == 1
    bad = CliRunner().invoke(main, ["analyze", *map(str, runs), "--reference", "run0", "--no-function-space",
                                    "--k", "4", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "not below the adapters' rank 4" in bad.output, bad.output
    assert not (tmp_path / "bad").exists()
