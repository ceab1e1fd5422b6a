"""Hugging Face integration: put QLoRA layers into a ``transformers`` model, load 4-bit models, merge, adapter files.

* :func:`apply_qlora` swaps linear layers of a model *instance* (``setattr`` on their parents; no class or
  global is patched) for :class:`~qlora_kernels.nn.QLoraLinear` and freezes everything else. Layers a 4-bit
  loader left dense keep their dense weight and get plain LoRA (:class:`DenseLoraLinear`).
* :func:`load_4bit_model` builds a model on the meta device from a local directory and fills it from its
  safetensors files one tensor at a time, with transformers' own key renaming and conversions (its
  checkpoint conversion mapping): bitsandbytes-4bit checkpoints are used as stored (no requantizing),
  full-precision ones are quantized layer by layer.
* :func:`merge_and_unload` turns every adapted or 4-bit layer back into a plain dense layer (``nn.Linear``;
  ``Conv1D`` for GPT-2; the original class for a dense layer with LoRA).
* :func:`save_adapter` / :func:`load_adapter` write and read adapters in PEFT's file format.
* :class:`QLoraKernelsConfig` (:mod:`.quantizer`): ``from_pretrained(path, quantization_config=QLoraKernelsConfig())``,
  transformers' own loader into NF4 (registered with transformers when first imported from here).
* :class:`LoraConfig`, :func:`register_peft_layers`, :class:`NF4LoraLinear` (:mod:`.peft_backend`): PEFT's LoRA on the
  NF4 layers runs the fused kernels (``peft.get_peft_model(model, LoraConfig(...))``); :func:`as_peft_model` makes a
  model :func:`apply_qlora` adapted into that ``PeftModel`` (for transformers' Trainer and TRL).

The modules, each depending only on those above it:

* :mod:`.layers`: which modules are linear layers and of what kind, :class:`DenseLoraLinear`, PEFT's
  name-matching rules, replacing a module by name;
* :mod:`.apply`: :func:`apply_qlora`, :func:`adapters_disabled`, :func:`merge_and_unload`;
* :mod:`.loading`: safetensors checkpoints and :func:`load_4bit_model`;
* :mod:`.adapters`: PEFT adapter files;
* :mod:`.quantizer` (needs transformers) and :mod:`.peft_backend` (needs PEFT), imported on first use of their names.
"""

from __future__ import annotations

from .. import _compat  # noqa: F401  (on import: warns once about an untested dependency version)
from .adapters import OtherBaseModelWarning, load_adapter, save_adapter
from .apply import adapters_disabled, apply_qlora, merge_and_unload
from .layers import DenseLoraLinear, linear_layer_names
from .loading import load_4bit_model

# Names from the modules that need transformers / PEFT, imported when first asked for (``import qlora_kernels`` does not
# import either library).
_LAZY = {
    "QLoraKernelsConfig": "quantizer", "QLoraKernelsHfQuantizer": "quantizer", "bnb_free_config": "quantizer",
    "bnb_quantization_config": "quantizer",
    "LoraConfig": "peft_backend", "NF4LoraLinear": "peft_backend", "PEFT_LAYER_TYPES": "peft_backend",
    "register_peft_layers": "peft_backend", "as_peft_model": "peft_backend",
}

__all__ = [
    "DenseLoraLinear", "OtherBaseModelWarning", "adapters_disabled", "apply_qlora", "linear_layer_names",
    "load_4bit_model", "load_adapter", "merge_and_unload", "save_adapter", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
