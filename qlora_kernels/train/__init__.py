"""The thin trainer: one-YAML supervised fine-tuning with QLoRA (``qlora-kernels train CONFIG.yaml``).

config (validated YAML) -> data (rows -> token ids, completion-only labels) -> model (``load_4bit_model`` +
``apply_qlora``) -> loop (:mod:`.sft`: accumulation, clipping, eval, checkpoints) -> PEFT adapter.
"""

from __future__ import annotations

from .components import TrainingError, build_model
from .config import ConfigError, DatasetConfig, QuantizationConfig, SFTConfig, load_config
from .data import DataError
from .loop import TrainResult, train
from .loss import causal_lm_loss, chunked_cross_entropy

__all__ = [
    "ConfigError", "DataError", "DatasetConfig", "QuantizationConfig", "SFTConfig", "TrainResult", "TrainingError",
    "build_model", "causal_lm_loss", "chunked_cross_entropy", "load_config", "train",
]
