"""Thin SVDs of a base model's adapted weights, computed once per base and cached as safetensors.

W0 = U0 diag(S0) V0^T per module (W0 [out, in], U0 [out, n], S0 [n], V0 [in, n], n = min(out, in)),
float32 through torch.linalg (CUDA when available). The cache file lives beside the report and is keyed
by the sha256 of the base's safetensors files, so a changed base never reuses stale factors. It is read
and written only through safetensors (no pickle) and replaced atomically.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

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


def read_base_weights(files: list[Path], modules: list[str]) -> dict[str, torch.Tensor]:
    """{module: W0 [out, in] float32} for `module + '.weight'` (protocol section 5 names), from whichever
    shard holds it. A missing tensor is an EngineError naming it."""
    want = {m + ".weight": m for m in modules}
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for key in sf.keys():
                    if key in want:
                        out[want[key]] = sf.get_tensor(key).to(torch.float32)
        except SafetensorError as e:
            raise EngineError(f"corrupt or truncated safetensors file ({e})", path=f) from None
    missing = [m for m in modules if m not in out]
    if missing:
        raise EngineError(f"base weights lack {missing[0]}.weight (adapter trained on another base?)",
                          path=files[0].parent, field="base")
    return out


def svd_of(W: torch.Tensor, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Thin float32 SVD of W [out, in] on `device` (default: CUDA when available) -> U, S, V on CPU."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    U, S, Vh = torch.linalg.svd(W.to(dev, torch.float32), full_matrices=False)
    return {"U": U.cpu().contiguous(), "S": S.cpu().contiguous(), "V": Vh.mT.cpu().contiguous()}


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
        weights = read_base_weights(files, todo)
        for m in tqdm(todo, desc="base SVD", unit="module", disable=not progress):
            for part, t in svd_of(weights.pop(m), device).items():
                tensors[f"{m}.{part}"] = t
        blob = save(tensors, metadata={"base_sha256": key, "version": CACHE_VERSION, "dtype": "float32"})
        with atomic_file(path, "wb") as f:
            f.write(blob)
    return BaseSVD(path, key, modules)
