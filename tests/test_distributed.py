"""Data-parallel training over torch.distributed, on CPU with gloo and 2 real processes (torchrun):
2 ranks compute the single-process run (all six losses, FSDP2-sharded base), checkpoints resume on
another number of ranks, only rank 0 writes, and the collectives helpers behave.

What is not tested here (no GPU on this machine): NCCL, one GPU per rank, bf16 under FSDP."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from engine.distributed import share_units, shard_indices
from engine.train.train_config import load_config
from engine.train.trainer import train
from helpers import REPO, tiny_model_dir, write_rollouts
from test_faults import one_thread  # the torchrun workers run one thread each; so does the reference

LOSSES = ["sft", "rft", "dft", "rift", "grpo", "dpo"]
STEPS = 4


def torchrun(args, cwd, nproc=2, timeout=240):
    """Launch `args` on `nproc` CPU ranks (gloo) the way a user would: torchrun, a free port."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def max_diff(a, b):
    a, b = adapter(a), adapter(b)
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references for the six losses, then one 2-rank FSDP launch of all six
    (global batch 16 = 4 groups, micro-batches of 4 rows, so each rank accumulates 2 of them)."""
    root = tmp_path_factory.mktemp("dist")
    model = tiny_model_dir(root / "model")
    rollouts = write_rollouts(root / "rollouts.jsonl", n_groups=8)
    config = root / "cfg.toml"
    config.write_text(textwrap.dedent(f"""\
        model = "{model}"
        rollouts = "{rollouts}"
        steps = {STEPS}
        lr = 2e-3
        batch_size = 16
        micro_batch_size = 4
        lora_r = 4
        lora_alpha = 8.0
        warmup_ratio = 0.25
        max_len = 128
        save_every = 2
        [lr_per_loss]
        dpo = 1e-3
        """))
    with one_thread():
        for loss in LOSSES:
            train(load_config(config, loss=loss, out=str(root / "single" / loss)), progress=False)
    launch = torchrun([str(REPO / "cli.py"), "train", "--loss", "all", "--config", str(config),
                       "--out", str(root / "fsdp"), "--fsdp", "--quiet"], cwd=root)
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    return root, config, launch


@pytest.mark.parametrize("loss", LOSSES)
def test_two_fsdp_ranks_equal_one_process(runs, loss):
    root, _, launch = runs
    single, two = root / "single" / loss, root / "fsdp" / loss
    assert max_diff(single / "final", two / "final") <= 1e-6
    # The comparison means something: training moved the adapter far more than the tolerance.
    b = [t for k, t in adapter(single / "final").items() if "lora_B" in k]
    assert max(float(t.abs().max()) for t in b) > 1e-3
    start, *rows, end = metrics(two)
    assert start["world_size"] == 2 and start["fsdp"] is True and end["event"] == "end"
    reference = [r for r in metrics(single) if "step" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for mine, ref in zip(rows, reference):
        # Same global batch, normaliser and schedule; the 4 micro-batches are split over 2 ranks.
        assert (mine["tokens"], mine["normaliser"], mine["lr"]) == (ref["tokens"], ref["normaliser"], ref["lr"])
        if loss == "rft":   # only the correct rows are forwarded: the ranks pack fewer, unevenly
            assert ref["micro_batches"] >= 1 and mine["micro_batches"] >= 1
        else:
            assert mine["micro_batches"] == ref["micro_batches"] >= 4
        assert abs(mine["loss"] - ref["loss"]) <= 1e-5 * max(1.0, abs(ref["loss"]))
    assert launch.stdout.count(f"{loss}: adapter written") == 1  # rank 0 alone reports


def test_only_rank_zero_writes(runs):
    root, _, _ = runs
    for loss in LOSSES:
        names = sorted(p.name for p in (root / "fsdp" / loss).iterdir())
        assert names == [".lock", "final", "metrics.jsonl", "step-2"], names
        lines = (root / "fsdp" / loss / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == STEPS + 2  # one writer: no duplicated rows
    # FSDP computes the reference log-probs sharded and does not cache them; nothing else appeared.
    assert sorted(p.name for p in (root / "fsdp").iterdir()) == sorted(LOSSES)


def test_resume_on_another_number_of_ranks(runs):
    """1 -> 2 ranks (DDP, DPO: reference log-probs broadcast from rank 0) and 2 -> 1 rank (GRPO)."""
    root, config, _ = runs
    one_to_two = root / "one_to_two"
    one_to_two.mkdir()
    shutil.copytree(root / "single" / "dpo" / "step-2", one_to_two / "step-2")
    shutil.copy(root / "single" / "dpo" / "metrics.jsonl", one_to_two / "metrics.jsonl")
    launch = torchrun([str(REPO / "cli.py"), "train", "--loss", "dpo", "--config", str(config),
                       "--out", str(one_to_two), "--resume", "--quiet"], cwd=root)
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    assert max_diff(root / "single" / "dpo" / "final", one_to_two / "final") <= 1e-6
    rows = metrics(one_to_two)
    assert [r["step"] for r in rows if "step" in r] == [1, 2, 3, 4]  # the log reads as one run
    assert [r["world_size"] for r in rows if r.get("event") == "start"] == [1, 2]
    # The cached reference log-probs were written once, by rank 0, beside the output.
    assert len(list(root.glob("ref_logps-*.safetensors"))) == 1

    two_to_one = root / "two_to_one"
    two_to_one.mkdir()
    shutil.copytree(root / "fsdp" / "grpo" / "step-2", two_to_one / "step-2")
    with one_thread():
        final = train(load_config(config, loss="grpo", out=str(two_to_one)), resume=True, progress=False)
    assert max_diff(root / "single" / "grpo" / "final", final) <= 1e-6


WORKER = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
from engine import distributed
from engine.errors import EngineError
from engine.train.optim import AdamW

ctx = distributed.setup()
rank = ctx.rank
out = {"world": ctx.world_size}
out["gathered"] = distributed.gather_json(ctx, {"rank": rank, "text": "x" * (3 * rank)})
out["sums"] = distributed.all_reduce_tensor_(ctx, torch.tensor([rank + 0.5, 2.0])).tolist()
# Gradients of two parameter buckets (float32, float64) are summed over ranks in place.
a = torch.nn.Parameter(torch.zeros(5)); b = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
opt = AdamW([a, b], lr=0.1)
(a * (rank + 1) * torch.arange(5.0)).sum().backward(); (b * (rank + 1)).sum().backward()
distributed.all_reduce_gradients(ctx, opt)
out["grad_a"], out["grad_b"] = a.grad.tolist(), b.grad.flatten().tolist()
def fails():
    raise EngineError("disk full", path="/x/step-2", field="checkpoint")
try:
    distributed.on_main(ctx, fails)
except EngineError as e:
    out["error"] = [type(e).__name__, str(e)]
out["main_result"] = distributed.on_main(ctx, lambda: {"picked": rank})
# A file per rank: two ranks printing to one pipe can interleave their lines.
open(f"result-{rank}.json", "w").write(__import__("json").dumps(out))
distributed.shutdown()
__import__("os")._exit(0)  # as cli.py does after a distributed run (gloo threads vs interpreter teardown)
'''


def test_collective_helpers(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launch = torchrun([str(script), str(REPO)], cwd=tmp_path)
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    results = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in tmp_path.glob("result-*.json")}
    assert sorted(results) == [0, 1]
    for rank, r in results.items():
        assert r["world"] == 2
        assert r["gathered"] == [{"rank": 0, "text": ""}, {"rank": 1, "text": "xxx"}]
        assert r["sums"] == [2.0, 4.0]
        assert r["grad_a"] == [3.0 * i for i in range(5)] and r["grad_b"] == [3.0] * 6
        # Rank 0's failure is raised on every rank with the same message; its result reaches all.
        assert r["error"] == ["EngineError", "/x/step-2: field 'checkpoint': disk full"]
        assert r["main_result"] == {"picked": 0}


def test_share_units_is_a_balanced_partition():
    gen = torch.Generator().manual_seed(7)
    for trial in range(30):
        n_units, world = int(torch.randint(1, 12, (1,), generator=gen)), int(torch.randint(1, 5, (1,), generator=gen))
        sizes = torch.randint(1, 5, (n_units,), generator=gen).tolist()
        units, row = [], 0
        for s in sizes:
            units.append(list(range(row, row + s)))
            row += s
        lengths = torch.randint(3, 40, (row,), generator=gen).tolist()
        shares = share_units(units, lengths, world)
        assert share_units(units, lengths, world) == shares  # every rank computes the same split
        assert len(shares) == world and sorted(u for s in shares for u in s) == list(range(n_units))
        load = [sum(lengths[i] for u in s for i in units[u]) for s in shares]
        biggest = max(sum(lengths[i] for i in u) for u in units)
        assert max(load) - min(load) <= biggest  # greedy longest-first bound
        covered = [i for r in range(world) for i in shard_indices(row, r, world)]
        assert covered == list(range(row))
        assert max(len(shard_indices(row, r, world)) for r in range(world)) - \
            min(len(shard_indices(row, r, world)) for r in range(world)) <= 1


def test_eval_and_rollout_shard_prompts_and_merge_in_order(tmp_path):
    """`cli.py eval` / `cli.py rollout` on 2 ranks write the files 1 process writes, byte for byte
    (10 items: the eval's two chunks and the rollout's ten go to both ranks)."""
    from cli import main
    from click.testing import CliRunner
    from engine import Qwen3Config, Qwen3ForCausalLM, save_model
    from helpers import QWEN3_TOKENIZER, tiny_config
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    save_model(Qwen3ForCausalLM(Qwen3Config.from_dict(tiny_config(
        vocab_size=151936, hidden_size=32, intermediate_size=48, head_dim=8, num_hidden_layers=1,
        max_position_embeddings=256, tie_word_embeddings=True))), model_dir)
    for f in QWEN3_TOKENIZER.iterdir():
        shutil.copy(f, model_dir / f.name)
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps({"question": f"What is {a} plus {a * 3 + 1} apples" + " please" * (a % 4) + "?",
                        "answer": f"Add.\n#### {a * 4 + 1}"}) + "\n" for a in range(10)))

    def commands(out):
        common = ["--model", str(model_dir), "--task", "gsm8k", "--data-dir", str(tmp_path / "data"),
                  "--max-new-tokens", "6"]
        return (["eval", *common, "--batch-size", "1", "--out", str(out / "eval")],
                ["rollout", *common, "--batch-size", "2", "--k", "2", "--seed", "5", "--out", str(out / "r.jsonl")])
    with one_thread():
        for command in commands(tmp_path / "one"):
            result = CliRunner().invoke(main, command, catch_exceptions=False)
            assert result.exit_code == 0, result.output
    evaluate, rollout = commands(tmp_path / "two")
    launches = [torchrun([str(REPO / "cli.py"), *command], cwd=tmp_path) for command in (evaluate, rollout)]
    for launch in launches:  # each command ends its ranks itself (process group left, os._exit)
        assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    assert (two / "eval" / "gsm8k_test.jsonl").read_bytes() == (one / "eval" / "gsm8k_test.jsonl").read_bytes()
    assert len((one / "eval" / "gsm8k_test.jsonl").read_text().splitlines()) == 10
    s1, s2 = (json.loads((d / "eval" / "gsm8k_test_summary.json").read_text()) for d in (one, two))
    assert {k: v for k, v in s1.items() if k != "tokens_per_s"} == {k: v for k, v in s2.items() if k != "tokens_per_s"}
    assert (two / "r.jsonl").read_bytes() == (one / "r.jsonl").read_bytes()
    assert len((one / "r.jsonl").read_text().splitlines()) == 20
    assert launches[0].stdout.count("gsm8k/test: accuracy") == 1  # rank 0 alone reports
