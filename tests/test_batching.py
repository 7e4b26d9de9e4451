"""DPO pairs, step plans and length-bucketed micro-batches (engine.train.batching)."""
from engine.train.batching import build_pairs, groups_of, plan_steps, split_micro_batches
from engine.train.rollouts import read_rollouts, tokenize_rollouts
from helpers import write_rollouts


def test_pairs_and_plans(tok, tmp_path):
    rollouts, _ = read_rollouts(write_rollouts(tmp_path / "r.jsonl", n_groups=9))
    examples = tokenize_rollouts(rollouts, tok, max_len=256)
    pairs = build_pairs(examples, seed=3)
    mixed = [g for g in groups_of(examples) if len({examples[i].reward for i in g}) == 2]
    assert len(pairs) == len(mixed)
    for w, l in pairs:
        assert examples[w].reward == 1 and examples[l].reward == 0 and examples[w].group == examples[l].group
    assert build_pairs(examples, seed=3) == pairs
    all_pairs = build_pairs(examples, seed=3, mode="all")
    assert len(all_pairs) == sum(sum(examples[i].reward == 1 for i in g) * sum(examples[i].reward == 0 for i in g)
                                 for g in mixed)
    groups = groups_of(examples)
    plan = plan_steps(groups, [len(g) for g in groups], batch_size=8, steps=7, seed=1)
    assert len(plan) == 7 and all(sum(len(groups[u]) for u in step) == 8 for step in plan)
    # One epoch visits every group once before any repeats.
    first_epoch = [u for step in plan[:4] for u in step]
    assert len(set(first_epoch)) == len(first_epoch) == 8
    lengths = [len(e.ids) for e in examples]
    for pass_cost in (0, 32, 10 ** 9):
        micro = split_micro_batches([groups[u] for u in plan[0]], lengths, max_rows=4, pass_cost=pass_cost)
        assert sorted(i for m in micro for i in m) == sorted(i for u in plan[0] for i in groups[u])
        assert all(len(m) <= 4 for m in micro)
        assert all(any(set(groups[u]) <= set(m) for m in micro) for u in plan[0])  # groups stay whole
