"""McNemar against scipy.stats.binomtest, eval-file pairing, and CKA against independent forms."""
from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import scipy.stats
import torch

import analysis
from analysis.cka import MinibatchCKA, gram, pairwise_unbiased_hsic
from analysis.stats import evaluation, read_items
from engine.errors import EngineError




# ---- McNemar ------------------------------------------------------------------------------------------

def _paired(b: int, c: int, both: int, neither: int, seed: int) -> tuple[list[bool], list[bool]]:
    rows = [(True, False)] * b + [(False, True)] * c + [(True, True)] * both + [(False, False)] * neither
    random.Random(seed).shuffle(rows)
    return [r[0] for r in rows], [r[1] for r in rows]


@pytest.mark.parametrize("b,c", [(0, 0), (3, 3), (1, 0), (0, 7), (5, 17), (40, 61), (600, 540), (12, 1)])
def test_mcnemar_matches_binomtest(b, c):
    ca, cb = _paired(b, c, both=25, neither=9, seed=b * 100 + c)
    res = analysis.mcnemar(ca, cb)
    assert (res["b"], res["c"], res["n"]) == (b, c, b + c + 34)
    if b + c == 0:
        assert res["p_exact"] == 1.0 and res["p_mid"] == 1.0
        return
    ref = scipy.stats.binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
    assert res["p_exact"] == pytest.approx(min(1.0, ref), rel=1e-9)
    # Mid-p: the exact p less the point probability of the observed count.
    pmf = scipy.stats.binom.pmf(min(b, c), b + c, 0.5)
    assert res["p_mid"] == pytest.approx(res["p_exact"] - pmf, rel=1e-9, abs=1e-300)
    assert 0 <= res["p_mid"] <= res["p_exact"] <= 1
    swapped = analysis.mcnemar(cb, ca)
    assert (swapped["b"], swapped["c"]) == (c, b) and swapped["p_exact"] == res["p_exact"]


def test_mcnemar_refuses_unpaired():
    with pytest.raises(EngineError, match="paired"):
        analysis.mcnemar([True, False], [True])


def _write_eval(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_evaluation_from_eval_dirs(tmp_path):
    ids = [f"gsm8k-test-{i}" for i in range(40)]
    rng = random.Random(0)
    truth = {name: {i: rng.random() < p for i in ids} for name, p in (("sft", 0.6), ("dpo", 0.9), ("rft", 0.5))}
    for name, items in truth.items():
        order = list(ids)
        rng.shuffle(order)                                        # pairing is by id, not by line
        _write_eval(tmp_path / "ev" / name / "gsm8k_test.jsonl",
                    [{"id": i, "completion": "...", "correct": items[i]} for i in order])
        (tmp_path / "ev" / name / "gsm8k_test_summary.json").write_text("{}")
    res = evaluation(tmp_path / "ev", ["sft", "dpo", "rft"])["gsm8k_test"]
    for name, items in truth.items():
        acc = res["accuracy"][name]
        k = sum(items.values())
        assert (acc["n"], acc["correct"]) == (40, k)
        ci = scipy.stats.binomtest(k, 40).proportion_ci(0.95, method="wilson")
        assert acc["ci95"] == pytest.approx([ci.low, ci.high], rel=1e-9)
    pair = next(m for m in res["mcnemar"] if (m["run_a"], m["run_b"]) == ("sft", "dpo"))
    expect = analysis.mcnemar([truth["sft"][i] for i in ids], [truth["dpo"][i] for i in ids])
    assert pair["p_exact"] == expect["p_exact"] and pair["b"] == expect["b"]
    assert len(res["mcnemar"]) == 3


def test_evaluation_refuses_different_items(tmp_path):
    _write_eval(tmp_path / "ev" / "a" / "gsm8k_test.jsonl", [{"id": "x1", "correct": True}, {"id": "x2", "correct": False}])
    _write_eval(tmp_path / "ev" / "b" / "gsm8k_test.jsonl", [{"id": "x1", "correct": True}, {"id": "x3", "correct": True}])
    with pytest.raises(EngineError, match="same items.*x2.*x3"):
        evaluation(tmp_path / "ev", ["a", "b"])
    _write_eval(tmp_path / "ev" / "c" / "aime2026_test.jsonl", [{"id": "x1", "correct": True}])
    with pytest.raises(EngineError, match="different tasks"):
        evaluation(tmp_path / "ev", ["a", "c"])
    with pytest.raises(EngineError, match="no eval results for run 'zz'"):
        evaluation(tmp_path / "ev", ["a", "zz"])


def test_read_items_errors(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text('{"id": "1", "correct": true}\n{"id": "2", "correct": "yes"}\n')
    with pytest.raises(EngineError, match="e.jsonl:2: field 'correct'"):
        read_items(p)
    p.write_text('{"id": "1", "correct": true}\n{"id": "1", "correct": false}\n')
    with pytest.raises(EngineError, match="duplicate"):
        read_items(p)
    p.write_text('{"id": "1", "correct": true}\nnot json\n')
    with pytest.raises(EngineError, match=":2: not valid JSON"):
        read_items(p)
    p.write_text('{"id": "1", "correct": true}\n{"summary": true, "accuracy": 1.0}\n')
    assert read_items(p) == {"1": True}


# ---- CKA ----------------------------------------------------------------------------------------------

def _hsic_centering(K: np.ndarray, L: np.ndarray) -> float:
    n = len(K)
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def test_linear_cka_matches_kernel_form_and_invariances():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 13, 9, generator=g, dtype=torch.float64)          # batch of 3 layers, n=13, d=9
    Y = X @ torch.randn(9, 5, generator=g, dtype=torch.float64) + 0.5 * torch.randn(3, 13, 5, generator=g, dtype=torch.float64)
    got = analysis.linear_cka(X, Y)
    assert got.shape == (3,)
    for i in range(3):
        K, L = X[i].numpy() @ X[i].numpy().T, Y[i].numpy() @ Y[i].numpy().T
        ref = _hsic_centering(K, L) / np.sqrt(_hsic_centering(K, K) * _hsic_centering(L, L))
        assert got[i].item() == pytest.approx(ref, rel=1e-10)
        # The protocol's feature-space form on column-centred features.
        Xc, Yc = X[i].numpy() - X[i].numpy().mean(0), Y[i].numpy() - Y[i].numpy().mean(0)
        feat = np.linalg.norm(Yc.T @ Xc) ** 2 / (np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc))
        assert got[i].item() == pytest.approx(feat, rel=1e-10)
    Q = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))[0]
    assert torch.allclose(analysis.linear_cka(X, 3.7 * X @ Q + 2.0), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(analysis.linear_cka(X, X), torch.ones(3, dtype=torch.float64), atol=1e-12)
    torch.testing.assert_close(analysis.linear_cka(0.1 * X @ Q, Y), got, rtol=1e-10, atol=0)


def _hsic_u_statistic(K: np.ndarray, L: np.ndarray) -> float:
    """Unbiased HSIC as the U-statistic over ordered 4-tuples of distinct indices (brute force)."""
    n = len(K)
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
        count += 1
    return total / count


def test_unbiased_hsic_equals_u_statistic():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(7, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(7, 3, generator=g, dtype=torch.float64) + X[:, :3]
    K, L = gram(X, False), gram(Y, False)
    h = pairwise_unbiased_hsic(torch.stack([K, L]))
    assert h[0, 1].item() == pytest.approx(_hsic_u_statistic(K.numpy(), L.numpy()), rel=1e-10)
    assert h[0, 0].item() == pytest.approx(_hsic_u_statistic(K.numpy(), K.numpy()), rel=1e-10)
    with pytest.raises(ValueError, match="at least 4"):
        pairwise_unbiased_hsic(torch.stack([K[:3, :3], L[:3, :3]]))


def test_minibatch_cka():
    g = torch.Generator().manual_seed(2)
    Xs = [torch.randn(2, n, 6, generator=g, dtype=torch.float64) for n in (9, 14, 5)]   # 2 layers
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    Ys = [x @ torch.randn(6, 4, generator=g, dtype=torch.float64) + torch.randn(2, x.shape[1], 4, generator=g, dtype=torch.float64)
          for x in Xs]
    got = analysis.minibatch_cka(Xs, Ys)
    assert got.shape == (2,)
    for layer in range(2):
        num = sum(_hsic_u_statistic(gram(x[layer], False).numpy(), gram(y[layer], False).numpy()) for x, y in zip(Xs, Ys))
        kk = sum(_hsic_u_statistic(gram(x[layer], False).numpy(), gram(x[layer], False).numpy()) for x in Xs)
        ll = sum(_hsic_u_statistic(gram(y[layer], False).numpy(), gram(y[layer], False).numpy()) for y in Ys)
        assert got[layer].item() == pytest.approx(num / np.sqrt(kk * ll), rel=1e-9)
    torch.testing.assert_close(analysis.minibatch_cka(Xs, [0.2 * x @ Q for x in Xs]),
                               torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    acc = MinibatchCKA()
    for x, y in zip(Xs, Ys):
        acc.update_grams(torch.stack([gram(x, False), gram(y, False), gram(5 * x @ Q, False)]))  # three runs
    pair = acc.compute()
    torch.testing.assert_close(pair[0, 1], got, rtol=1e-12, atol=0)
    torch.testing.assert_close(pair[0, 2], torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    by_features = MinibatchCKA()
    for x in Xs:
        by_features.update(torch.stack([x, -3 * x @ Q]))
    torch.testing.assert_close(by_features.compute()[0, 1], torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
