"""Load N PEFT LoRA adapter directories as batched float64 factor tensors, grouped by shape.

Every run must share the base, the rank, the target modules and the set of adapted modules; the
factors of all runs are stacked as `[runs, modules, ...]` tensors, one bucket per module shape
(q vs k/v vs o), so the geometry never loops over modules in Python.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.model.qwen3_config import Qwen3Config
from engine.errors import EngineError
from engine.model.lora import PEFT_PREFIX, read_adapter_config

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.default)?\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class RunInfo:
    name: str
    adapter_dir: Path | None
    r: int
    alpha: float
    use_rslora: bool
    scale: float
    base_model: str | None
    target_modules: tuple[str, ...]


@dataclasses.dataclass
class Bucket:
    """Modules of one shape. A [R, M, r, in], B [R, M, out, r] (float64); `index` are positions in
    `AdapterSet.modules`."""
    shape: tuple[int, int]
    index: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor


@dataclasses.dataclass
class AdapterSet:
    runs: list[RunInfo]
    modules: list[str]           # 'model.layers.{i}.self_attn.q_proj', ordered by (layer, type)
    layer_of: list[int]          # layer index per module (-1 when the name has none)
    type_of: list[str]           # 'q_proj', ... per module
    buckets: list[Bucket]

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.runs]

    @property
    def scales(self) -> torch.Tensor:
        """[R] float64 scaling alpha/r (alpha/sqrt(r) with rsLoRA)."""
        return torch.tensor([r.scale for r in self.runs], dtype=torch.float64)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(out, in) of each module, in `modules` order."""
        shapes: list[tuple[int, int]] = [(0, 0)] * len(self.modules)
        for b in self.buckets:
            for m in b.index.tolist():
                shapes[m] = b.shape
        return shapes

    @property
    def rank(self) -> int:
        return self.runs[0].r

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [R, r, in], B [R, out, r]) of one module, for tests and spot checks."""
        m = self.modules.index(module)
        for b in self.buckets:
            hit = (b.index == m).nonzero()
            if len(hit):
                return b.A[:, hit[0, 0]], b.B[:, hit[0, 0]]
        raise KeyError(module)


def resolve_adapter_dir(path: str | os.PathLike, checkpoint: str = "final") -> Path:
    """A PEFT adapter directory, or a training output directory holding `final/` (or the
    `checkpoint` subdirectory asked for, e.g. 'step-1000')."""
    path = Path(path)
    if not path.exists():
        raise EngineError("run directory not found", path=path)
    for candidate in (path, path / checkpoint):
        if (candidate / "adapter_config.json").is_file():
            missing = [f for f in ADAPTER_FILES if not (candidate / f).is_file()]
            if missing:
                raise EngineError(f"adapter directory lacks {missing[0]}", path=candidate)
            return candidate
    raise EngineError("neither a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) "
                      f"nor a training output directory with {checkpoint}/", path=path)


def run_names(dirs: list[Path]) -> list[str]:
    """Run names from the directory names ('runs/sft/final' is 'sft'); a clash (e.g. two
    'checkpoint-1000') adds parent names until they differ."""
    paths = [d.resolve() for d in dirs]
    paths = [p.parent if p.name == "final" else p for p in paths]
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    raise EngineError(f"the same run directory was given twice: {[str(d) for d in dirs]}")


def module_sort_key(name: str) -> tuple[int, int, str]:
    m = _LAYER.search(name)
    kind = name.rpartition(".")[2]
    return (int(m.group(1)) if m else -1,
            TYPE_ORDER.index(kind) if kind in TYPE_ORDER else len(TYPE_ORDER), name)


def _read_factors(adapter_dir: Path, r: int) -> dict[str, dict[str, torch.Tensor]]:
    path = adapter_dir / "adapter_model.safetensors"
    out: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                m = _KEY.match(key.removeprefix(PEFT_PREFIX))
                if m is None or not key.startswith(PEFT_PREFIX):
                    raise EngineError(f"tensor {key!r} is not a LoRA factor "
                                      f"('{PEFT_PREFIX}<module>.lora_A.weight' or '.lora_B.weight')", path=path)
                t = sf.get_tensor(key)
                if not bool(torch.isfinite(t).all()):
                    raise EngineError(f"tensor {key!r} holds NaN or inf (a diverged run?)", path=path)
                out.setdefault(m["module"], {})[m["kind"]] = t
    except SafetensorError as e:
        raise EngineError(f"corrupt or truncated safetensors file ({e})", path=path) from None
    if not out:
        raise EngineError("adapter holds no LoRA tensors", path=path)
    for module, pair in out.items():
        for kind in "AB":
            if kind not in pair:
                raise EngineError(f"module {module!r} has lora_{'BA'[kind == 'B']} but no lora_{kind}", path=path)
        A, B = pair["A"], pair["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
            raise EngineError(f"module {module!r}: lora_A {list(A.shape)} and lora_B {list(B.shape)} do not fit "
                              f"rank r={r} from adapter_config.json (expected A [r, in], B [out, r])", path=path)
    return out


def _expected_shapes(config: Qwen3Config) -> dict[str, tuple[int, int]]:
    h = config.hidden_size
    return {"q_proj": (config.q_out, h), "k_proj": (config.kv_out, h), "v_proj": (config.kv_out, h),
            "o_proj": (h, config.q_out), "gate_proj": (config.intermediate_size, h),
            "up_proj": (config.intermediate_size, h), "down_proj": (h, config.intermediate_size)}


def base_config(base: str | os.PathLike | None) -> Qwen3Config | None:
    """The base's config when `base` is a local model directory or a config.json file; None when no
    base was given or it is a hub id (geometry then checks only the adapters against each other)."""
    if base is None:
        return None
    p = Path(base).expanduser()
    if p.is_file():
        return Qwen3Config.from_json(p)
    if p.is_dir():
        return Qwen3Config.from_json(p / "config.json")
    s = str(base)
    if s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise EngineError("base model not found (expected a model directory, its config.json, or a hub id)",
                          path=s)
    return None


def _check_against_base(run: RunInfo, modules: dict[str, dict[str, torch.Tensor]],
                        config: Qwen3Config, base: str) -> None:
    shapes = _expected_shapes(config)
    for name, pair in modules.items():
        layer = _LAYER.search(name)
        kind = name.rpartition(".")[2]
        if layer is None or int(layer.group(1)) >= config.num_hidden_layers or kind not in shapes:
            raise EngineError(f"module {name!r} does not exist in the base model {base} "
                              f"({config.num_hidden_layers} layers)", path=run.adapter_dir)
        got = (pair["B"].shape[0], pair["A"].shape[1])
        if got != shapes[kind]:
            raise EngineError(f"module {name!r} has Delta W shape {list(got)} but the base model {base} expects "
                              f"{list(shapes[kind])}: adapter trained on a different base?", path=run.adapter_dir)


def load_adapters(run_dirs: list[str | os.PathLike], base: str | os.PathLike | None = None,
                  checkpoint: str = "final") -> AdapterSet:
    """Read and cross-check N adapters; return their factors stacked per shape bucket (float64).
    `base` (a model directory, its config.json, a hub id, or None) checks module shapes when local."""
    if not run_dirs:
        raise EngineError("no run directories given")
    dirs = [Path(d) for d in run_dirs]
    adapter_dirs = [resolve_adapter_dir(d, checkpoint) for d in dirs]
    names = run_names(dirs)
    config = base_config(base)
    runs, factors = [], []
    for name, adir in zip(names, adapter_dirs):
        cfg, raw = read_adapter_config(adir)
        run = RunInfo(name=name, adapter_dir=adir, r=cfg.r, alpha=cfg.alpha, use_rslora=cfg.use_rslora,
                      scale=cfg.scale, base_model=raw.get("base_model_name_or_path"),
                      target_modules=tuple(sorted(cfg.target_modules)))
        mods = _read_factors(adir, cfg.r)
        kinds = sorted({m.rpartition(".")[2] for m in mods})
        if not set(kinds) <= set(run.target_modules):
            raise EngineError(f"adapter has modules of types {kinds} outside its target_modules "
                              f"{list(run.target_modules)}", path=adir / "adapter_config.json", field="target_modules")
        if config is not None:
            _check_against_base(run, mods, config, str(base))
        runs.append(run)
        factors.append(mods)
    return build_adapter_set(runs, factors)


def build_adapter_set(runs: list[RunInfo], factors: list[dict[str, dict[str, torch.Tensor]]]) -> AdapterSet:
    """Stack per-run factors {module: {'A': [r, in], 'B': [out, r]}} into float64 shape buckets."""
    _check_consistent(runs, factors)
    modules = sorted(factors[0], key=module_sort_key)
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(modules):
        buckets.setdefault((factors[0][m]["B"].shape[0], factors[0][m]["A"].shape[1]), []).append(i)
    out = []
    for shape, idx in buckets.items():
        A = torch.stack([torch.stack([f[modules[i]]["A"].double() for i in idx]) for f in factors])
        B = torch.stack([torch.stack([f[modules[i]]["B"].double() for i in idx]) for f in factors])
        out.append(Bucket(shape=shape, index=torch.tensor(idx), A=A, B=B))
    layer_of = [module_sort_key(m)[0] for m in modules]
    return AdapterSet(runs=runs, modules=modules, layer_of=layer_of,
                      type_of=[m.rpartition(".")[2] for m in modules], buckets=out)


def _check_consistent(runs: list[RunInfo], factors: list[dict[str, dict[str, torch.Tensor]]]) -> None:
    """One EngineError naming the first mismatch between run 0 and another run."""
    first = runs[0]
    for run, mods in zip(runs[1:], factors[1:]):
        where = _in_dir(run, "adapter_config.json")
        if run.base_model != first.base_model:
            raise EngineError(f"adapters of different bases: {first.name} was trained on {first.base_model!r}, "
                              f"{run.name} on {run.base_model!r}", path=where, field="base_model_name_or_path")
        if run.r != first.r:
            raise EngineError(f"adapters of different ranks: {first.name} has r={first.r}, {run.name} r={run.r}",
                              path=where, field="r")
        if run.target_modules != first.target_modules:
            raise EngineError(f"adapters of different target modules: {first.name} {list(first.target_modules)}, "
                              f"{run.name} {list(run.target_modules)}", path=where, field="target_modules")
        a, b = set(factors[0]), set(mods)
        if a != b:
            diff = sorted(a ^ b)[0]
            raise EngineError(f"adapters cover different modules: {diff!r} is in "
                              f"{first.name if diff in a else run.name} only",
                              path=_in_dir(run, "adapter_model.safetensors"))
        for m in sorted(a):
            sa = (tuple(factors[0][m]["A"].shape), tuple(factors[0][m]["B"].shape))
            sb = (tuple(mods[m]["A"].shape), tuple(mods[m]["B"].shape))
            if sa != sb:
                raise EngineError(f"module {m!r} has factor shapes {sa} in {first.name} but {sb} in {run.name} "
                                  f"(different bases?)", path=_in_dir(run, "adapter_model.safetensors"))



def _in_dir(run: RunInfo, file: str) -> Path | None:
    return None if run.adapter_dir is None else Path(run.adapter_dir) / file
