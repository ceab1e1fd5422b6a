"""QLoRA with transformers and TRL, on qlora_kernels' NF4 layers and fused LoRA kernels.

transformers loads the model straight into NF4 (``quantization_config=QLoraKernelsConfig()``), PEFT puts qlora_kernels'
LoRA layers on it (``qlora_kernels.hf.LoraConfig``, a drop-in for ``peft.LoraConfig``), and TRL trains as usual: SFT
with ``peft_config=``, then DPO from the SFT adapter (TRL's reference model is a frozen copy of that adapter on the
same 4-bit base; given ``peft_config=`` instead, it is the model with its adapters disabled). Every checkpoint and
``save_model`` write PEFT adapters (adapter_model.safetensors + adapter_config.json); the last step reloads one.

    python examples/hf_trl_qlora.py                           # a tiny model built here; a CPU, well under a minute
    python examples/hf_trl_qlora.py --model PATH --steps 200  # a local model directory (with its tokenizer)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel
from tiny_model import build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from qlora_kernels.hf import LoraConfig, QLoraKernelsConfig

# A toy task: answer with the word reversed; DPO prefers the answer in capitals.
WORDS = ["cat", "dog", "sun", "map", "cup", "pen", "box", "key", "owl", "fig", "jam", "net"]


def load(path: str | Path, dtype: torch.dtype):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QLoraKernelsConfig(), dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local model directory (default: a tiny model built in OUT/base)")
    parser.add_argument("--out", default="outputs/hf_trl_qlora", help="output directory")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of each phase")
    args = parser.parse_args()
    out = Path(args.out)
    base = args.model or build_tiny_model(out / "base")
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(base)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(max_steps=args.steps, per_device_train_batch_size=4, learning_rate=2e-3, logging_steps=1,
                  save_steps=max(1, args.steps // 2), report_to=[], use_cpu=not cuda, bf16=cuda)

    # 1. SFT: TRL's SFTTrainer with our LoraConfig as its peft_config
    sft_rows = [{"text": f"{w} -> {w[::-1]}"} for w in WORDS]
    sft = SFTTrainer(model=load(base, dtype), args=SFTConfig(output_dir=str(out / "sft"), max_length=32, **common),
                     train_dataset=Dataset.from_list(sft_rows), processing_class=tokenizer, peft_config=lora)
    sft.train()
    sft.save_model(str(out / "sft" / "final"))
    print("sft: loss", [round(h["loss"], 4) for h in sft.state.log_history if "loss" in h])

    # 2. DPO from the SFT adapter: TRL keeps a frozen copy of it ("ref") as the reference model, on the same 4-bit base
    policy = PeftModel.from_pretrained(load(base, dtype), out / "sft" / "final", is_trainable=True,
                                       config=LoraConfig.from_pretrained(out / "sft" / "final"))
    pairs = [{"prompt": f"{w} -> ", "chosen": w[::-1].upper(), "rejected": w[::-1]} for w in WORDS]
    dpo = DPOTrainer(model=policy, args=DPOConfig(output_dir=str(out / "dpo"), beta=0.1, max_length=32, **common),
                     train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    dpo.train()
    dpo.save_model(str(out / "dpo" / "final"))
    first = next(h for h in dpo.state.log_history if "rewards/chosen" in h)
    print("dpo: first-step rewards chosen / rejected", first["rewards/chosen"], first["rewards/rejected"],
          "| last margin", [h["rewards/margins"] for h in dpo.state.log_history if "rewards/margins" in h][-1])

    # 3. reload the SFT adapter with PEFT onto a fresh 4-bit load: the same logits as the trained model
    again = PeftModel.from_pretrained(load(base, dtype), out / "sft" / "final",
                                      config=LoraConfig.from_pretrained(out / "sft" / "final")).eval()
    ids = tokenizer(["cat -> "], return_tensors="pt").input_ids.to(again.device)
    with torch.no_grad():
        diff = (again(input_ids=ids).logits - sft.model.eval()(input_ids=ids).logits).abs().max().item()
    print(f"reloaded SFT adapter: max |logit difference| {diff:g}; adapters in {out / 'sft' / 'final'}, "
          f"{out / 'dpo' / 'final'}")


if __name__ == "__main__":
    main()
