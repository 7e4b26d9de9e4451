"""What a run's own files say about how it was trained: the checkpoint's trainer_state.json (its step and
config) and the run's metrics.jsonl (epochs through that step). None where an adapter was not written by
this engine's trainer (a PEFT adapter from elsewhere)."""
from __future__ import annotations

import json
from pathlib import Path

from engine.fsio import jsonl_lines


def training_info(adapter_dir: str | Path | None) -> dict | None:
    """{seed, step, loss, lr, epochs, data, examples_per_epoch} of the checkpoint in `adapter_dir` (the
    last three None when the run's log predates them or is absent), or None without a readable
    trainer_state.json."""
    if adapter_dir is None:
        return None
    adapter_dir = Path(adapter_dir)
    try:
        state = json.loads((adapter_dir / "trainer_state.json").read_text())
        cfg = state["config"]
        seed, step, loss = cfg["seed"], state.get("step"), cfg.get("loss")
        lr = cfg.get("lr_per_loss", {}).get(loss, cfg.get("lr"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(seed, int) or isinstance(seed, bool):
        return None
    step = step if isinstance(step, int) and not isinstance(step, bool) else None
    return {"seed": seed, "step": step, "loss": loss if isinstance(loss, str) else None,
            "lr": float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None,
            **_from_log(adapter_dir.parent, step)}


def _from_log(run_dir: Path, step: int | None) -> dict:
    """From the run's metrics.jsonl: epochs through `step` (passes over the rows that train), the data's
    counts and the examples per epoch (DPO: pairs) of the last start event; None where absent."""
    out = {"epochs": None, "data": None, "examples_per_epoch": None}
    try:
        text = (run_dir / "metrics.jsonl").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for _, line in jsonl_lines(text):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        if row.get("event") == "start":
            out["data"], out["examples_per_epoch"] = row.get("data"), row.get("examples_per_epoch")
        elif step is not None and row.get("step") == step and isinstance(row.get("epoch"), (int, float)):
            out["epochs"] = float(row["epoch"])
    return out
