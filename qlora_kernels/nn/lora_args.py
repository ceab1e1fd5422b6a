"""The LoRA hyper-parameters: one rule for ``r``, ``lora_alpha`` and ``lora_dropout``, and the scaling they give.

Every place that takes them checks them here: :class:`~qlora_kernels.nn.QLoraLinear`,
:class:`~qlora_kernels.hf.DenseLoraLinear`, :func:`~qlora_kernels.apply_qlora` and the ``adapter_config.json``
that :func:`~qlora_kernels.load_adapter` reads (including its ``rank_pattern`` / ``alpha_pattern`` values).
Integral and real types count as they do in :mod:`numbers` (Python's and numpy's ints and floats); a bool is
neither a rank nor a number here.
"""

from __future__ import annotations

import math
import numbers

from ..functional import _check_dropout


def is_lora_rank(value: object) -> bool:
    """Whether ``value`` is a LoRA rank: a positive integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def is_lora_alpha(value: object) -> bool:
    """Whether ``value`` is a LoRA alpha: a finite real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_lora_args(r: object, lora_alpha: object, lora_dropout: object) -> tuple[int, int | float, float]:
    """``(r, lora_alpha, lora_dropout)`` as Python numbers, or ValueError naming the first bad one.

    ``r`` must be a positive integer, ``lora_alpha`` a finite number, ``lora_dropout`` a number in [0, 1)
    (the rule of the functional API's ``dropout_p``).
    """
    if not is_lora_rank(r):
        raise ValueError(f"r must be a positive integer; got {r!r}")
    if not is_lora_alpha(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number; got {lora_alpha!r}")
    dropout = _check_dropout(lora_dropout, "lora_dropout")
    alpha = int(lora_alpha) if isinstance(lora_alpha, numbers.Integral) else float(lora_alpha)
    return int(r), alpha, dropout


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """The factor of the LoRA term: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
    return float(lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r)
