"""Controls for the principal angles: random-subspace floors against closed forms, and the angle of each
run's right subspace to its regenerated initial A against the engine's own initialisation."""
from __future__ import annotations

import json
import math

import pytest
import torch

from analysis.adapters import load_adapters
from analysis.floors import init_alignment, principal_angle_floors, random_angle_floor, run_seed
from engine import Qwen3Config, Qwen3ForCausalLM
from engine.model.lora import LoRAConfig, apply_lora, initial_lora_a, lora_modules
from helpers import tiny_config
from helpers import SHAPES, random_factors, write_adapter


def test_random_line_angles_match_their_closed_forms():
    """Two random lines: in R^2 the angle is uniform on [0, 90] (median 45); in R^3 |cos| is uniform on
    [0, 1], so the median angle is arccos(1/2) = 60; in high dimension it concentrates near 90."""
    assert random_angle_floor([2] * 301, 1, trials=200, seed=1)["smallest"] == pytest.approx(45.0, abs=1.0)
    assert random_angle_floor([3] * 301, 1, trials=200, seed=2)["smallest"] == pytest.approx(60.0, abs=1.0)
    assert random_angle_floor([4096] * 9, 1, trials=20, seed=3)["smallest"] > 85.0


def test_random_floor_orders_and_mixed_dimensions():
    f = random_angle_floor([64] * 40 + [192] * 40, 3, trials=32, seed=0)
    assert 0.0 < f["smallest"] < f["kth"] <= 90.0
    # A k-dim subspace inside an r-dim one of a small space: the angles can only be smaller than k vs k.
    assert random_angle_floor([24] * 50, 3, other_k=8, trials=32)["kth"] < random_angle_floor([24] * 50, 3, trials=32)["kth"]
    # Deterministic for a seed; the bigger dimension puts random subspaces further apart.
    assert random_angle_floor([12] * 30, 2, trials=8, seed=5) == random_angle_floor([12] * 30, 2, trials=8, seed=5)
    assert random_angle_floor([200] * 30, 2, trials=16)["smallest"] > random_angle_floor([20] * 30, 2, trials=16)["smallest"]
    with pytest.raises(ValueError, match="do not fit"):
        random_angle_floor([2], 3)


def test_floors_follow_each_side_of_the_module_shapes(tmp_path):
    dirs = [write_adapter(tmp_path / f"r{i}", random_factors(2, 4, seed=i), r=4, alpha=8) for i in range(2)]
    aset = load_adapters(dirs)
    floors = principal_angle_floors(aset, 2, trials=16)
    outs = [SHAPES[m.rpartition(".")[2]][0] for m in aset.modules]
    ins = [SHAPES[m.rpartition(".")[2]][1] for m in aset.modules]
    assert floors["left"] == random_angle_floor(outs, 2, trials=16, seed=0)
    assert floors["right"] == random_angle_floor(ins, 2, trials=16, seed=1)


def test_initial_a_is_what_apply_lora_draws():
    model = Qwen3ForCausalLM(Qwen3Config.from_dict(tiny_config(num_hidden_layers=3)))
    apply_lora(model, LoRAConfig(r=5, alpha=10), seed=123)
    mods = list(lora_modules(model).values())
    again = initial_lora_a([m.in_features for m in mods], 5, 123)
    assert all(torch.equal(m.lora_A.detach(), a) for m, a in zip(mods, again))
    assert not torch.equal(initial_lora_a([20], 5, 124)[0], initial_lora_a([20], 5, 123)[0])


def _run(path, factors, seed, r):
    write_adapter(path, factors, r=r, alpha=2 * r)
    if seed is not None:
        (path / "trainer_state.json").write_text(json.dumps({"step": 3, "config": {"seed": seed}}))
    return path


def test_init_alignment_planted(tmp_path):
    """A run whose A is still its initial A has its right subspace inside that A's row space (angles 0);
    a run whose A was redrawn sits at chance; one without a seed file is None."""
    r, layers = 6, 2
    modules = list(random_factors(layers, r, 0))
    ins = [SHAPES[m.rpartition(".")[2]][1] for m in modules]
    a0 = dict(zip(modules, initial_lora_a(ins, r, 42)))
    g = torch.Generator().manual_seed(9)
    kept = {m: {"A": a0[m], "B": torch.randn(SHAPES[m.rpartition(".")[2]][0], r, generator=g)} for m in modules}
    moved = random_factors(layers, r, seed=77)
    dirs = [_run(tmp_path / "kept", kept, 42, r), _run(tmp_path / "moved", moved, 42, r),
            _run(tmp_path / "foreign", moved, None, r)]
    out = init_alignment(load_adapters(dirs), k=2, trials=32)
    kept_run, moved_run, foreign = out["runs"]
    assert out["k"] == 2 and out["r"] == r and foreign is None
    assert kept_run["seed"] == 42 and kept_run["kth"]["median"] < 1e-5
    assert moved_run["smallest"]["median"] > 5.0
    assert moved_run["kth"]["median"] == pytest.approx(out["random"]["kth"], abs=15.0)


def test_run_seed_reads_only_a_well_formed_state(tmp_path):
    assert run_seed(None) is None and run_seed(tmp_path) is None
    for text, want in (('{"config": {"seed": 7}}', 7), ('{"config": {"seed": true}}', None), ("{", None),
                       ('{"config": []}', None), ('[]', None)):
        (tmp_path / "trainer_state.json").write_text(text)
        assert run_seed(tmp_path) == want, text
