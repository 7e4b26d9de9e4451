"""Base alignment (principal overlap, rotation, spectrum drift, intruders) against dense float64
numpy/scipy on the full W0 + Delta W, invariances, planted cases, and the base-SVD cache."""
from __future__ import annotations

import json
import math
import secrets

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from analysis import base_svd
from analysis.base_alignment import EPS_GRID, intruder_counts, module_alignment, top_svd_core
from analysis.base_svd import load_base_svd
from engine.errors import EngineError
from helpers import SHAPES, random_factors, write_adapter


def _rng() -> tuple[np.random.Generator, int]:
    seed = secrets.randbits(32)      # fresh inputs every run; the seed is in every failure message
    return np.random.default_rng(seed), seed


def _base(rng: np.random.Generator, out: int, inn: int) -> np.ndarray:
    """A base weight with a distinct, decaying spectrum (as trained weights have): top vectors well defined."""
    n = min(out, inn)
    U = np.linalg.qr(rng.standard_normal((out, n)))[0]
    V = np.linalg.qr(rng.standard_normal((inn, n)))[0]
    s = 5.0 * 0.85 ** np.arange(n) * (1 + 0.05 * rng.random(n))
    return (U * np.sort(s)[::-1]) @ V.T


def _dense_reference(W0: np.ndarray, dW: np.ndarray, k: int, K: int) -> dict:
    U0, S0, V0h = np.linalg.svd(W0, full_matrices=False)
    V0 = V0h.T
    Uw, Sw, Vwh = np.linalg.svd(W0 + dW, full_matrices=False)
    nrm = (dW ** 2).sum()
    deg = lambda a: np.sort(np.degrees(a))     # noqa: E731
    return {"both": ((U0[:, :k].T @ dW @ V0[:, :k]) ** 2).sum() / nrm,
            "left": ((U0[:, :k].T @ dW) ** 2).sum() / nrm, "right": ((dW @ V0[:, :k]) ** 2).sum() / nrm,
            "angles_left": deg(scipy.linalg.subspace_angles(Uw[:, :k], U0[:, :k])),
            "angles_right": deg(scipy.linalg.subspace_angles(Vwh[:k].T, V0[:, :k])),
            "sigma": Sw[:k], "sigma0": S0[:k], "max_cos": np.abs(Uw[:, :K].T @ U0).max(1)}


def _ours(W0: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float, k: int, K: int, dtype=torch.float64, **kw):
    f = base_svd.svd_of(torch.from_numpy(W0).to(dtype), "cpu") if dtype == torch.float32 else None
    if f is None:
        U, S, Vh = torch.linalg.svd(torch.from_numpy(W0), full_matrices=False)
        f = {"U": U, "S": S, "V": Vh.mT}
    return module_alignment(torch.from_numpy(A)[None], torch.from_numpy(B)[None],
                            torch.tensor([scale], dtype=torch.float64),
                            f["U"], f["S"], f["V"], (k,), k, K, **kw)


def _compare(ours, ref: dict, k: int, atol: float, msg: str) -> None:
    """Angles to 1e-4 degrees at float64: scipy's tiny angles carry sqrt(machine eps) radians of noise."""
    got = ours.overlap[k][0] / ours.norm_sq[0]
    np.testing.assert_allclose(got.numpy(), [ref["both"], ref["left"], ref["right"]], atol=atol, err_msg=msg)
    for side in ("angles_left", "angles_right"):
        np.testing.assert_allclose(getattr(ours, side)[0].numpy(), ref[side], atol=max(1e-4, 1e3 * atol), err_msg=msg)
    np.testing.assert_allclose(ours.sigma[0].numpy(), ref["sigma"], rtol=atol, err_msg=msg)
    np.testing.assert_allclose(ours.sigma0.numpy(), ref["sigma0"], rtol=atol, err_msg=msg)
    np.testing.assert_allclose(ours.max_cos[0].numpy(), ref["max_cos"], atol=10 * atol, err_msg=msg)


@pytest.mark.parametrize("out,inn", [(37, 23), (23, 37), (31, 31), (45, 19)])
@pytest.mark.parametrize("r", [1, 3, 7])
def test_every_metric_matches_dense_reference(out, inn, r):
    rng, seed = _rng()
    W0 = _base(rng, out, inn)
    A, B = rng.standard_normal((r, inn)) / math.sqrt(inn), rng.standard_normal((out, r))
    scale = float(rng.uniform(0.1, 2.0))
    k, K = int(rng.integers(1, min(out, inn) // 2)), int(rng.integers(1, 11))
    ref = _dense_reference(W0, scale * B @ A, k, K)
    _compare(_ours(W0, A, B, scale, k, K), ref, k, 1e-9, f"seed {seed} k={k} K={K}")
    # The dense fallback (no iteration converges in one step at this tolerance) gives the same numbers.
    _compare(_ours(W0, A, B, scale, k, K, tol=0.0, max_iter=1), ref, k, 1e-9, f"fallback, seed {seed}")
    # float32 base SVD (what the cache holds): the same to float32 accuracy.
    _compare(_ours(W0, A, B, scale, k, K, dtype=torch.float32), ref, k, 2e-4, f"float32 base, seed {seed}")


def test_top_svd_core_converges_without_fallback():
    rng, seed = _rng()
    n, r, m = 60, 4, 10
    S0 = torch.from_numpy(np.sort(5 * 0.8 ** np.arange(n))[::-1].copy())
    X, Y = torch.from_numpy(rng.standard_normal((2, n + r, r))), torch.from_numpy(rng.standard_normal((2, n + r, r)))
    P, sig, Q, resid = top_svd_core(S0, X, Y, m, max_iter=500)
    assert bool((resid > 0).all()) and bool((resid <= 1e-11).all()), f"seed {seed}: iteration did not converge"
    K = torch.diag_embed(torch.cat([S0, torch.zeros(r, dtype=S0.dtype)]).expand(2, -1)) + X @ Y.mT
    np.testing.assert_allclose(sig.numpy(), torch.linalg.svdvals(K)[:, :m].numpy(), rtol=1e-10, err_msg=str(seed))
    np.testing.assert_allclose((K @ Q).numpy(), (P * sig[:, None]).numpy(), atol=1e-9, err_msg=str(seed))


def test_invariant_under_factor_rotation():
    rng, seed = _rng()
    out, inn, r = 29, 41, 5
    W0 = _base(rng, out, inn)
    A, B = rng.standard_normal((r, inn)), rng.standard_normal((out, r))
    Q = np.linalg.qr(rng.standard_normal((r, r)))[0]
    a, b = _ours(W0, A, B, 0.7, 6, 8), _ours(W0, Q.T @ A, B @ Q, 0.7, 6, 8)
    for f in ("norm_sq", "angles_left", "angles_right", "sigma", "max_cos"):
        np.testing.assert_allclose(getattr(a, f).numpy(), getattr(b, f).numpy(), atol=1e-9, err_msg=f"{f} seed {seed}")
    np.testing.assert_allclose(a.overlap[6].numpy(), b.overlap[6].numpy(), atol=1e-9, err_msg=str(seed))


@pytest.mark.parametrize("out,inn", [(30, 30), (40, 24)])
def test_planted_inside_top_k_span_has_overlap_one(out, inn):
    rng, seed = _rng()
    W0, k, r = _base(rng, out, inn), 6, 3
    U0, _, V0h = np.linalg.svd(W0, full_matrices=False)
    B, A = U0[:, :k] @ rng.standard_normal((k, r)), rng.standard_normal((r, k)) @ V0h[:k]
    got = _ours(W0, A, B, 1.0, k, 10)
    np.testing.assert_allclose((got.overlap[k][0] / got.norm_sq[0]).numpy(), [1, 1, 1], atol=1e-12, err_msg=str(seed))


@pytest.mark.parametrize("out,inn", [(30, 30), (40, 24)])
def test_planted_in_the_complement_has_overlap_zero_and_creates_intruders(out, inn):
    rng, seed = _rng()
    W0, k, r = _base(rng, out, inn), 6, 2
    U0, S0, V0h = np.linalg.svd(W0, full_matrices=False)
    # Each new direction spreads evenly over 9 lower base directions: max |cos| with any base vector 1/3.
    # Sizes 40 and 20 sigma_1: the top-2 vectors of W0 + dW are those directions to about sigma_1 / 20.
    spread = np.zeros((U0.shape[1], r))
    spread[k:k + 9, 0] = spread[k + 9:k + 18, 1] = 1 / 3
    B, A = S0[0] * U0 @ spread * [40, 20], (V0h.T @ spread).T
    got = _ours(W0, A, B, 1.0, k, r)
    np.testing.assert_allclose((got.overlap[k][0] / got.norm_sq[0]).numpy(), [0, 0, 0], atol=1e-12, err_msg=str(seed))
    counts = intruder_counts(got.max_cos, EPS_GRID)[0]
    assert counts[EPS_GRID.index(0.5)] == r and counts[EPS_GRID.index(0.2)] == 0, f"seed {seed}: {got.max_cos}"
    assert got.angles_left[0, -1] > 80          # the two new top directions rotate the top-k subspace
    # The same size update along the base's own top directions makes no intruders.
    B2, A2 = 10 * S0[0] * U0[:, :r], V0h[:r]
    assert intruder_counts(_ours(W0, A2, B2, 1.0, k, 10).max_cos, EPS_GRID)[0].sum() == 0
    if out > inn:   # room outside span(U0): cosines with every base vector near zero
        Bo = np.linalg.qr(np.hstack([U0, rng.standard_normal((out, r))]))[0][:, -r:] * 40 * S0[0]
        mc = _ours(W0, np.linalg.qr(rng.standard_normal((inn, r)))[0].T * [[1], [0.5]], Bo, 1.0, k, 10).max_cos[0]
        assert float(mc[:r].max()) < 0.1, f"seed {seed}: {mc}"


def test_zero_update_gives_nan_overlap_not_an_error():
    rng, _ = _rng()
    W0 = _base(rng, 20, 16)
    got = _ours(W0, rng.standard_normal((2, 16)), np.zeros((20, 2)), 1.0, 4, 5)
    assert math.isnan(float(got.overlap[4][0, 0] / got.norm_sq[0]))
    np.testing.assert_allclose(got.angles_left[0].numpy(), 0, atol=1e-6)
    np.testing.assert_allclose(got.max_cos[0].numpy(), 1, atol=1e-9)


# ---- the base-SVD cache -----------------------------------------------------------------------------

def _write_base(path, layers: int = 2, seed: int | None = None) -> list[str]:
    g = torch.Generator().manual_seed(secrets.randbits(32) if seed is None else seed)
    path.mkdir(parents=True, exist_ok=True)
    tensors, modules = {}, []
    for i in range(layers):
        for kind, (o, n) in SHAPES.items():
            modules.append(f"model.layers.{i}.self_attn.{kind}")
            tensors[modules[-1] + ".weight"] = torch.randn(o, n, generator=g)
    tensors["model.norm.weight"] = torch.ones(20)
    save_file(tensors, str(path / "model.safetensors"))
    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 64, "hidden_size": 20,
           "intermediate_size": 32, "num_hidden_layers": layers, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 6, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "max_position_embeddings": 64, "tie_word_embeddings": True}
    (path / "config.json").write_text(json.dumps(cfg))
    return modules


def test_cache_hit_miss_and_key(tmp_path, monkeypatch):
    modules = _write_base(tmp_path / "base")
    svd = load_base_svd(tmp_path / "base", modules, tmp_path / "report", progress=False)
    raw = svd.path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])          # a safetensors file
    assert header["__metadata__"]["base_sha256"] == svd.key
    U, S, V = svd.get(modules[0])
    from safetensors import safe_open
    with safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as f:
        W0 = f.get_tensor(modules[0] + ".weight")
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, W0, atol=1e-5, rtol=1e-5)
    # Hit: nothing recomputed, and nothing unpickled on the way.
    monkeypatch.setattr(base_svd, "svd_of", lambda *a, **k: pytest.fail("cache miss on an unchanged base"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("pickle load"))
    again = load_base_svd(tmp_path / "base", modules, tmp_path / "report", progress=False)
    assert again.path == svd.path and again.key == svd.key
    monkeypatch.undo()
    # A modified base gets a new key and a new file; the old one is not reused.
    _write_base(tmp_path / "base")
    other = load_base_svd(tmp_path / "base", modules, tmp_path / "report", progress=False)
    assert other.key != svd.key and other.path != svd.path
    with safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as f:
        W1 = f.get_tensor(modules[0] + ".weight")
    U, S, V = other.get(modules[0])
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, W1, atol=1e-5, rtol=1e-5)


def test_cache_write_is_atomic_and_extends(tmp_path, monkeypatch):
    modules = _write_base(tmp_path / "base")
    svd = load_base_svd(tmp_path / "base", modules[:2], tmp_path / "report", progress=False)
    before = svd.path.read_bytes()
    calls = []
    real = base_svd.svd_of

    def failing(W, device=None):
        calls.append(1)
        raise RuntimeError("killed mid-write")
    monkeypatch.setattr(base_svd, "svd_of", failing)
    with pytest.raises(RuntimeError):
        load_base_svd(tmp_path / "base", modules, tmp_path / "report", progress=False)
    assert svd.path.read_bytes() == before and calls          # the old file intact, no temp files left
    assert [p.name for p in (tmp_path / "report").iterdir()] == [svd.path.name]
    monkeypatch.setattr(base_svd, "svd_of", lambda W, device=None: (calls.append(2), real(W, device))[1])
    calls.clear()
    full = load_base_svd(tmp_path / "base", modules, tmp_path / "report", progress=False)
    assert len(calls) == len(modules) - 2                     # only the modules not yet cached
    assert all(full.get(m)[0].shape[0] == SHAPES[m.rsplit(".", 1)[1]][0] for m in modules)
    # A corrupt cache file is recomputed, not trusted.
    full.path.write_bytes(b"garbage")
    assert load_base_svd(tmp_path / "base", modules, tmp_path / "report", progress=False).get(modules[0])


def test_missing_base_tensor_names_it(tmp_path):
    modules = _write_base(tmp_path / "base")
    with pytest.raises(EngineError, match="lack model.layers.9.self_attn.q_proj.weight"):
        load_base_svd(tmp_path / "base", ["model.layers.9.self_attn.q_proj"], tmp_path / "r", progress=False)
    with pytest.raises(EngineError, match="no \\*.safetensors"):
        load_base_svd(tmp_path / "report-only", modules, tmp_path / "r", progress=False)


# ---- through run_analysis ---------------------------------------------------------------------------

def test_run_analysis_reports_base_alignment(tmp_path):
    from analysis import run_analysis
    _write_base(tmp_path / "base", layers=2, seed=1)
    dirs = []
    for seed in (42, 43):
        for j, loss in enumerate(("sft", "grpo", "dpo")):
            f = random_factors(2, 3, seed * 10 + j)
            dirs.append(write_adapter(tmp_path / f"seed-{seed}" / loss, f, r=3, alpha=6))
    m = run_analysis(dirs, base=tmp_path / "base", reference="seed-42/sft", out=tmp_path / "rep",
                     function_space=False, progress=False, echo=lambda s: None,
                     base_alignment={"k": 40, "top": 4, "epsilon": 0.4})
    ba = m["base_alignment"]
    assert ba["k"] == 11 and ba["k_requested"] == 40 and ba["k_rank"] == 3 and ba["epsilon"] == 0.4
    assert set(ba["by_loss"]) == {"sft", "grpo", "dpo"} and ba["by_loss"]["sft"]["n_seeds"] == 2
    floor = ba["by_loss"]["sft"]["overlap_k11"]["noise_floor"]
    vals = [ba["principal_overlap"]["11"]["both"]["global"][i] for i in (0, 3)]
    assert floor == pytest.approx(abs(vals[0] - vals[1]))
    assert len(ba["principal_overlap"]["3"]["both"]["per_layer"][0]) == 2
    assert m["verdicts"] and m["verdicts"][0]["verdict"] in ("held", "not held", "inconclusive")
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "## Where the updates sit relative to the base weights" in report and "RL-style losses" in report
    assert "principal_overlap_per_layer.png" in m["plots"]
    assert (tmp_path / "rep" / "principal_overlap_per_layer.png").is_file()
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["base_alignment"]["K"] == 4
    for bad, field in (({"epsilon": 2}, "intruder_epsilon"), ({"k": 0}, "principal_k"), ({"top": 1.5}, "intruder_top")):
        with pytest.raises(EngineError, match=f"field '{field}'"):
            run_analysis(dirs, base=tmp_path / "base", reference="seed-42/sft", out=tmp_path / "rep2",
                         function_space=False, progress=False, echo=lambda s: None, base_alignment=bad)


def test_verdict_rule():
    from analysis.verdicts import compare_lower, rl_off_principals

    def st(mean, floor):
        return {"mean": mean, "std": None, "min": None, "max": None, "noise_floor": floor}
    by = lambda s, g, d: {"sft": {"x": s}, "grpo": {"x": g}, "dpo": {"x": d}}   # noqa: E731
    assert compare_lower(by(st(5, .1), st(3, .2), st(2, .1)), "x", ["grpo", "dpo"], "sft")[0] == "held"
    assert compare_lower(by(st(5, .1), st(3, .2), st(5.1, .3)), "x", ["grpo", "dpo"], "sft")[0] == "inconclusive"
    assert compare_lower(by(st(5, .1), st(3, .2), st(6, .3)), "x", ["grpo", "dpo"], "sft")[0] == "not held"
    assert compare_lower(by(st(5, None), st(3, None), st(2, None)), "x", ["grpo", "dpo"], "sft")[0] == "inconclusive"
    ba = {"k": 16, "by_loss": {"sft": {"overlap_k16_over_random": st(5, .1)},
                               "dpo": {"overlap_k16_over_random": st(2, .1)}}}
    row = rl_off_principals({"base_alignment": ba})
    assert row.verdict == "held" and "dpo 2.00" in row.ours
    assert rl_off_principals({"base_alignment": {"k": 16, "by_loss": {"dpo": {}}}}) is None
    assert rl_off_principals({"base_alignment": None}) is None


def test_cli_defaults_match_the_module_defaults():
    """cli.py writes the analyze options out (no torch import at start-up): they must agree with DEFAULTS."""
    from cli import analyze
    from analysis.base_alignment_summary import DEFAULTS
    opts = {p.name: p.default for p in analyze.params}
    assert {k: opts[f"ba_{k}"] for k in DEFAULTS} == DEFAULTS
