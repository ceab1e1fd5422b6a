"""The config keys of the SFT objective (:mod:`.sft`; the default, ``objective: sft``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..schema import setting

PROMPT_TEMPLATES = ("alpaca", "chatml", "tokenizer_default")


@dataclass
class SFTKeys:
    """The keys of the SFT objective: how SFT rows become prompt and target tokens."""

    prompt_template: str | None = setting(None, choices=PROMPT_TEMPLATES, help="default: alpaca for alpaca rows, "
                                          "chatml for chat rows")
    train_on_inputs: bool = setting(False, help="also train on prompt tokens")
