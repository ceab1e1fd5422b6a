"""QLoRA in a plain PyTorch loop with qlora_kernels: no Trainer, no PEFT at training time.

``load_4bit_model`` reads a local model directory into NF4 one tensor at a time, ``apply_qlora`` adds the fused LoRA
layers, ``PagedAdamW`` steps the adapters; ``save_adapter`` writes them in PEFT's format, which PEFT reloads.

    python examples/pytorch_qlora.py                          # a tiny model built here; a CPU, a few seconds
    python examples/pytorch_qlora.py --model PATH --steps 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tiny_model import build_tiny_model
from transformers import AutoTokenizer

import qlora_kernels as qk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local model directory (default: a tiny model built in OUT/base)")
    parser.add_argument("--out", default="outputs/pytorch_qlora", help="output directory")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    out = Path(args.out)
    base = args.model or build_tiny_model(out / "base")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(base)

    model = qk.load_4bit_model(base, dtype=dtype, device=device)        # linear layers in NF4, lm_head dense
    qk.apply_qlora(model, r=8, lora_alpha=16, target_modules="all-linear")  # in place; only lora_A / lora_B train
    opt = qk.PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    batch = tokenizer([f"{w} -> {w[::-1]}" for w in ["cat", "dog", "sun", "map"]], return_tensors="pt").to(device)
    model.train()
    for step in range(args.steps):
        loss = model(**batch, labels=batch.input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}")
    qk.save_adapter(model, out / "adapter")  # adapter_model.safetensors + adapter_config.json

    # PEFT reloads it on a fresh 4-bit load (with qlora_kernels' LoRA layers): the same logits
    import peft

    again = peft.PeftModel.from_pretrained(qk.load_4bit_model(base, dtype=dtype, device=device), out / "adapter",
                                           config=qk.hf.LoraConfig.from_pretrained(out / "adapter")).eval()
    with torch.no_grad():
        diff = (again(**batch).logits - model.eval()(**batch).logits).abs().max().item()
    print(f"adapter in {out / 'adapter'}; PEFT reload: max |logit difference| {diff:g}")


if __name__ == "__main__":
    main()
