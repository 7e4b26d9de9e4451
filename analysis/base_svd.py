"""Thin SVDs of a base model's adapted weights, computed once per base and cached as safetensors.

W0 = U0 diag(S0) V0^T per module (W0 [out, in], U0 [out, n], S0 [n], V0 [in, n], n = min(out, in)),
float32 through torch.linalg (CUDA when available). The cache file lives beside the report and is keyed
by the sha256 of the base's safetensors files, so a changed base never reuses stale factors. It is read
and written only through safetensors (no pickle) and replaced atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from engine.errors import EngineError
from engine.fsio import atomic_file

CACHE_VERSION = "1"
_CHUNK = 1 << 22


def base_weight_files(base_dir: str | os.PathLike) -> list[Path]:
    """The base's *.safetensors files, sorted (sharded checkpoints have several)."""
    files = sorted(Path(base_dir).glob("*.safetensors"))
    if not files:
        raise EngineError("base model directory has no *.safetensors weights", path=base_dir, field="base")
    return files


def base_hash(files: Iterable[Path]) -> str:
    """sha256 over (file name, size, bytes) of every weights file: the cache key."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def weight_index(files: list[Path], modules: list[str]) -> dict[str, Path]:
    """{module: the shard holding `module + '.weight'`} (protocol section 5 names). A missing tensor is an
    EngineError naming it."""
    want = {m + ".weight": m for m in modules}
    out: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                out.update({want[key]: f for key in sf.keys() if key in want})
        except SafetensorError as e:
            raise EngineError(f"corrupt or truncated safetensors file ({e})", path=f) from None
    missing = [m for m in modules if m not in out]
    if missing:
        raise EngineError(f"base weights lack {missing[0]}.weight (adapter trained on another base?)",
                          path=files[0].parent, field="base")
    return out


def read_weight(path: Path, module: str) -> torch.Tensor:
    """W0 [out, in] as float32 (checkpoints ship bf16), read alone: one base weight in memory at a time."""
    with safe_open(str(path), framework="pt", device="cpu") as sf:
        return sf.get_tensor(module + ".weight").to(torch.float32)


def svd_of(W: torch.Tensor, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Thin float32 SVD of W [out, in] on `device` (default: CUDA when available) -> U, S, V on CPU."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    U, S, Vh = torch.linalg.svd(W.to(dev, torch.float32), full_matrices=False)
    return {"U": U.cpu().contiguous(), "S": S.cpu().contiguous(), "V": Vh.mT.cpu().contiguous()}


def write_safetensors(f, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Stream float32 tensors to an open binary file in the safetensors layout (8-byte little-endian
    header length, JSON header padded to 8 bytes, raw little-endian data), one tensor at a time, so the
    cache is never held twice in memory (safetensors' own `save` builds the whole file as one bytes)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        assert t.dtype == torch.float32, name
        size = t.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(len(blob).to_bytes(8, "little") + blob)
    for t in tensors.values():
        f.write(t.contiguous().numpy().tobytes())


class BaseSVD:
    """Lazy reader of a cache file: `get(module)` -> (U0 [out, n], S0 [n], V0 [in, n]) float32."""

    def __init__(self, path: Path, key: str, modules: list[str]) -> None:
        self.path, self.key, self.modules = path, key, modules

    def get(self, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with safe_open(str(self.path), framework="pt", device="cpu") as sf:
            return tuple(sf.get_tensor(f"{module}.{p}") for p in "USV")   # type: ignore[return-value]


def _cached_modules(path: Path, key: str) -> set[str] | None:
    """Modules held by a valid cache file for `key`; None if absent, unreadable or for another base."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as sf:
            meta = sf.metadata() or {}
            if meta.get("base_sha256") != key or meta.get("version") != CACHE_VERSION:
                return None
            return {k.rsplit(".", 1)[0] for k in sf.keys()}
    except (SafetensorError, OSError):
        return None


def load_base_svd(base_dir: str | os.PathLike, modules: list[str], cache_dir: str | os.PathLike, *,
                  device: str | torch.device | None = None, progress: bool = True) -> BaseSVD:
    """SVDs of `modules` of the base, from `cache_dir/base_svd-<sha256[:16]>.safetensors` when it holds
    them, else computed (tqdm bar) and written atomically (modules already cached are kept)."""
    files = base_weight_files(base_dir)
    key = base_hash(files)
    path = Path(cache_dir) / f"base_svd-{key[:16]}.safetensors"
    have = _cached_modules(path, key) or set()
    todo = [m for m in modules if m not in have]
    if todo:
        from tqdm import tqdm
        tensors: dict[str, torch.Tensor] = {}
        if have:    # keep what is cached: the new file is a superset
            with safe_open(str(path), framework="pt", device="cpu") as sf:
                tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        where = weight_index(files, todo)
        for m in tqdm(todo, desc="base SVD", unit="module", disable=not progress):
            for part, t in svd_of(read_weight(where[m], m), device).items():
                tensors[f"{m}.{part}"] = t
        with atomic_file(path, "wb") as f:
            write_safetensors(f, tensors, {"base_sha256": key, "version": CACHE_VERSION, "dtype": "float32"})
    return BaseSVD(path, key, modules)
