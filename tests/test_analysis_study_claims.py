"""The study's verdict table on planted per-seed numbers with known answers: each rule holds, fails or
stays inconclusive exactly where mean ± std over seeds sits against its band."""
from __future__ import annotations

import pytest

from analysis.study_claims import study_rows

RUNS = ["sft", "rft", "dft", "rift", "grpo", "dpo", "dpo_lr_matched"]


def _metrics(cos: dict, ortho: float = 0.7, ortho_late: float = 0.8, barrier: dict | None = None,
             acc: dict | None = None, cka_late: dict | None = None, layers: int = 8) -> dict:
    n = len(RUNS)
    C = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    for (a, b), v in cos.items():
        i, j = RUNS.index(a), RUNS.index(b)
        C[i][j] = C[j][i] = v
    per_layer = [[ortho] * (layers - layers // 4) + [ortho_late] * (layers // 4) for _ in RUNS]
    globals_ = [ortho * (layers - layers // 4) / layers + ortho_late * (layers // 4) / layers] * n
    barrier = barrier or {}
    cka_late = cka_late or {}
    pairs = [[a, b] for i, a in enumerate(RUNS) for b in RUNS[i + 1:]]
    return {"runs": [{"name": r} for r in RUNS], "pairs": pairs,
            "geometry": {"cosine": {"global": C},
                         "orthogonal_fraction": {"vector": {"global": globals_, "per_layer": per_layer}}},
            "function_space": {"lmc": [{"a": r, "b": "sft", "barrier": barrier.get(r, 0.0)} for r in RUNS[1:]],
                               "cka": {"layers": list(range(layers)), "pairs": pairs,
                                       "per_layer": [[cka_late.get(tuple(p), 0.9)] * layers for p in pairs]}},
            "evaluation": {"synthetic_test": {"accuracy": {r: {"accuracy": (acc or {}).get(r, 0.5)} for r in RUNS}}}}


def _verdicts(metrics):
    floor = {r: {"cosine": [0.05]} for r in RUNS}
    return {row["claim"].split(")")[0] + ")": row["verdict"] for row in study_rows(metrics, floor)}


def test_colinear_held_failed_and_inconclusive():
    held = _verdicts([_metrics({("sft", "rft"): 0.95, ("sft", "rift"): 0.97}),
                      _metrics({("sft", "rft"): 0.96, ("sft", "rift"): 0.98})])
    failed = _verdicts([_metrics({("sft", "rft"): 0.5, ("sft", "rift"): 0.97}),
                        _metrics({("sft", "rft"): 0.6, ("sft", "rift"): 0.98})])
    straddle = _verdicts([_metrics({("sft", "rft"): 0.85, ("sft", "rift"): 0.97}),
                          _metrics({("sft", "rft"): 0.97, ("sft", "rift"): 0.98})])
    one_seed = _verdicts([_metrics({("sft", "rft"): 0.99, ("sft", "rift"): 0.99})])
    assert (held["(i)"], failed["(i)"], straddle["(i)"], one_seed["(i)"]) == ("held", "not held", "inconclusive",
                                                                             "inconclusive")


def test_dft_grpo_dpo_and_the_open_question():
    cos = {("sft", "rft"): 0.9, ("sft", "rift"): 0.9, ("sft", "dft"): 0.5, ("dpo", "sft"): 0.05,
           ("dpo", "grpo"): 0.1, ("dpo_lr_matched", "sft"): 0.6}
    seeds = [_metrics(cos, barrier={"dpo": 0.3, "grpo": 0.01}, acc={"dpo": 0.7},
                      cka_late={("dpo", "grpo"): 0.4, ("sft", "rift"): 0.95}),
             _metrics({**cos, ("sft", "dft"): 0.55}, barrier={"dpo": 0.25, "grpo": 0.02}, acc={"dpo": 0.65},
                      cka_late={("dpo", "grpo"): 0.5, ("sft", "rift"): 0.97})]
    v = _verdicts(seeds)
    assert v["(ii)"] == "held" and v["(iii)"] == "held" and v["(iv)"] == "held" and v["(v)"] == "held"
    assert v["(vi, open)"] == "not held"           # at the shared rate DPO is no longer orthogonal to SFT
    # GRPO in another basin (a barrier), or fully orthogonal: (iii) fails.
    assert _verdicts([_metrics(cos, barrier={"grpo": 0.5}), _metrics(cos, barrier={"grpo": 0.6})])["(iii)"] == "not held"
    assert _verdicts([_metrics(cos, ortho=0.99, ortho_late=0.99)] * 2)["(iii)"] == "not held"
    # DPO no better than the best other loss: (v) fails.
    assert _verdicts([_metrics(cos, acc={"dpo": 0.4}), _metrics(cos, acc={"dpo": 0.45})])["(v)"] == "not held"


def test_rows_carry_their_numbers_and_bands():
    rows = study_rows([_metrics({("sft", "rft"): 0.95}), _metrics({("sft", "rft"): 0.93})],
                      {r: {"cosine": [0.05, 0.07]} for r in RUNS})
    first = rows[0]
    assert first["parts"][0]["stat"]["mean"] == pytest.approx(0.94)
    assert first["parts"][0]["stat"]["std"] == pytest.approx(0.0141421356, rel=1e-6)
    assert "cos sft-rft in [0.9, 1]" in first["bands"] and "sft 0.060 ± 0.014" in first["noise_floor"]
