"""Command line: thin wrappers over engine/, losses/, analysis/ and triton_kernels/.

Every input problem surfaces as one line `error: <file>:<line>: field '<f>': <what>` and exit code 2.
"""
from __future__ import annotations

import os
import sys

import click

from engine.errors import EngineError, TrainingDiverged


class EngineGroup(click.Group):
    """Turns EngineError (bad user input) into one clear message and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EngineError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except TrainingDiverged as e:
            click.echo(f"stopped: {e}; the last good checkpoint is kept", err=True)
            sys.exit(1)
        except OSError as e:  # the environment (full disk, read-only or missing path): one line, like bad input
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            sys.exit(2)


@click.group(cls=EngineGroup)
def main() -> None:
    """LoRA post-training engine: train, rollout, eval, analyze, profile."""


PRESETS = ("cpu", "paper")


@main.command()
@click.option("--loss", required=True, help="sft, rft, dft, rift, grpo, dpo, or 'all' (the six in turn).")
@click.option("--preset", type=click.Choice(PRESETS), default=None,
              help="configs/<preset>.toml; default cpu (the embedded model) unless --config is given.")
@click.option("--config", "config_path", type=click.Path(), default=None, help="A TOML config file.")
@click.option("--model", default=None, help="Model directory or hub id.")
@click.option("--rollouts", default=None, type=click.Path(), help="Rollouts JSONL.")
@click.option("--out", default=None, type=click.Path(), help="Output directory (default runs/<loss>).")
@click.option("--steps", type=int, default=None)
@click.option("--lr", type=float, default=None, help="Peak learning rate (overrides per-loss rates too).")
@click.option("--seed", type=int, default=None)
@click.option("--batch-size", type=int, default=None, help="Rollouts per optimizer step (DPO: pairs).")
@click.option("--micro-batch-size", type=int, default=None,
              help="Most rows per forward/backward (a step is also cut by length where padding costs more).")
@click.option("--save-every", type=int, default=None)
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in --out.")
@click.option("--allow-change", "allow_changes", multiple=True,
              help="With --resume: a setting (or rollouts_content) that may differ from the checkpoint's.")
@click.option("--on-bad", type=click.Choice(["fail", "skip"]), default=None, help="Bad rollout lines.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None)
@click.option("--full-finetune", is_flag=True, default=None, help="Train every weight (no LoRA).")
@click.option("--device", default=None)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None)
@click.option("--fsdp/--no-fsdp", default=None,
              help="Under torchrun: shard the frozen base weights across ranks (FSDP2); LoRA stays replicated.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(loss, preset, config_path, resume, quiet, **flags) -> None:
    """Train a LoRA adapter with one of the six offline losses.

    Multi-GPU / multi-process: `torchrun --nproc-per-node N cli.py train ...` (data parallel; same
    global batch and schedule as one process; rank 0 writes the files)."""
    import losses as loss_registry
    from engine import distributed
    from engine.train.train_config import REPO_ROOT, load_config
    from engine.train.trainer import train as run_training

    if config_path is None:
        config_path = REPO_ROOT / "configs" / f"{preset or 'cpu'}.toml"
        if preset is None and flags.get("model") is not None and int(os.environ.get("RANK", "0")) == 0:
            # The cpu preset's rate, rank and steps suit the tiny embedded model, not a real Qwen3.
            click.echo("note: without --preset or --config, training uses configs/cpu.toml (tuned for the tiny "
                       "embedded model); for a Qwen3 checkpoint pass --preset paper or --config FILE", err=True)
    names = list(loss_registry.names()) if loss == "all" else [loss]
    if loss != "all" and loss not in loss_registry.names():
        raise EngineError(f"unknown loss {loss!r}; choose from {', '.join(loss_registry.names())} or all",
                          field="--loss")
    lr = flags.pop("lr")
    out = flags.pop("out")
    flags["allow_changes"] = list(flags["allow_changes"]) or None
    try:
        for name in names:
            cfg = load_config(config_path, loss=name, **flags)
            if lr is not None:
                cfg.lr, cfg.lr_per_loss = lr, {}
            if out is not None:
                cfg.out = str(out) if loss != "all" else f"{out}/{name}"
            elif cfg.out == "runs/default" or loss == "all":
                cfg.out = f"runs/{name}" if loss != "all" else f"runs/all/{name}"
            final = run_training(cfg, resume=resume, progress=not quiet)
            if distributed.setup(cfg.device).is_main:
                click.echo(f"{name}: adapter written to {final}")
    finally:
        distributed.shutdown()
    _exit_if_distributed()


def _exit_if_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every file is written and the process group is gone, but torch's gloo worker threads can
        # outlive it and abort the interpreter's teardown (SIGABRT, ~1 run in 10): end here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _generation_options(f):
    """Flags shared by `rollout` and `eval`."""
    for option in reversed([
        click.option("--model", required=True, help="Model directory or hub id."),
        click.option("--adapter", default=None, type=click.Path(), help="PEFT LoRA adapter directory."),
        click.option("--task", required=True, help="gsm8k, aime2026, aime, math500, ..."),
        click.option("--limit", type=int, default=None, help="Only the first N items."),
        click.option("--data-dir", default=None, type=click.Path(), help="Task data (default: the repository's data/ folder, or $ENGINE_DATA_DIR)."),
        click.option("--max-new-tokens", type=int, default=1024, show_default=True),
        click.option("--batch-size", type=int, default=32, show_default=True, help="Sequences per batch."),
        click.option("--thinking", type=click.Choice(["auto", "off"]), default="auto", show_default=True,
                     help="off: append the empty think block (hybrid-thinking Qwen3 without thinking)."),
        click.option("--style", default=None, help="Answer format asked for: boxed, gsm8k, plain (default: the "
                     "task's: plain for synthetic, boxed otherwise)."),
        click.option("--tokenizer", default=None, help="Tokenizer directory (default: the model's)."),
        click.option("--device", default=None, help="cpu, cuda, ... (default: cuda when available)."),
        click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's)."),
    ]):
        f = option(f)
    return f


@main.command()
@_generation_options
@click.option("--split", default="train", show_default=True)
@click.option("--k", type=int, default=4, show_default=True, help="Completions per prompt.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="Rollouts JSONL (appended; resumes).")
def rollout(max_new_tokens, temperature, top_p, top_k, **flags) -> None:
    """Sample K graded completions per prompt into a rollouts JSONL (the trainer's input)."""
    from engine import distributed
    from engine.generate.rollout import run_rollout
    from engine.generate.sampler import SamplingParams
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    try:
        run_rollout(params=params, echo=click.echo, **flags)
    finally:
        distributed.shutdown()
    _exit_if_distributed()


@main.command("eval")
@_generation_options
@click.option("--split", default="test", show_default=True)
@click.option("--out", default=None, type=click.Path(), help="Directory for <task>_<split>.jsonl + summary.")
def eval_command(**flags) -> None:
    """Greedy pass@1 with a 95% Wilson interval; per-item results for McNemar."""
    from engine import distributed
    from engine.generate.rollout import run_eval
    try:
        run_eval(echo=click.echo, **flags)
    finally:
        distributed.shutdown()
    _exit_if_distributed()


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--base", default=None, help="Base model dir (weights enable LMC and CKA; a config.json alone "
              "is enough for geometry).")
@click.option("--reference", default="sft", show_default=True, help="Run the orthogonal fraction is taken against.")
@click.option("--eval-dir", default=None, type=click.Path(), help="EVAL_DIR/<run>/<task>_<split>.jsonl for McNemar.")
@click.option("--out", default="reports/analysis", show_default=True, type=click.Path())
@click.option("--checkpoint", default="final", show_default=True, help="Which checkpoint of each run (e.g. step-1000).")
@click.option("--k", type=int, default=None,
              help="Top-k singular subspaces for principal angles, below the rank (default: the study's k/r = 10/32).")
@click.option("--function-space/--no-function-space", default=None,
              help="LMC and CKA (default: when --base has weights).")
@click.option("--task", default="gsm8k", show_default=True, help="Items for LMC and CKA.")
@click.option("--split", default="test", show_default=True)
@click.option("--style", default=None, help="Answer format for the LMC loss (default: the task's).")
@click.option("--n-items", type=int, default=100, show_default=True)
@click.option("--lmc-points", type=int, default=11, show_default=True)
@click.option("--lmc-pairs", type=click.Choice(["reference", "all"]), default="reference", show_default=True)
@click.option("--path-accuracy/--no-path-accuracy", default=True, show_default=True,
              help="Greedy accuracy at alpha = 0, 1/2, 1 of every LMC path (generates on the LMC items).")
@click.option("--max-new-tokens", type=int, default=1024, show_default=True, help="Per answer, for path accuracy.")
@click.option("--cka-mode", type=click.Choice(["mean", "tokens"]), default="mean", show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--device", default=None)
@click.option("--data-dir", default=None, type=click.Path())
# Base alignment (analysis/base_alignment*.py); defaults as analysis.base_alignment_summary.DEFAULTS, written
# out here so that the CLI does not import torch before a command runs.
@click.option("--base-alignment/--no-base-alignment", "ba_enabled", default=None,
              help="Principal overlap, rotation, spectrum drift, intruders against the base weights "
              "(default: when --base has weights).")
@click.option("--principal-k", "ba_k", type=int, default=16, show_default=True,
              help="Top-k base singular subspaces (also computed at k = r); capped below min(out, in).")
@click.option("--intruder-top", "ba_top", type=int, default=10, show_default=True,
              help="Top-K singular vectors of W0 + Delta W checked for intruders.")
@click.option("--intruder-epsilon", "ba_epsilon", type=float, default=0.5, show_default=True,
              help="Cosine threshold: max |cos| with every base singular vector below it = intruder.")
def analyze(run_dirs, **flags) -> None:
    """Compare the weight updates of several runs (geometry, LMC, CKA, base alignment) and their
    accuracies (McNemar)."""
    from analysis import run_analysis
    flags["base_alignment"] = {key[3:]: flags.pop(key) for key in list(flags) if key.startswith("ba_")}
    alphas = (0.0, 0.5, 1.0) if flags.pop("path_accuracy") else ()
    run_analysis(list(run_dirs), echo=click.echo, path_accuracy_alphas=alphas, **flags)
    click.echo(f"report: {flags['out']}/report.md")


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path())
@click.option("--seeds", default="42,43", show_default=True,
              help="Comma-separated seeds: the spread over seeds and the same-loss noise floor need two or more.")
@click.option("--losses", "loss_names", default=None,
              help="Comma-separated subset of the six losses (dpo brings dpo_lr_matched with it).")
@click.option("--steps", type=int, default=None, help="Override the preset's training steps.")
@click.option("--eval-limit", type=int, default=None, help="Evaluate on the first N test items only.")
@click.option("--config", "config_path", type=click.Path(), default=None, help="Default configs/cpu.toml.")
@click.option("--workers", type=int, default=None, help="Processes the seeds run in (default: one per core).")
def demo(out, seeds, loss_names, steps, eval_limit, config_path, workers) -> None:
    """The whole study on the embedded tiny Qwen3: seven runs per seed (the six losses and DPO at their
    learning rate), evaluation and analysis of the two-thirds checkpoint, the summary over seeds."""
    from engine.recipes.study import run_study
    kwargs = {"config": config_path} if config_path else {}
    report = run_study(out, seeds=_seed_list(seeds), steps=steps, eval_limit=eval_limit,
                       loss_names=loss_names.split(",") if loss_names else None, workers=workers,
                       echo=click.echo, **kwargs)
    click.echo(f"report: {report / 'report.md'}")


def _seed_list(text: str) -> list[int]:
    """--seeds "1,2,3": distinct integers in [0, 2^32), at least one."""
    parts = [s.strip() for s in text.split(",")]
    try:
        seeds = [int(s) for s in parts]
    except ValueError:
        raise EngineError(f"expected comma-separated integers, got {text!r}", field="--seeds") from None
    if not seeds or any(not 0 <= s < 2 ** 32 for s in seeds) or len(set(seeds)) != len(seeds):
        raise EngineError(f"expected distinct seeds in [0, 2^32), got {text!r}", field="--seeds")
    return seeds


@main.command("build-embedded")
@click.option("--out", default=None, type=click.Path(), help="Default: the repository's embedded/.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--student-steps", type=int, default=None, help="Pretraining steps of the student (base/).")
@click.option("--teacher-steps", type=int, default=None, help="Pretraining steps of the teacher.")
@click.option("--rollout-prompts", type=int, default=None, help="Teacher rollout prompts (K = 4 each).")
def build_embedded_command(out, seed, student_steps, teacher_steps, rollout_prompts) -> None:
    """Rebuild the embedded default from scratch: tokenizer, teacher and student Qwen3s, the teacher's
    K = 4 rollouts, BUILD.json."""
    from engine.recipes import embedded
    from engine.train.train_config import REPO_ROOT
    for name, v in (("--student-steps", student_steps), ("--teacher-steps", teacher_steps),
                    ("--rollout-prompts", rollout_prompts)):
        if v is not None and v < 1:
            raise EngineError(f"expected a positive integer, got {v}", field=name)
    embedded.build(out or REPO_ROOT / "embedded", seed=seed,
                   student_steps=student_steps or embedded.STUDENT_STEPS,
                   teacher_steps=teacher_steps or embedded.TEACHER_STEPS,
                   rollout_prompts=rollout_prompts or embedded.ROLLOUT_PROMPTS, echo=click.echo)


def _bench_options(f):
    """Flags shared by `bench` and `profile --train-step`: the model shape and the step trained."""
    for option in reversed([
        click.option("--model-config", default=None, type=click.Path(),
                     help="An HF config.json (default data/qwen3-configs/Qwen3-0.6B.json); random weights."),
        click.option("--batch", type=int, default=1, show_default=True),
        click.option("--seq", type=int, default=512, show_default=True, help="Tokens per row."),
        click.option("--loss", type=click.Choice(["sft", "dpo", "grpo"]), default="sft", show_default=True),
        click.option("--steps", type=int, default=3, show_default=True, help="Timed steps (after the warm-up)."),
        click.option("--warmup", type=int, default=1, show_default=True),
        click.option("--rank", type=int, default=32, show_default=True),
        click.option("--alpha", type=float, default=64.0, show_default=True),
        click.option("--lr", type=float, default=1e-4, show_default=True),
        click.option("--prompt-frac", type=float, default=0.25, show_default=True,
                     help="Leading share of each row that is prompt (not scored)."),
        click.option("--device", default=None, help="cpu or cuda (default: cuda when available)."),
        click.option("--threads", type=int, default=None, help="torch threads (default: torch's)."),
        click.option("--checkpointing", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="Engine activation checkpointing (auto = off; see BENCHMARKS.md)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--checkpoint-dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16",
                     show_default=True, help="Precision of the modelled checkpoint (Qwen3 ships bf16): both "
                     "sides get the same values; on CPU the engine keeps its frozen matrices at it."),
        click.option("--json", "json_path", type=click.Path(), default=None, help="Also write the results here."),
    ]):
        f = option(f)
    return f


def _bench_spec(model_config, **flags):
    from engine.recipes.train_step_bench import BenchSpec
    from engine.tasks.registry import QWEN3_CONFIGS
    if model_config is None:
        model_config = QWEN3_CONFIGS / "Qwen3-0.6B.json"
    spec = BenchSpec(model_config=str(model_config), **flags)
    spec.config()  # a bad config.json is reported here, not from inside a worker process
    return spec


@main.command()
@_bench_options
@click.option("--hf-checkpointing", is_flag=True, help="Turn on HF's gradient checkpointing too.")
@click.option("--max-seq", type=int, default=None,
              help="Instead of timing: find the longest --seq each side trains, doubling up to this.")
@click.option("--cpu-mem-limit-gb", type=float, default=None, help="Memory cap per CPU worker (--max-seq).")
@click.option("--sides", type=click.Choice(["both", "engine", "hf"]), default="both", show_default=True,
              help="Time one side alone (e.g. the engine's SFT vs DPO vs GRPO step cost).")
def bench(json_path, max_seq, sides, **flags) -> None:
    """Training step, this engine vs transformers + PEFT side by side: tokens/s, step time, peak memory, MFU."""
    from benchmarks.bench_train import SIDES, find_max_seq, format_table, run_bench
    from engine.recipes.train_step_bench import save_result
    from engine.outputs import claim
    if json_path:
        claim(json_path, "bench")  # an existing file that is not a result is refused before the run
    spec = _bench_spec(**flags)
    chosen = SIDES if sides == "both" else (sides,)
    if max_seq is not None:
        found = {side: find_max_seq(spec, side, max_seq, log=click.echo) for side in chosen}
        result = {"spec": flags, "max_seq": found}
        for side, r in found.items():
            click.echo(f"{side}: longest sequence that trains (batch {spec.batch}): {r['max_seq']}"
                       + (f" (first failure {r['first_failure']})" if r["first_failure"] else f" (limit {max_seq})"))
        if sides == "both":
            click.echo(f"engine/hf max_seq ratio={found['engine']['max_seq'] / max(found['hf']['max_seq'], 1):.3f}")
    else:
        result = run_bench(spec, chosen, log=click.echo)
        click.echo(format_table(result))
    if json_path:
        save_result(result, json_path)


@main.command()
@click.option("--train-step", is_flag=True,
              help="Break one engine training step down by phase (forward, log-prob, backward, optimizer).")
@click.option("--ops", type=int, default=0, show_default=True, help="With --train-step: also the N busiest ops.")
@_bench_options
def profile(train_step, ops, json_path, **flags) -> None:
    """Kernel profiler (each fused kernel against its torch reference), or one training step by phase."""
    if train_step:
        from engine.recipes.train_step_bench import format_profile, profile_train_step, save_result
        result = profile_train_step(_bench_spec(**flags), top_ops=ops, log=click.echo)
        click.echo(format_profile(result))
    else:
        from triton_kernels.profile import print_profile, profile_kernels
        result = {"rows": profile_kernels(device=flags["device"])}
        print_profile(result["rows"])
    if json_path:
        save_result(result, json_path)


if __name__ == "__main__":
    main()
