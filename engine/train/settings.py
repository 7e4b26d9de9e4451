"""Training settings after their types: where each came from (so a check made later, once the model
and data are loaded, still names the file, line and field the user wrote), loss names inside
[lr_per_loss] / [loss_hparams.<loss>], and which settings a --resume must find unchanged.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any, Iterator

from engine.errors import EngineError

# Settings that do not change what a run computes (where it runs, what it keeps, how it is split into
# passes): a resume may change them. Every other setting must be the same, or named in allow_changes.
RESUME_FREE = frozenset({"out", "save_every", "checkpoint_steps", "device", "gradient_checkpointing", "fsdp",
                         "ref_cache", "micro_batch_size", "allow_changes"})
ROLLOUTS_CONTENT = "rollouts_content"  # allow_changes name for an edited rollouts file at the same path


def record_origin(cfg: Any, key: str, path: "Path | None", line: "int | None") -> None:
    cfg.__dict__.setdefault("_origins", {})[key] = (path, line)


def setting_error(cfg: Any, key: str, message: str) -> EngineError:
    """An error about setting `key`: the config file and line it was set on (none for a flag/default)."""
    path, line = getattr(cfg, "_origins", {}).get(key, (None, None))
    return EngineError(message, path=path, line=line, field=key)


def toml_lines(text: "str | None") -> Iterator[tuple[int, "str | None", "str | None"]]:
    """(line number, current [table] or None at the top level, the key of a `key = ...` line or None for
    a table header). Best effort, line by line: enough to point an error at the line a key is on."""
    table = None
    for number, line in enumerate((text or "").splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            table = stripped.lstrip("[").split("]")[0].strip().strip('"').strip("'")
            yield number, table, None
        elif "=" in stripped:
            yield number, table, stripped.split("=", 1)[0].strip().strip('"').strip("'")


def table_key_line(text: "str | None", table: str, key: str) -> "int | None":
    """The line of `key` in TOML `text` inside [table], as a [table.key] header or `table.key =`."""
    for number, current, head in toml_lines(text):
        if head is None:
            found = current == f"{table}.{key}"                       # [table.key]
        else:                                                         # key = ... in [table], or table.key = ...
            found = current == table and head.split(".")[0] == key or \
                current is None and head.startswith(f"{table}.{key}")
        if found:
            return number
    return None


def check_loss_names(cfg: Any, text: "str | None" = None) -> None:
    """A typo'd loss in [lr_per_loss] or [loss_hparams.<loss>] (or a typo'd hyperparameter) would be
    ignored and the run train at other settings than written: refuse it."""
    import losses
    names = losses.names()
    for table in ("lr_per_loss", "loss_hparams"):
        path, _ = getattr(cfg, "_origins", {}).get(table, (None, None))
        for name, value in getattr(cfg, table).items():
            where = dict(path=path, line=table_key_line(text, table, name) if path else None,
                         field=f"{table}.{name}")
            if name not in names:
                raise EngineError(f"unknown loss {name!r}; valid: {', '.join(names)}", **where)
            if table == "loss_hparams":
                if not isinstance(value, dict):
                    raise EngineError("expected a table of hyperparameters", **where)
                for hp in value:
                    record_origin(cfg, f"{table}.{name}.{hp}", path,  # for the loss's own value checks
                                  table_key_line(text, f"{table}.{name}", hp) if path else None)
                    if hp not in losses.hyperparameters(name):
                        valid = ", ".join(losses.hyperparameters(name)) or "none"
                        raise EngineError(f"unknown hyperparameter {hp!r} for loss '{name}'; valid: {valid}",
                                          path=path, field=f"{table}.{name}.{hp}",
                                          line=table_key_line(text, f"{table}.{name}", hp) if path else None)


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(path: "str | os.PathLike") -> "str | None":
    """sha256 of a file (recomputed only when its size or mtime changes); None when unreadable."""
    try:
        st = os.stat(path)
        return _sha256_cached(str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return None


def check_resume(saved_state: dict, cfg: Any, state_path: Path) -> None:
    """Refuse a resume whose settings or rollouts' content differ from the checkpoint's, naming the
    first difference; names in cfg.allow_changes (a deliberate change) pass."""
    saved, now, allowed = saved_state["config"], cfg.to_dict(), set(cfg.allow_changes)
    for key in now:
        if key in RESUME_FREE or key in allowed or key not in saved:
            continue  # a setting added since the checkpoint was written has its default there
        if saved[key] != now[key]:
            raise EngineError(f"cannot resume: '{key}' was {saved[key]!r} in this run, now {now[key]!r} (pass "
                              f"--allow-change {key} to continue with the new value)", path=state_path, field=key)
    old = saved_state.get("rollouts_sha256")
    if old is not None and ROLLOUTS_CONTENT not in allowed and old != content_hash(cfg.rollouts):
        raise EngineError(f"cannot resume: the rollouts file {cfg.rollouts} changed since this run started (its "
                          f"sha256 differs; pass --allow-change {ROLLOUTS_CONTENT} to continue on the new content)",
                          path=state_path, field="rollouts")
