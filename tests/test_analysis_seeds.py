"""The summary over seeds: spread of every cross-loss number and, beside it, the same-loss noise floor,
checked against float64 cosines of the dense updates."""
from __future__ import annotations

import json

import pytest
import torch

import analysis
from analysis.seeds import write_seed_summary
from helpers import delta, random_factors, write_adapter


def _dense_cosine(fa: dict, fb: dict, scale: float) -> float:
    va = torch.cat([delta(fa[m], scale).reshape(-1) for m in sorted(fa)])
    vb = torch.cat([delta(fb[m], scale).reshape(-1) for m in sorted(fb)])
    return float(va @ vb / (va.norm() * vb.norm()))


def test_seed_summary_with_same_loss_floor(tmp_path):
    r, layers = 4, 2
    # Loss "x" learns nearly the same update whatever the seed; loss "y" is seed noise.
    x_core = random_factors(layers, r, seed=1)
    factors = {}
    for s in (42, 43, 44):
        noise = random_factors(layers, r, seed=100 + s)
        factors[s] = {"x": {m: {"A": f["A"] + 0.05 * noise[m]["A"], "B": f["B"]} for m, f in x_core.items()},
                      "y": random_factors(layers, r, seed=200 + s)}
    reports = []
    for s, runs in factors.items():
        dirs = [write_adapter(tmp_path / f"seed-{s}" / name, f, r=r, alpha=8) for name, f in runs.items()]
        analysis.run_analysis(dirs, reference="x", out=tmp_path / f"report-{s}", plots=False, echo=lambda m: None)
        reports.append(tmp_path / f"report-{s}")
    summary = write_seed_summary(reports, tmp_path / "report")
    floor = summary["same_loss_floor"]
    seeds = list(factors)
    for name in ("x", "y"):
        want = [_dense_cosine(factors[a][name], factors[b][name], 2.0) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
        assert floor[name]["cosine"] == pytest.approx(want, abs=1e-12)
    assert min(floor["x"]["cosine"]) > 0.9 and max(abs(c) for c in floor["y"]["cosine"]) < 0.5
    assert floor["x"]["smallest_angle_median_deg"]["left"][0] < floor["y"]["smallest_angle_median_deg"]["left"][0]
    on_disk = json.loads((tmp_path / "report" / "seeds.json").read_text())
    assert on_disk["same_loss_floor"] == floor and on_disk["random_smallest_angle_deg"] > 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "floor: cosine a, b across seeds" in report and "| x - y |" in report
