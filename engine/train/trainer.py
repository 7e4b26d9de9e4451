"""One training loop for all six losses (and full-parameter training of the embedded base model).

rollouts -> tokenised examples -> step plan (whole groups, or DPO pairs) -> micro-batches ->
per-token log-probs -> loss (normalised over the whole optimizer step) -> clip -> AdamW -> checkpoints.

Under torchrun each rank takes a share of every step's units and the gradients are summed over
ranks (engine.distributed), so N ranks compute the single-process step; only rank 0 writes files.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import losses
from losses import LossInputs

from engine.train import checkpoints as ckpt
from engine import distributed
from engine.model.weights import default_device, default_dtype, load_model
from engine.packing import pass_cost_tokens
from engine.train.batching import Batch, build_pairs, collate, describe, groups_of, plan_steps, step_batches
from engine.train.rollouts import Example, read_rollouts, tokenize_rollouts
from engine.errors import EngineError, TrainingDiverged
from engine.model.logprobs import token_logprobs
from engine.model.frozen import compacts_by_default
from engine.model.lora import LoRAConfig, apply_lora
from engine.model.memory import release_cpu_heap
from engine.outputs import claim
from engine.train.optim import AdamW, CosineSchedule
from engine.train.reference_logps import shared_reference_logps
from engine.model.tokenizer import load_tokenizer
from engine.train.rollout_checks import check_groups
from engine.train.settings import setting_error
from engine.train.train_config import TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class Units:
    """What a step is made of: groups of rows (or DPO pairs), each kept whole in one micro-batch."""
    rows: list[list[int]]
    size: list[int]          # how many examples each unit counts for in the batch size


def build_units(examples: list[Example], cfg: TrainConfig, counted: list[bool] | None = None) -> Units:
    """Groups (or DPO pairs) and what each counts for in `batch_size`. With `counted` (a loss that ignores
    some rows entirely, RFT: the incorrect ones) a group counts for its counted rows only and a group
    without any is not trained on: filter first, then batch, so an RFT step holds `batch_size` correct rows."""
    if cfg.loss == "dpo":
        pairs = build_pairs(examples, cfg.seed, cfg.dpo_pairs)
        if not pairs:
            raise EngineError("no DPO pairs: no group has both a reward-1 and a reward-0 rollout",
                              path=cfg.rollouts)
        return Units(rows=[list(p) for p in pairs], size=[1] * len(pairs))
    groups = groups_of(examples)
    if counted is None:
        return Units(rows=groups, size=[len(g) for g in groups])
    kept = [(g, sum(counted[i] for i in g)) for g in groups]
    kept = [(g, n) for g, n in kept if n]
    if not kept:
        raise EngineError(f"no rollout counts for {cfg.loss} (RFT trains on reward-1 rollouts only, and there "
                          "are none)", path=cfg.rollouts, field="reward")
    return Units(rows=[g for g, _ in kept], size=[n for _, n in kept])


def needs_reference(cfg: TrainConfig) -> bool:
    return cfg.loss == "dpo" or float(cfg.hparams_for(cfg.loss).get("kl_beta", 0.0) or 0.0) > 0


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True,
                 dist: distributed.DistContext | None = None) -> None:
        self.dist = dist or distributed.DistContext()
        self.cfg, self.progress = cfg, progress and self.dist.is_main
        self.out = Path(cfg.out)
        self.hparams = cfg.hparams_for(cfg.loss)
        self._check_loss_settings()
        self.resume_from = distributed.on_main(self.dist, lambda: self._resume_point(resume))
        self._setup()

    def _check_loss_settings(self) -> None:
        """What can be refused before anything is loaded. `losses.get` validates the loss name; the
        hyperparameter names are checked here too (the loss would check them only at its first call,
        after the model is loaded), against the config's `loss_hparams` table."""
        cfg = self.cfg
        losses.get(cfg.loss)
        unknown = set(self.hparams) - set(losses.hyperparameters(cfg.loss))
        if unknown:
            raise EngineError(f"unknown hyperparameter(s) {sorted(unknown)} for loss {cfg.loss!r}; valid: "
                              f"{sorted(losses.hyperparameters(cfg.loss))}", field=f"loss_hparams.{cfg.loss}")
        self._need_behavior = cfg.loss == "grpo" and self.hparams.get("clip_eps") is not None
        if cfg.fsdp and cfg.full_finetune:
            raise EngineError("fsdp shards the frozen base around LoRA adapters; it does not support "
                              "full_finetune", field="fsdp")

    def _resume_point(self, resume: bool) -> str | None:
        """Rank 0 picks the checkpoint to resume from (every rank then reads the same one)."""
        if resume:
            latest = ckpt.latest_checkpoint(self.out)
            return str(latest) if latest is not None else None
        if ckpt.has_checkpoints(self.out):
            raise EngineError("output directory already holds a run; pass --resume to continue it or "
                              "choose another --out", path=self.out)
        return None

    # ---- set-up ---------------------------------------------------------------------------------
    def _setup(self) -> None:
        """Model -> examples -> step plan -> adapters -> reference log-probs -> optimizer -> resume, in
        this order (each step reads what the ones before it set)."""
        device = distributed.training_device(self.dist, self.cfg.device)
        self._load_model(device)
        self._load_examples()
        self._plan_steps()
        self._attach_adapters(device)
        self._compute_reference_logps()
        params = self._build_optimizer()
        self._restore_or_start(params)

    def _load_model(self, device: torch.device | None) -> None:
        cfg = self.cfg
        dtype = DTYPES[cfg.dtype] if cfg.dtype else None
        self.fsdp = cfg.fsdp and self.dist.enabled
        # FSDP: load on the host, shard, and let fully_shard move each rank's shards to its device.
        # LoRA training in float32 on CPU from a bf16 checkpoint: the frozen base stays at 2 bytes per
        # weight (lossless, bit-identical steps; it halves the resident model, BENCHMARKS.md).
        run_device = torch.device(device or default_device())
        compact = not self.fsdp and compacts_by_default(run_device, dtype or default_dtype(run_device),
                                                        cfg.full_finetune)
        self.model = load_model(cfg.model, dtype=dtype, device="cpu" if self.fsdp else device,
                                compact_frozen=compact)
        self.device = self.model.device
        self.tokenizer = load_tokenizer(cfg.model)
        max_ctx = self.model.config.max_position_embeddings
        if cfg.max_len > max_ctx:
            raise setting_error(cfg, "max_len", f"max_len {cfg.max_len} exceeds the model's context {max_ctx}")

    def _load_examples(self) -> None:
        """Rollouts -> tokenised examples (less RFT's duplicates when `rft_dedup`)."""
        cfg = self.cfg
        rollouts, skipped = read_rollouts(cfg.rollouts, cfg.on_bad)
        rollouts = check_groups(rollouts, Path(cfg.rollouts), cfg.on_bad, skipped)  # one prompt per group id
        self.examples = tokenize_rollouts(rollouts, self.tokenizer, cfg.max_len, path=cfg.rollouts,
                                          on_bad=cfg.on_bad, enable_thinking=cfg.enable_thinking, skipped=skipped,
                                          vocab_size=self.model.config.vocab_size)
        self.skipped = skipped
        if skipped.count and self.dist.is_main:
            tqdm.write(f"skipped {skipped.count} bad rollout lines (on_bad=skip), e.g. {skipped.reasons[0]}")
        if self._need_behavior and any(e.behavior_logps is None for e in self.examples):
            raise EngineError("the clipped ratio needs behavior_logps, absent from some rollouts",
                              path=cfg.rollouts, field="behavior_logps")
        self.data_stats = describe(self.examples)
        self.dedup_dropped = 0
        if cfg.loss == "rft" and cfg.rft_dedup:
            from losses.rft import dedup_mask
            keep = dedup_mask([e.text for e in self.examples], [e.group for e in self.examples],
                              [e.reward for e in self.examples])
            self.dedup_dropped = len(self.examples) - int(sum(bool(k) for k in keep))
            self.examples = [e for e, k in zip(self.examples, keep) if k]

    def _plan_steps(self) -> None:
        cfg = self.cfg
        # Rows a loss ignores entirely (RFT: the incorrect ones) add exactly 0 to a step: they are not
        # forwarded, and the plan counts only the others, so a step holds `batch_size` rows that train.
        counts = losses.rows_that_count(cfg.loss)
        self.counted = counts(torch.tensor([e.reward for e in self.examples])).tolist() if counts else None
        self.units = build_units(self.examples, cfg, self.counted)
        self.plan = plan_steps(self.units.rows, self.units.size, cfg.batch_size, cfg.steps, cfg.seed)
        # Passes over the data (rows that train; DPO: pairs) after each step: the report states them per run.
        per_epoch, done = sum(self.units.size), 0
        self.epoch_after = []
        for units in self.plan:
            done += sum(self.units.size[u] for u in units)
            self.epoch_after.append(done / per_epoch)
        if cfg.batch_size > sum(self.units.size) and self.dist.is_main:
            note = setting_error(cfg, "batch_size", f"{cfg.batch_size} exceeds the {sum(self.units.size)} examples "
                                 "(DPO: pairs) in the data; each step uses all of them once")
            tqdm.write(f"warning: {note}")

    def _attach_adapters(self, device: torch.device | None) -> None:
        """LoRA on the target linears (or every weight trainable), then the FSDP sharding of the base."""
        cfg = self.cfg
        if cfg.full_finetune:
            for p in self.model.parameters():
                p.requires_grad_(True)
        else:
            try:
                apply_lora(self.model, LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                                  target_modules=tuple(cfg.lora_targets), use_rslora=cfg.use_rslora),
                           seed=cfg.seed)
            except EngineError as e:  # LoRAConfig's names are not the config's: say what the user wrote
                key = {"r": "lora_r", "target_modules": "lora_targets"}.get(e.field, e.field or "lora_r")
                raise setting_error(cfg, key, e.message) from None
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        self.compacted_bytes = self.model.compacted_bytes()
        if self.fsdp:
            distributed.shard_frozen_base(self.dist, self.model, device or default_device())
            self.device = device or default_device()

    def _compute_reference_logps(self) -> None:
        cfg = self.cfg
        self.ref_logps = None
        if needs_reference(cfg):
            cache_dir = Path(cfg.ref_cache) if cfg.ref_cache else self.out.parent
            self.ref_logps = shared_reference_logps(self.dist, self.model, self.examples,
                                                 self.tokenizer.pad_id, cache_dir, cfg.micro_batch_size)

    def _build_optimizer(self) -> list[torch.nn.Parameter]:
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = cfg.lr_for(cfg.loss)
        self.schedule = CosineSchedule(lr, cfg.steps, warmup_ratio=cfg.warmup_ratio, min_lr_ratio=cfg.min_lr_ratio)
        self.optimizer = AdamW([{"params": params, "lr": lr, "weight_decay": cfg.weight_decay}],
                               betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, schedule=self.schedule)
        return params

    def _restore_or_start(self, params: list[torch.nn.Parameter]) -> None:
        """Seed, restore the checkpoint to resume from (if any), and make every rank start equal."""
        cfg = self.cfg
        self.start_step = 0
        # Dropout draws from the global RNG: seed it so a run does not depend on what the process
        # did before (a resume then restores the RNG state saved with the checkpoint).
        torch.manual_seed(cfg.seed)
        if self.resume_from is not None:
            self.start_step = ckpt.restore(Path(self.resume_from), self.model, self.optimizer, cfg)
        if self.device.type == "cpu":
            release_cpu_heap()  # the load's temporaries: off the resident set before the first step
        if self.dist.enabled:
            # Replicas start identical by construction (seeded init, same checkpoint); make it so
            # regardless, as DDP does: rank 0's weights and optimizer state win.
            # (Parameters and float32 masters both come from rank 0, so they stay consistent.)
            distributed.broadcast_tensors_(self.dist, params + list(self.optimizer.state_dict()[0].values()))

    # ---- one step -------------------------------------------------------------------------------
    def _micro_batches(self, units: list[list[int]]) -> list[Batch]:
        batches = step_batches(self.examples, units, self.cfg.micro_batch_size, pass_cost_tokens(self.device),
                               self.tokenizer.pad_id, ref_logps=self.ref_logps, paired=self.cfg.loss == "dpo")
        return [b.to(self.device) for b in batches]

    def _my_units(self, units: list[list[int]]) -> list[list[int]]:
        """This rank's share of a step's units (all of them on one process), less the rows the loss
        ignores."""
        if self.counted is not None:
            units = [kept for kept in ([i for i in u if self.counted[i]] for u in units) if kept]
        if not self.dist.enabled:
            return units
        lengths = [len(e.ids) for e in self.examples]
        share = distributed.share_units(units, lengths, self.dist.world_size)[self.dist.rank]
        return [units[i] for i in share]

    def _accumulate(self, micro: list[Batch], step: int,
                    backward: bool) -> tuple[float, dict[str, float], int, float]:
        """Sum the loss over a step's micro-batches (each divided by the step's normaliser, summed
        over micro-batches and ranks, so accumulation gives one big batch's gradient); backprop each
        when `backward`. A non-finite loss stops the step on every rank (after the passes, so ranks
        never disagree on how many collectives they run)."""
        loss_fn, norm_fn = losses.get(self.cfg.loss), losses.get_normalizer(self.cfg.loss)
        local = sum(norm_fn(b.mask, b.rewards, pairs=b.pairs, **self.hparams) for b in micro)
        normaliser, passes, self.micro_batches_in_step = local, len(micro), len(micro)
        if self.dist.enabled:
            counts = distributed.gather_json(self.dist, [local, len(micro)])
            normaliser, passes = sum(c[0] for c in counts), max(c[1] for c in counts)
            self.micro_batches_in_step = sum(c[1] for c in counts)
        total_loss, parts, tokens, bad = 0.0, [], 0, None
        for b in micro:
            logps = token_logprobs(self.model, b.input_ids, b.attention_mask, score_mask=b.mask)
            inputs = LossInputs(logps=logps, mask=b.mask, rewards=b.rewards, group_ids=b.group_ids,
                                ref_logps=b.ref_logps, behavior_logps=b.behavior_logps, pairs=b.pairs,
                                num_tokens=max(normaliser, 1e-12))
            try:
                loss, stats = loss_fn(inputs, **self.hparams)
            except EngineError as e:  # a hyperparameter's value: the file and line it was set on
                if e.field not in self.hparams:
                    raise
                raise setting_error(self.cfg, f"loss_hparams.{self.cfg.loss}.{e.field}", e.message) from None
            if bad is None and not torch.isfinite(loss):
                bad = (f"non-finite loss {float(loss.detach())} at step {step + 1} on rollout lines "
                       f"{[self.examples[i].line for i in b.rows]}")
            if backward:
                loss.backward()
            total_loss += float(loss.detach())
            tokens += int(b.attention_mask.sum())
            parts.append(stats)
        if self.fsdp:
            # FSDP all-gathers weights inside every forward/backward: each rank runs as many passes.
            for _ in range(passes - len(micro)):
                self._idle_pass(backward)
        if self.dist.enabled:
            parts = [{k: v for k, v in p.items() if isinstance(v, (int, float))} for p in parts]
            ranks = distributed.gather_json(self.dist, [total_loss, tokens, parts, bad])
            total_loss, tokens = sum(r[0] for r in ranks), sum(r[1] for r in ranks)
            parts = [p for r in ranks for p in r[2]]
            bad = next((r[3] for r in ranks if r[3] is not None), None)
        if bad is not None:
            raise TrainingDiverged(bad)
        return total_loss, losses.merge_stats(parts), tokens, normaliser

    def _idle_pass(self, backward: bool) -> None:
        """A forward (and backward) that adds exactly zero: keeps FSDP's collectives in step on a
        rank with fewer micro-batches than the others."""
        b = collate(self.examples, [0], self.tokenizer.pad_id).to(self.device)
        logps = token_logprobs(self.model, b.input_ids, b.attention_mask, score_mask=b.mask)
        if backward:
            (logps.sum() * 0.0).backward()

    def train_step(self, step: int) -> dict[str, Any]:
        units = [self.units.rows[u] for u in self.plan[step]]
        micro = self._micro_batches(self._my_units(units))
        self.model.train()
        loss, stats, tokens, normaliser = self._accumulate(micro, step, backward=True)
        distributed.all_reduce_gradients(self.dist, self.optimizer)
        grad_norm = self.optimizer.clip_grad_norm(self.cfg.grad_clip)
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(f"non-finite gradient norm at step {step + 1} on rollout lines "
                                   f"{sorted(self.examples[i].line for u in units for i in u)}")
        self.optimizer.step()
        self.optimizer.zero_grad()
        return {"step": step + 1, "loss": loss, "lr": self.optimizer.last_lrs[0], "grad_norm": grad_norm,
                "epoch": self.epoch_after[step], "tokens": tokens, "normaliser": normaliser,
                "micro_batches": self.micro_batches_in_step,
                **{f"stats/{k}": v for k, v in stats.items()}}

    @torch.no_grad()
    def objective(self) -> float:
        """The loss over the whole rollout set as one batch (no update): what training lowers."""
        self.model.eval()
        return self._accumulate(self._micro_batches(self._my_units(self.units.rows)), -1, backward=False)[0]

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg, opened = self.cfg, {}

        def open_log() -> None:  # rank 0 only: the one writer of files
            opened["log"] = ckpt.MetricsLog(self.out / "metrics.jsonl", keep_until=self.start_step)
            opened["log"].write({"event": "start", "loss": cfg.loss, "resumed_from": self.start_step,
                                 "data": self.data_stats, "skipped_lines": self.skipped.count,
                                 "units": len(self.units.rows), "examples_per_epoch": sum(self.units.size),
                                 "rft_dedup_dropped": self.dedup_dropped,
                                 "world_size": self.dist.world_size, "fsdp": self.fsdp,
                                 "compacted_frozen_bytes": self.compacted_bytes, "config": cfg.to_dict()})
        distributed.on_main(self.dist, open_log)
        metrics = opened.get("log")
        bar = tqdm(range(self.start_step, cfg.steps), initial=self.start_step, total=cfg.steps,
                   desc=f"train {cfg.loss}", unit="step", disable=not self.progress, dynamic_ncols=True)
        t0 = time.perf_counter()
        for step in bar:
            t = time.perf_counter()
            row = self.train_step(step)
            dt = time.perf_counter() - t
            row.update(step_time=dt, tok_s=row["tokens"] / dt, elapsed=time.perf_counter() - t0)
            if metrics is not None:
                metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tok_s']:.0f}")
            done = step + 1
            if done < cfg.steps and ((cfg.save_every and done % cfg.save_every == 0)
                                     or done in cfg.checkpoint_steps):
                self._save(self.out / f"step-{done}", done)
        final = self.out / "final"
        self._save(final, cfg.steps)
        if metrics is not None:
            metrics.write({"event": "end", "final": str(final)})
            metrics.close()
        return final

    def _save(self, directory: Path, step: int) -> None:
        """Rank 0 writes; a failed write stops every rank with the same message."""
        distributed.on_main(self.dist, lambda: ckpt.save(directory, self.model, self.optimizer, self.cfg, step))


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train one run into cfg.out (locked against a second writer); returns the final checkpoint.
    Under torchrun every rank calls this; rank 0 holds the lock and writes the files."""
    ctx = distributed.setup(cfg.device)
    lock = ckpt.OutputLock(Path(cfg.out))

    def acquire() -> None:
        lock.__enter__()
        ckpt.recover(Path(cfg.out))  # leftovers of a killed run; safe now that we hold the lock
        claim(Path(cfg.out) / "final", "checkpoint")  # refused now, not after the training it would end
    try:
        distributed.on_main(ctx, acquire)
        return Trainer(cfg, resume=resume, progress=progress, dist=ctx).run()
    finally:
        lock.__exit__(None, None, None)
