"""Atomic file and directory writes: a reader never sees a half-written file.

Everything the project writes to disk (adapters, checkpoints, reports, JSONL summaries) goes
through these helpers: write to a temporary sibling, fsync, then `os.replace`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from engine.errors import EngineError
from engine.jsonread import check_line_size


JSON_WHITESPACE = " \t\r\n"  # the only characters JSON allows between values


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for each line of JSON-lines `text` holding more than JSON whitespace.
    Lines end at "\n" only: str.splitlines() also breaks at U+2028, U+0085 and \x1c-\x1e, which a
    JSON string may hold unescaped (json.dumps(..., ensure_ascii=False) writes them raw); and
    str.strip() counts \x1c-\x1f as blank, which JSON does not (such a line is an error, not a gap)."""
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip(JSON_WHITESPACE):
            yield number, line


def jsonl_objects(path: str | os.PathLike, what: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file of objects. A file that cannot
    be read or is not UTF-8, a line that is not JSON or not an object: EngineError naming the file (and
    the line). `what` names the file in the message ("eval file")."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EngineError(f"not UTF-8 text ({e.reason} at byte {e.start})", path=path) from None
    except OSError as e:
        raise EngineError(f"cannot read the {what} ({e.strerror})", path=path) from None
    for number, line in jsonl_lines(text):
        check_line_size(line, path, number)  # before parsing (and later tokenising) it
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EngineError(f"not valid JSON ({e.msg}, column {e.colno})", path=path, line=number) from None
        if not isinstance(obj, dict):
            raise EngineError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=number)
        yield number, obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temp file beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success fsync its files and rename it to `path`.

    An existing `path` is replaced only after the new one is complete (old moved aside, new
    renamed in, old deleted), so a crash leaves either the old or the new directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        mode = 0o666 & ~_umask()
        for f in tmp.rglob("*"):
            if f.is_file():
                # The usual permissions whatever the writer chose (safetensors' save_file makes 0600,
                # a copied read-only tokenizer file stays read-only), so a shared run directory is readable.
                os.chmod(f, mode)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
