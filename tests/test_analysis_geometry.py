"""Geometry of LoRA updates against float64 numpy/scipy on the full Delta W, and analytic cases."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

import analysis
from analysis.adapters import load_adapters
from analysis.geometry import compute_geometry, summarize
from analysis.linalg import factored_svd, frobenius_inner
from engine.errors import EngineError
from helpers import SHAPES, correlated_runs, delta, random_factors, write_adapter


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]


# ---- primitives -------------------------------------------------------------------------------------

def test_factored_svd_equals_full_svd():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 3, 5, 17, generator=g, dtype=torch.float64)     # [..., r, in]
    B = torch.randn(2, 3, 11, 5, generator=g, dtype=torch.float64)     # [..., out, r]
    scale = torch.tensor([[0.5], [3.0]], dtype=torch.float64)
    U, S, V = factored_svd(A, B, scale)
    for i, j in itertools.product(range(2), range(3)):
        D = (scale[i, 0] * B[i, j] @ A[i, j]).numpy()
        Ur, Sr, Vtr = np.linalg.svd(D, full_matrices=False)
        np.testing.assert_allclose(S[i, j].numpy(), Sr[:5], rtol=1e-12, atol=1e-12)
        # Singular vectors up to sign (distinct singular values for random factors).
        signs_u = np.sign(np.sum(U[i, j].numpy() * Ur[:, :5], 0))
        np.testing.assert_allclose(U[i, j].numpy() * signs_u, Ur[:, :5], atol=1e-10)
        signs_v = np.sign(np.sum(V[i, j].numpy() * Vtr[:5].T, 0))
        np.testing.assert_allclose(V[i, j].numpy() * signs_v, Vtr[:5].T, atol=1e-10)
        np.testing.assert_allclose((U[i, j] * S[i, j]) @ V[i, j].T, D, atol=1e-12)
    U2, S2, V2 = factored_svd(A, B, scale, k=2)                         # top-k vectors only, all values
    assert U2.shape == (2, 3, 11, 2) and V2.shape == (2, 3, 17, 2) and S2.shape == (2, 3, 5)
    torch.testing.assert_close(U2, U[..., :2], rtol=0, atol=1e-13)
    torch.testing.assert_close(V2, V[..., :2], rtol=0, atol=1e-13)


def test_frobenius_inner_without_forming_delta():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 2, 3, 9, generator=g, dtype=torch.float64)
    B = torch.randn(4, 2, 7, 3, generator=g, dtype=torch.float64)
    G = frobenius_inner(A, B)                                           # [4, 4, 2]
    for a, b, m in itertools.product(range(4), range(4), range(2)):
        expect = float(((B[a, m] @ A[a, m]) * (B[b, m] @ A[b, m])).sum())
        assert G[a, b, m].item() == pytest.approx(expect, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n,k1,k2", [(30, 4, 4), (25, 6, 3), (25, 3, 6), (12, 1, 1)])
def test_principal_angles_match_scipy(n, k1, k2):
    g = torch.Generator().manual_seed(n + k1 + k2)
    # V's columns: U's first columns perturbed by eps (small angles, the sine form), then random ones.
    cases = []
    for eps in (1e-9, 1e-4, 0.3, 1.0):
        U = _orthonormal(n, k1, g)
        shared = min(k1, k2)
        V = torch.cat([U[:, :shared], torch.randn(n, k2 - shared, generator=g, dtype=torch.float64)], 1)
        V = torch.linalg.qr(V + eps * torch.randn(n, k2, generator=g, dtype=torch.float64))[0]
        cases.append((U, V))
    U = torch.stack([c[0] for c in cases])
    V = torch.stack([c[1] for c in cases])
    got = analysis.principal_angles(U, V)                               # batched over the 4 cases
    assert got.shape == (4, min(k1, k2))
    for c, (Ui, Vi) in enumerate(cases):
        ref = scipy.linalg.subspace_angles(Ui.numpy(), Vi.numpy())      # descending
        np.testing.assert_allclose(got[c].numpy(), ref[::-1], atol=1e-12, rtol=1e-9)
        assert bool((got[c][1:] >= got[c][:-1]).all())                  # ascending


def test_principal_angles_analytic():
    g = torch.Generator().manual_seed(3)
    Q = _orthonormal(20, 6, g)
    U, W = Q[:, :3], Q[:, 3:]
    assert analysis.principal_angles(U, U).abs().max() < 1e-7           # identical: 0
    assert analysis.principal_angles(U, U @ _orthonormal(3, 3, g)).abs().max() < 1e-7   # same span
    np.testing.assert_allclose(analysis.principal_angles(U, W).numpy(), [math.pi / 2] * 3, atol=1e-12)
    # One shared direction, the rest orthogonal: angles 0, 90, 90.
    mixed = torch.cat([U[:, :1], W[:, :2]], 1)
    np.testing.assert_allclose(analysis.principal_angles(U, mixed).numpy(), [0, math.pi / 2, math.pi / 2], atol=1e-7)
    # A known angle theta in a plane.
    theta = 0.0123
    V = math.cos(theta) * U[:, :1] + math.sin(theta) * W[:, :1]
    assert analysis.principal_angles(U[:, :1], V).item() == pytest.approx(theta, rel=1e-10)


def test_cosine_analytic():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(5, 7, generator=g)
    assert analysis.cosine(a, a).item() == pytest.approx(1.0, abs=1e-15)
    assert analysis.cosine(a, 3.5 * a).item() == pytest.approx(1.0, abs=1e-15)
    assert analysis.cosine(a, -a).item() == pytest.approx(-1.0, abs=1e-15)
    b = torch.randn(5, 7, generator=g)
    expect = float((a.double() * b.double()).sum() / (a.double().norm() * b.double().norm()))
    assert analysis.cosine(a, b).item() == pytest.approx(expect, rel=1e-12)
    np.testing.assert_allclose(analysis.cosine(a, b, dim=1).numpy(),
                               [float(analysis.cosine(a[i], b[i])) for i in range(5)], rtol=1e-12)


def test_effective_rank():
    assert analysis.effective_rank(torch.tensor([2.0, 2.0, 2.0, 2.0])).item() == pytest.approx(4.0)
    assert analysis.effective_rank(torch.tensor([5.0, 0.0, 0.0])).item() == pytest.approx(1.0)
    s = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    p = s / s.sum()
    assert analysis.effective_rank(s).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-12)


# ---- the full pipeline against a per-module numpy/scipy reference ----------------------------------

def _reference(runs: list[dict], scales: list[float], k: int, ref: int) -> dict:
    """Everything from the full Delta W with numpy/scipy, module by module."""
    modules = sorted(runs[0], key=lambda m: (int(m.split(".")[2]), list(SHAPES).index(m.rsplit(".", 1)[1])))
    D = {(i, m): delta(f[m], s).numpy() for i, (f, s) in enumerate(zip(runs, scales)) for m in modules}
    svd = {key: np.linalg.svd(v, full_matrices=False) for key, v in D.items()}
    return {"modules": modules, "D": D, "svd": svd}


def test_geometry_matches_full_matrix_reference(tmp_path):
    layers, r, k = 3, 5, 3
    runs = correlated_runs(layers, r, 4, seed=7)
    alphas = [10.0, 10.0, 7.0, 16.0]
    rslora = [False, False, False, True]                               # scale alpha/sqrt(r) for the last
    dirs = [write_adapter(tmp_path / f"m{i}", f, r=r, alpha=alphas[i], use_rslora=rslora[i],
                          dtype=torch.float64) for i, f in enumerate(runs)]
    scales = [a / (math.sqrt(r) if rs else r) for a, rs in zip(alphas, rslora)]
    aset = load_adapters(dirs)
    assert aset.names == ["m0", "m1", "m2", "m3"]
    np.testing.assert_allclose(aset.scales.numpy(), scales)
    ref_run = 1
    geo = compute_geometry(aset, k=k, reference=ref_run)
    out = summarize(geo)
    ref = _reference(runs, scales, k, ref_run)
    modules, D, svd = ref["modules"], ref["D"], ref["svd"]
    assert aset.modules == modules
    R = len(runs)

    def vec(i, mods):
        return np.concatenate([D[(i, m)].ravel() for m in mods])

    def cos(x, y):
        return x @ y / np.linalg.norm(x) / np.linalg.norm(y)

    groups = {"global": [modules]}
    groups["per_layer"] = [[m for m in modules if m.split(".")[2] == str(li)] for li in range(layers)]
    types = list(SHAPES)
    for a, b in itertools.product(range(R), repeat=2):
        assert out["cosine"]["global"][a][b] == pytest.approx(cos(vec(a, modules), vec(b, modules)), abs=1e-12)
        for li, mods in enumerate(groups["per_layer"]):
            assert out["cosine"]["per_layer"][li][a][b] == pytest.approx(cos(vec(a, mods), vec(b, mods)), abs=1e-12)
        for t in types:
            mods = [m for m in modules if m.endswith(t)]
            assert out["cosine"]["per_type"][t][a][b] == pytest.approx(cos(vec(a, mods), vec(b, mods)), abs=1e-12)
        for mi, m in enumerate(modules):
            assert out["cosine"]["per_module"][mi][a][b] == pytest.approx(
                cos(D[(a, m)].ravel(), D[(b, m)].ravel()), abs=1e-12)
    for a in range(R):
        assert out["norms"]["global"][a] == pytest.approx(np.linalg.norm(vec(a, modules)), rel=1e-12)
        for mi, m in enumerate(modules):
            S = svd[(a, m)][1][:r]
            np.testing.assert_allclose(geo.S[a, mi].numpy(), S, rtol=1e-10, atol=1e-12 * S[0])
            p = S / S.sum()
            assert out["effective_rank"]["per_module"][a][mi] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-10)
            assert out["norms"]["per_module"][a][mi] == pytest.approx(np.linalg.norm(D[(a, m)]), rel=1e-12)
    # Principal angles and top-vector alignment, per pair and module.
    left, right = {}, {}
    for p, (a, b) in enumerate(itertools.combinations(range(R), 2)):
        assert geo.pairs[p] == (a, b)
        for mi, m in enumerate(modules):
            Ua, Ub = svd[(a, m)][0][:, :k], svd[(b, m)][0][:, :k]
            Va, Vb = svd[(a, m)][2][:k].T, svd[(b, m)][2][:k].T
            left[p, mi] = np.degrees(scipy.linalg.subspace_angles(Ua, Ub)[::-1])
            right[p, mi] = np.degrees(scipy.linalg.subspace_angles(Va, Vb)[::-1])
            np.testing.assert_allclose(out["principal_angles"]["left"]["per_module"][p][mi], left[p, mi], atol=1e-7)
            np.testing.assert_allclose(out["principal_angles"]["right"]["per_module"][p][mi], right[p, mi], atol=1e-7)
            assert out["alignment"]["u1"]["per_module"][p][mi] == pytest.approx(abs(Ua[:, 0] @ Ub[:, 0]), abs=1e-9)
            assert out["alignment"]["v1"]["per_module"][p][mi] == pytest.approx(abs(Va[:, 0] @ Vb[:, 0]), abs=1e-9)
        for side, table in (("left", left), ("right", right)):
            for which, idx in (("smallest", 0), ("kth", k - 1)):
                vals = np.array([table[p, mi][idx] for mi in range(len(modules))])
                q = out["principal_angles"][side][which]
                assert q["median"][p] == pytest.approx(np.median(vals), abs=1e-7)
                assert q["iqr"][p] == pytest.approx(np.percentile(vals, 75) - np.percentile(vals, 25), abs=1e-7)
    # Orthogonal fraction relative to run 1: vector form and top-k subspace projection form.
    of = out["orthogonal_fraction"]
    assert of["reference"] == "m1"
    for g in range(R):
        vg, vs = vec(g, modules), vec(ref_run, modules)
        us = vs / np.linalg.norm(vs)
        expect = np.linalg.norm(vg - (vg @ us) * us) / np.linalg.norm(vg)
        assert of["vector"]["global"][g] == pytest.approx(expect, abs=1e-7)
        for li, mods in enumerate(groups["per_layer"]):
            vg, vs = vec(g, mods), vec(ref_run, mods)
            us = vs / np.linalg.norm(vs)
            assert of["vector"]["per_layer"][g][li] == pytest.approx(
                np.linalg.norm(vg - (vg @ us) * us) / np.linalg.norm(vg), abs=1e-7)
        proj_sq, total_sq = 0.0, 0.0
        for mi, m in enumerate(modules):
            Us, Vs = svd[(ref_run, m)][0][:, :k], svd[(ref_run, m)][2][:k].T
            P = Us @ Us.T @ D[(g, m)] @ Vs @ Vs.T
            frac = np.linalg.norm(D[(g, m)] - P) / np.linalg.norm(D[(g, m)])
            assert of["subspace"]["per_module"][g][mi] == pytest.approx(frac, abs=1e-7)
            proj_sq += np.linalg.norm(P) ** 2
            total_sq += np.linalg.norm(D[(g, m)]) ** 2
        assert of["subspace"]["global"][g] == pytest.approx(math.sqrt(max(0.0, 1 - proj_sq / total_sq)), abs=1e-7)


def test_identical_and_scaled_copies(tmp_path):
    f = random_factors(2, 4, seed=11)
    scaled = {m: {"A": v["A"], "B": 4.0 * v["B"]} for m, v in f.items()}  # x4 is exact in float32
    dirs = [write_adapter(tmp_path / "a", f, r=4, alpha=8), write_adapter(tmp_path / "same", f, r=4, alpha=8),
            write_adapter(tmp_path / "scaled", scaled, r=4, alpha=8),
            write_adapter(tmp_path / "alpha", f, r=4, alpha=20)]     # same factors, larger scale
    geo = compute_geometry(load_adapters(dirs), k=3, reference=0)
    out = summarize(geo)
    np.testing.assert_allclose(np.array(out["cosine"]["per_module"]), 1.0, atol=1e-12)
    assert np.abs(geo.angles_left.numpy()).max() < 1e-6
    assert np.abs(geo.angles_right.numpy()).max() < 1e-6
    np.testing.assert_allclose(out["orthogonal_fraction"]["vector"]["global"], 0.0, atol=1e-6)
    np.testing.assert_allclose(geo.align_u.numpy(), 1.0, atol=1e-12)
    n = out["norms"]["global"]
    assert n[2] / n[0] == pytest.approx(4.0, rel=1e-12)
    assert n[3] / n[0] == pytest.approx(20 / 8, rel=1e-12)


def test_orthogonal_updates_give_90_degrees(tmp_path):
    """Two updates living in complementary row and column spaces: cosine 0, all angles 90 degrees."""
    g = torch.Generator().manual_seed(5)
    fa, fb = {}, {}
    for kind, (o, n) in SHAPES.items():
        Qo = torch.linalg.qr(torch.randn(o, 6, generator=g, dtype=torch.float64))[0]
        Qi = torch.linalg.qr(torch.randn(n, 6, generator=g, dtype=torch.float64))[0]
        m = f"model.layers.0.self_attn.{kind}"
        core = torch.randn(3, 3, generator=g, dtype=torch.float64)
        fa[m] = {"A": Qi[:, :3].T.contiguous(), "B": Qo[:, :3] @ core}
        fb[m] = {"A": Qi[:, 3:].T.contiguous(), "B": Qo[:, 3:] @ core}
    dirs = [write_adapter(tmp_path / "a", fa, r=3, alpha=3, dtype=torch.float64),
            write_adapter(tmp_path / "b", fb, r=3, alpha=3, dtype=torch.float64)]
    geo = compute_geometry(load_adapters(dirs), k=3, reference=0)
    out = summarize(geo)
    assert abs(out["cosine"]["global"][0][1]) < 1e-12
    np.testing.assert_allclose(geo.angles_left.numpy(), math.pi / 2, atol=1e-10)
    np.testing.assert_allclose(geo.angles_right.numpy(), math.pi / 2, atol=1e-10)
    assert out["orthogonal_fraction"]["vector"]["global"][1] == pytest.approx(1.0, abs=1e-12)
    assert out["orthogonal_fraction"]["subspace"]["global"][1] == pytest.approx(1.0, abs=1e-12)


def test_reads_peft_written_adapters(tmp_path):
    """Adapters saved by PEFT itself (plain and rsLoRA): Delta W equals PEFT's get_delta_weight."""
    peft = pytest.importorskip("peft")
    from helpers import hf_model, tiny_config
    cfg = tiny_config(num_hidden_layers=2)
    deltas = []
    for i, rs in enumerate((False, True)):
        model = hf_model(cfg, seed=0)
        lcfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                               use_rslora=rs, lora_dropout=0.0)
        pm = peft.get_peft_model(model, lcfg)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n or "lora_A" in n:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(i * 1000 + len(n)))
        pm.save_pretrained(str(tmp_path / f"peft{i}"))
        deltas.append({n.removeprefix("base_model.model."): mod.get_delta_weight("default").double()
                       for n, mod in pm.named_modules() if hasattr(mod, "get_delta_weight") and hasattr(mod, "lora_A")})
    aset = load_adapters([tmp_path / "peft0", tmp_path / "peft1"])
    assert aset.scales.tolist() == [3.0, 12 / 2.0]
    assert len(aset.modules) == 8
    for m in aset.modules:
        A, B = aset.factors(m)
        for i in range(2):
            torch.testing.assert_close(aset.scales[i] * B[i] @ A[i], deltas[i][m], rtol=1e-6, atol=1e-7)


# ---- bad input ----------------------------------------------------------------------------------------

def test_bad_inputs_name_the_mismatch(tmp_path):
    f = random_factors(2, 4, seed=1)
    ok = write_adapter(tmp_path / "ok", f, r=4, alpha=8)
    cases = {
        "different bases": write_adapter(tmp_path / "base", f, r=4, alpha=8, base="other-model"),
        "different ranks": write_adapter(tmp_path / "rank", random_factors(2, 3, seed=1), r=3, alpha=8),
        "different target modules": write_adapter(
            tmp_path / "targets", {m: v for m, v in f.items() if "o_proj" not in m}, r=4, alpha=8,
            targets=("q_proj", "k_proj", "v_proj")),
        "cover different modules": write_adapter(
            tmp_path / "layers", {m: v for m, v in f.items() if "layers.1." not in m}, r=4, alpha=8),
        "factor shapes": write_adapter(tmp_path / "shapes", random_factors(
            2, 4, seed=1, shapes={**SHAPES, "q_proj": (28, 20)}), r=4, alpha=8),
    }
    for what, bad in cases.items():
        with pytest.raises(EngineError, match=what):
            load_adapters([ok, bad])
    missing = write_adapter(tmp_path / "missing", f, r=4, alpha=8)
    (missing / "adapter_model.safetensors").unlink()
    with pytest.raises(EngineError, match="adapter_model.safetensors") as e:
        load_adapters([ok, missing])
    assert str(missing) in str(e.value)
    with pytest.raises(EngineError, match="run directory not found"):
        load_adapters([ok, tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="neither a PEFT adapter directory"):
        load_adapters([ok, tmp_path / "empty"])
    # Rank in the config disagreeing with the tensors; a tensor that is no LoRA factor.
    lying = write_adapter(tmp_path / "lying", f, r=4, alpha=8)
    cfg = json.loads((lying / "adapter_config.json").read_text())
    (lying / "adapter_config.json").write_text(json.dumps({**cfg, "r": 5}))
    with pytest.raises(EngineError, match="do not fit rank r=5"):
        load_adapters([lying])
    from safetensors.torch import save_file
    junk = write_adapter(tmp_path / "junk", f, r=4, alpha=8)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)},
              str(junk / "adapter_model.safetensors"))
    with pytest.raises(EngineError, match="not a LoRA factor"):
        load_adapters([junk])
    nan = {m: {"A": v["A"], "B": v["B"].clone()} for m, v in f.items()}
    nan["model.layers.1.self_attn.v_proj"]["B"][0, 0] = float("nan")
    with pytest.raises(EngineError, match="v_proj.lora_B.weight' holds NaN"):
        load_adapters([write_adapter(tmp_path / "nan", nan, r=4, alpha=8)])
    (junk / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(EngineError, match="corrupt"):
        load_adapters([junk])


def test_base_config_checks_shapes(tmp_path):
    from helpers import tiny_config, write_config
    f = random_factors(2, 4, seed=2)
    a = write_adapter(tmp_path / "a", f, r=4, alpha=8)
    good = tiny_config(hidden_size=20, num_attention_heads=4, num_key_value_heads=2, head_dim=6, num_hidden_layers=2)
    write_config(tmp_path / "good", good)
    assert len(load_adapters([a], base=tmp_path / "good").modules) == 8
    assert len(load_adapters([a], base=tmp_path / "good" / "config.json").modules) == 8
    write_config(tmp_path / "wide", {**good, "hidden_size": 32})
    with pytest.raises(EngineError, match="different base"):
        load_adapters([a], base=tmp_path / "wide")
    write_config(tmp_path / "short", {**good, "num_hidden_layers": 1})
    with pytest.raises(EngineError, match="does not exist in the base model"):
        load_adapters([a], base=tmp_path / "short")
    with pytest.raises(EngineError, match="base model not found"):
        load_adapters([a], base=tmp_path / "absent")


def test_run_dirs_and_names(tmp_path):
    f = random_factors(1, 2, seed=3)
    write_adapter(tmp_path / "sft" / "final", f, r=2, alpha=4)       # training output dir
    write_adapter(tmp_path / "grpo" / "final", f, r=2, alpha=4)
    write_adapter(tmp_path / "grpo" / "step-10", f, r=2, alpha=4)
    write_adapter(tmp_path / "dpo" / "step-10", f, r=2, alpha=4)
    assert load_adapters([tmp_path / "sft", tmp_path / "grpo" / "final"]).names == ["sft", "grpo"]
    aset = load_adapters([tmp_path / "grpo" / "step-10", tmp_path / "dpo" / "step-10"])
    assert aset.names == ["grpo/step-10", "dpo/step-10"]
    assert load_adapters([tmp_path / "grpo"], checkpoint="step-10").runs[0].adapter_dir == tmp_path / "grpo" / "step-10"
    with pytest.raises(EngineError, match="given twice"):
        load_adapters([tmp_path / "sft", tmp_path / "sft"])
