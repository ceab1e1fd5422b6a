"""Memory of a mixture-of-experts model loaded in 4 bits, each way in: the bytes the loaded model holds and the
process's peak RSS while loading, one fresh process per way.

Ways (a random Mixtral-shaped model saved once as bf16 safetensors, loaded in bf16):

* ``load_4bit_model``: ``qlora_kernels.load_4bit_model(dir)`` (linear layers and fused experts in NF4);
* ``from_pretrained``: ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=QLoraKernelsConfig())`` (the
  same);
* ``from_pretrained, experts dense``: the same with ``QLoraKernelsConfig(quantize_experts=False)`` (what this route
  gave before it quantized experts);
* ``bitsandbytes``: ``from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, double
  quant))``, which leaves the experts dense (when bitsandbytes is installed);
* ``bf16``: the dense model.

    python benchmarks/bench_moe_load.py --out bench_out                          # hidden 512, 4 layers, 8 experts
    python benchmarks/bench_moe_load.py --hidden 256 --layers 2 --out bench_out  # quicker

Writes ``moe_load.json`` and ``moe_load.png`` to --out and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

WAYS = ["load_4bit_model", "from_pretrained", "from_pretrained, experts dense", "bitsandbytes", "bf16"]


def write_model(path: Path, args: argparse.Namespace) -> dict:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 2, num_hidden_layers=args.layers,
                           num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                           vocab_size=args.vocab, num_local_experts=args.experts, num_experts_per_tok=2,
                           max_position_embeddings=256)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return {"parameters": n, "expert_parameters": experts}


def load(way: str, path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    if way == "load_4bit_model":
        import qlora_kernels as qk

        return qk.load_4bit_model(path, dtype=torch.bfloat16)
    if way.startswith("from_pretrained"):
        from qlora_kernels.hf import QLoraKernelsConfig

        cfg = QLoraKernelsConfig(quantize_experts=way == "from_pretrained")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16)
    if way == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16,
                                                    device_map="cpu")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)


def child(way: str, path: Path) -> None:
    import torch  # noqa: F401  (the import's own memory is the baseline)
    import transformers  # noqa: F401

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    model = load(way, path)
    seconds = time.perf_counter() - t0
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    held = sum(t.numel() * t.element_size() for t in tensors)
    experts = type(model.get_submodule("model.layers.0.mlp.experts")).__name__
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"way": way, "model_mib": held / 2**20, "peak_rss_mib": peak,
                                  "added_rss_mib": peak - base, "load_s": seconds, "experts_module": experts}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--child", nargs=2, metavar=("WAY", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return 0
    from _common import environment, pyplot

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shape = write_model(Path(tmp), args)
        for way in WAYS:
            run = subprocess.run([sys.executable, __file__, "--child", way, tmp], capture_output=True, text=True)
            line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{way}: not measured ({tail})", file=sys.stderr)
                continue
            rows.append(json.loads(line[len("RESULT "):]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"environment": environment("cpu"), "model": {**vars(args), **shape}, "rows": rows}
    result["model"].pop("child")
    (out / "moe_load.json").write_text(json.dumps(result, indent=2) + "\n")
    plt = pyplot()
    if plt is not None and rows:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.barh([r["way"] for r in rows], [r["model_mib"] for r in rows])
        ax.set_xlabel("MiB held by the loaded model")
        ax.set_title(f"Mixtral-shaped, hidden {args.hidden}, {args.layers} layers, {args.experts} experts")
        fig.tight_layout()
        fig.savefig(out / "moe_load.png", dpi=120)
    print(f"\nMixtral-shaped model: hidden {args.hidden}, {args.layers} layers, {args.experts} experts, "
          f"{shape['parameters'] / 1e6:.1f} M parameters ({shape['expert_parameters'] / 1e6:.1f} M in experts), bf16")
    print(f"{'way':32} {'experts':>16} {'model MiB':>10} {'peak RSS MiB':>13} {'added RSS MiB':>14} {'load s':>7}")
    for r in rows:
        print(f"{r['way']:32} {r['experts_module']:>16} {r['model_mib']:10.1f} {r['peak_rss_mib']:13.0f} "
              f"{r['added_rss_mib']:14.0f} {r['load_s']:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
