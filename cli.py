"""Command line: thin wrappers over engine/, losses/, analysis/ and triton_kernels/.

Every input problem surfaces as one line `error: <file>:<line>: field '<f>': <what>` and exit code 2.
"""
from __future__ import annotations

import sys

import click

from engine.errors import EngineError


class EngineGroup(click.Group):
    """Turns EngineError (bad user input) into one clear message and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EngineError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=EngineGroup)
def main() -> None:
    """LoRA post-training engine: train, rollout, eval, analyze, profile."""


if __name__ == "__main__":
    main()
