"""The thin trainer: one-YAML SFT or DPO fine-tuning with QLoRA (``qlora-kernels train CONFIG.yaml``).

config (:mod:`.config`: validated YAML) -> data (:mod:`.data`: rows -> tokenized items -> micro-batches) ->
model (:mod:`.components`: ``load_4bit_model`` + ``apply_qlora``) -> loop (:mod:`.loop`: accumulation,
clipping, eval, checkpoints; the same for every objective) -> PEFT adapter. What is optimized is an
objective (:mod:`.objective`): :mod:`.sft` (token cross-entropy) or :mod:`.dpo` (preference pairs), both
over the chunked output projection of :mod:`.loss`.
"""

from __future__ import annotations

from .components import TrainingError, build_model
from .config import ConfigError, DatasetConfig, QuantizationConfig, SFTConfig, TrainConfig, load_config
from .data import DataError
from .loop import TrainResult, train
from .loss import causal_lm_loss, chunked_cross_entropy

__all__ = [
    "ConfigError", "DataError", "DatasetConfig", "QuantizationConfig", "SFTConfig", "TrainConfig", "TrainResult",
    "TrainingError", "build_model", "causal_lm_loss", "chunked_cross_entropy", "load_config", "train",
]
