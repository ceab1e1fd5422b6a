"""The demo's verifiable reward for its GRPO stage, in TRL's reward-function signature."""

from __future__ import annotations

from typing import Any


def exact_translation(prompts: list[Any], completions: list[str], answer: list[str], **columns: Any) -> list[float]:
    """1.0 where a completion is the row's ``answer`` exactly (after stripping), else 0.0."""
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answer)]
