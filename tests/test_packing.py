"""Cutting length-sorted rows into passes (engine.packing.cheapest_runs) against brute force."""
import pytest

from engine.packing import cheapest_runs


def test_cheapest_runs_against_every_split():
    """Against all 2^(n-1) ways to cut a few items (sorted widest first) into runs: the least cost with
    at most max_rows rows per run (a single larger item runs alone), and the fewest runs among equals."""
    import itertools
    import random
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 8)
        widths = sorted((rng.randint(1, 60) for _ in range(n)), reverse=True)
        rows = [rng.choice([1, 1, 2, 4]) for _ in range(n)]
        pass_cost, max_rows = rng.choice([0, 1, 7, 32, 1000]), rng.choice([None, 1, 4, 6])
        runs = cheapest_runs(widths, rows, pass_cost, max_rows)
        assert runs[0][0] == 0 and runs[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(runs, runs[1:])) and all(lo < hi for lo, hi in runs)

        def allowed(split):
            return max_rows is None or all(hi - lo == 1 or sum(rows[lo:hi]) <= max_rows for lo, hi in split)

        def cost(split):
            return sum(sum(rows[lo:hi]) * widths[lo] + pass_cost for lo, hi in split)
        splits = [list(zip((0, *cuts), (*cuts, n))) for r in range(n)
                  for cuts in itertools.combinations(range(1, n), r)]
        best = min((cost(s), len(s)) for s in splits if allowed(s))
        assert allowed(runs) and (cost(runs), len(runs)) == best
    with pytest.raises(ValueError, match="widest first"):
        cheapest_runs([3, 5], [1, 1], 0)
