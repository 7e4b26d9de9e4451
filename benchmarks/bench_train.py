"""The transformers + PEFT side of the training-step benchmark (`python cli.py bench`; engine/bench.py).

    .venv/bin/python benchmarks/bench_train.py --model-config CONFIG_JSON --batch 1 --seq 512

HF's Qwen3ForCausalLM (SDPA attention, the default) with PEFT LoRA on q, k, v, o, built with the
engine's random weights and LoRA init, trained the way a transformers user would: SFT through
`model(..., labels=...)` (HF's cross-entropy over full [B, T, V] logits), DPO / GRPO through full
logits -> log_softmax -> gather (TRL's way) into the same `losses` function as the engine;
torch.optim.AdamW (fused on CUDA, as HF's Trainer picks) with clip_grad_norm_ at 1.0.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.bench import BenchSpec, fill_random_, init_lora_a, loss_of  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class HFRunner:
    def __init__(self, spec: BenchSpec) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import Qwen3Config, Qwen3ForCausalLM
        self.spec = spec
        raw = json.loads(Path(spec.model_config).read_text())
        raw = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
        cfg = Qwen3Config(**raw)
        cfg._attn_implementation = "sdpa"
        cfg.use_cache = False
        default = torch.get_default_dtype()
        torch.set_default_dtype(spec.dtype)  # build straight in the run's dtype: no float32 copy first
        try:
            with torch.device(spec.torch_device):
                model = Qwen3ForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default)
        fill_random_(model, spec.seed)
        model = get_peft_model(model, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                                                 target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"))
        lora = [m for n, m in model.named_modules() if n.rpartition(".")[2] in TARGETS and hasattr(m, "lora_A")]
        with torch.no_grad():
            shapes = [tuple(m.lora_A["default"].weight.shape) for m in lora]
            for m, a in zip(lora, init_lora_a(shapes, spec.seed)):
                m.lora_A["default"].weight.copy_(a)
                m.lora_B["default"].weight.zero_()
        if spec.hf_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        cuda = spec.torch_device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.lr, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.01, fused=cuda or None)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.spec.loss == "sft":
            labels = ids.masked_fill(~batch["score_mask"], -100)
            loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            picked = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
            logps = torch.nn.functional.pad(picked, (1, 0))
            loss = loss_of(self.spec, logps, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    @property
    def config(self):
        return self.model.config


def main() -> None:
    import argparse

    from engine.bench import format_table, run_bench
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--loss", default="sft")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    spec = BenchSpec(model_config=args.model_config, batch=args.batch, seq=args.seq, loss=args.loss,
                     steps=args.steps)
    print(format_table(run_bench(spec)))


if __name__ == "__main__":
    main()
