"""One error type for bad user input: it says where (file, line, field) and what was expected.

The CLI turns an `EngineError` into a one-line message and exit code 2; nothing else should
reach the user as a traceback for input problems.
"""
from __future__ import annotations

import math
import os


class EngineError(Exception):
    """Bad input: `path:line: field: message`. Raised instead of deep tracebacks."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None,
                 line: int | None = None, field: str | None = None) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path + (f":{self.line}" if self.line is not None else "") + ": "
        elif self.line is not None:
            where = f"line {self.line}: "
        field = f"field '{self.field}': " if self.field else ""
        return f"{where}{field}{self.message}"


def is_finite_number(x: object) -> bool:
    """A JSON number (not a bool) that is a finite float; huge integers are not."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops, the last good checkpoint stays."""
