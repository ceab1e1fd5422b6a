"""A tiny random Llama and a character tokenizer, written to a local directory, for the examples to run anywhere (no
hub, a CPU is enough). ``python examples/tiny_model.py DIR`` writes one; the examples build it when given no model."""

from __future__ import annotations

import sys
from pathlib import Path


def build_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64, vocabulary: <pad>, <eos>, <unk> and the 93 printable ASCII characters) in fp32,
    with its tokenizer, saved to ``path``. Returns the path."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{chr(32 + i): 3 + i for i in range(93)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=128, pad_token_id=0,
                         eos_token_id=1, bos_token_id=None)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


if __name__ == "__main__":
    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "outputs/tiny_model"))
