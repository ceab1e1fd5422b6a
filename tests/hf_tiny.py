"""Tiny Hugging Face models and a tokenizer built locally (no hub), shared by the PEFT / quantizer / trainer tests.

Sizes: hidden 64 and up, so every weight row holds whole NF4 blocks of 64 (bitsandbytes 0.50.2's CPU kernels mis-decode
blocks that span rows); no dropout anywhere, so train-mode forwards are deterministic.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

VOCAB = 96


def tiny_config(arch: str = "llama"):
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, eos_token_id=1,
                                       bos_token_id=1)
    if arch == "mixtral":  # fused 3-D experts (transformers 5): not linear layers, they stay dense
        return transformers.MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                          max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(arch)


def tiny_tokenizer():
    """One token per printable ASCII character (ids 3-95), <pad> 0, <eos> 1, <unk> 2."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{chr(32 + i): 3 + i for i in range(VOCAB - 3)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def write_tiny(path: str | Path, arch: str = "llama", seed: int = 0) -> nn.Module:
    """A random tiny fp32 model (and the tokenizer) saved to ``path``; returns the model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


def write_bnb_checkpoint(fp_dir: str | Path, out_dir: str | Path) -> Path:
    """``fp_dir`` saved again by transformers + bitsandbytes as an nf4 double-quant checkpoint."""
    import transformers
    from transformers import AutoModelForCausalLM

    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=qcfg, device_map="cpu",
                                                 dtype=torch.float32)
    model.save_pretrained(out_dir)
    tiny_tokenizer().save_pretrained(out_dir)
    return Path(out_dir)


def bnb_model(path: str | Path) -> nn.Module:
    """transformers' own bitsandbytes model of a 4-bit checkpoint, fp32 compute. Train mode: an eval-mode, no-grad
    CPU forward makes bitsandbytes repack into its bf16-absmax CPU layout (other numbers)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32).train()


def ids(batch: int = 2, seq: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize_lora_b(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Non-zero lora_B weights (they start at zero), so that adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA gradients by PEFT's saved name (``base_model.model.`` and the adapter name dropped)."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name and p.grad is not None:
            out[name.replace("base_model.model.", "").replace(".default.", ".")] = p.grad
    return out
