"""The demo: a tiny Llama that knows two invented languages, fine-tuned on a CPU with the trainer, nothing downloaded.

* :mod:`.run`: ``qlora-kernels demo`` (also ``python -m qlora_kernels.demo``): QLoRA SFT on translation
  instructions, then a DPO stage that teaches a house style, each measured before and after;
* :mod:`.synthetic`: the generator of the two languages, the tokenizer, the data files and the base model
  (``python -m qlora_kernels.demo.synthetic`` rebuilds them);
* ``data/``: what the generator made, shipped: ``tiny_llama/`` (the base model) and the SFT JSONL files.

Nothing in :mod:`qlora_kernels.train` depends on this package.
"""
