"""The six offline losses of the study behind one registry.

    from losses import LossInputs, get, get_normalizer
    loss, stats = get("grpo")(inputs, bias=0.1)
    step_count = sum(get_normalizer("grpo")(mb.mask, mb.rewards, pairs=mb.pairs, bias=0.1) for mb in step)

Each loss lives in its own module exposing `loss(inputs, *, hparams...)` and
`normalizer(mask, rewards, pairs=None, **hparams)`; see docs/losses.md.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from types import ModuleType

import torch

from losses import dft, dpo, grpo, rft, rift, sft
from losses.base import LossInputError, LossInputs, UnknownLossError, merge_stats

__all__ = ["LossInputs", "LossInputError", "UnknownLossError", "get", "get_normalizer", "names",
           "hyperparameters", "rows_that_count", "merge_stats"]

LossFn = Callable[..., tuple[torch.Tensor, dict]]
NormalizerFn = Callable[..., float]

_MODULES: dict[str, ModuleType] = {"sft": sft, "rft": rft, "dft": dft, "rift": rift, "grpo": grpo,
                                   "dpo": dpo}


def names() -> tuple[str, ...]:
    """Registered loss names."""
    return tuple(_MODULES)


def _module(name: str) -> ModuleType:
    if name not in _MODULES:
        raise UnknownLossError(f"unknown loss {name!r}; valid names: {', '.join(_MODULES)}", field="loss")
    return _MODULES[name]


@functools.cache
def hyperparameters(name: str) -> dict[str, object]:
    """{hyperparameter: default} accepted by loss `name`."""
    params = inspect.signature(_module(name).loss).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_names(name: str, hparams: dict) -> None:
    unknown = sorted(set(hparams) - set(hyperparameters(name)))
    if unknown:
        valid = ", ".join(hyperparameters(name)) or "none"
        raise LossInputError(f"unknown hyperparameter(s) {', '.join(unknown)} for loss '{name}'; "
                             f"valid: {valid}", field=unknown[0])


def get(name: str) -> LossFn:
    """`fn(inputs: LossInputs, **hparams) -> (scalar loss, stats)`; the loss is already divided by
    `inputs.num_tokens` (the step normaliser). Unknown names raise UnknownLossError (a KeyError)."""
    loss_fn = _module(name).loss

    @functools.wraps(loss_fn)
    def checked(inputs: LossInputs, **hparams: object) -> tuple[torch.Tensor, dict]:
        _check_names(name, hparams)
        return loss_fn(inputs, **hparams)
    return checked


def get_normalizer(name: str) -> NormalizerFn:
    """`fn(mask [N,T], rewards [N], pairs=None, **hparams) -> float`: what one micro-batch adds to the
    step normaliser (tokens, rows or pairs). Takes the same hparams as `get(name)`."""
    normalizer_fn = _module(name).normalizer

    def checked(mask: torch.Tensor, rewards: torch.Tensor, pairs: torch.Tensor | None = None,
                **hparams: object) -> float:
        _check_names(name, hparams)
        return normalizer_fn(mask, rewards, pairs, **hparams)
    checked.__doc__ = normalizer_fn.__doc__
    return checked


def rows_that_count(name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`fn(rewards [N]) -> [N] bool`: the rollouts whose terms can be nonzero, for a loss that ignores
    the others entirely (their loss, normaliser and gradient contributions are exactly 0, so a trainer
    need not forward them); None when every rollout can count. A loss module opts in by defining
    `rows_that_count`."""
    return getattr(_module(name), "rows_that_count", None)
