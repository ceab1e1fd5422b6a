"""The schema primitives of the training config: a key's declaration (:func:`setting`) and the ranges of numeric keys.

The config (:mod:`.config`) and each objective's keys (``objectives/<name>_config.py``) declare their keys as
dataclass fields with :func:`setting`: the field's annotation is the key's type, its default the default, and the
metadata carries the allowed values, path checks, range and a one-line help, which validation and
``qlora-kernels train --help`` read.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key: ``lo`` .. ``hi`` (None: unbounded), open or closed at each end.

    A float must also be finite. ``note`` is added to the error message (e.g. what 0 means).
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def __contains__(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else str(x)

        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


POSITIVE = Range(0, lo_open=True)  # > 0
AT_LEAST_0 = Range(0)  # >= 0
AT_LEAST_1 = Range(1)  # >= 1 (counts of steps, examples, tokens)
UNIT = Range(0, 1, hi_open=True)  # [0, 1)


def setting(default: Any = dataclasses.MISSING, *, choices: tuple | None = None, path: str | None = None,
            help: str = "", factory: Any = None, range: Range | None = None) -> Any:
    """A config key as a dataclass field: ``default`` (or ``factory``), the allowed ``choices``, a ``path`` check
    (``"exists"``, ``"dir"``, ``"model_dir"``, ``"checkpoint"``), a numeric ``range`` and the ``help`` line."""
    meta = {"choices": choices, "path": path, "help": help, "range": range}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)
