"""End to end: QLoRA training steps of a Llama-shaped model, qlora_kernels' trainer vs transformers + PEFT +
bitsandbytes, same settings, in one run: tokens/s and peak memory, on uniform or on ragged data.

    python benchmarks/bench_e2e.py --out bench_out/e2e                 # GPU: the 1B and 8B shapes, batch 4 x 2048
    python benchmarks/bench_e2e.py --shapes 8b --out bench_out/e2e     # one shape
    python benchmarks/bench_e2e.py --data ragged --shapes 1b --out bench_out/e2e   # ragged lengths, each its best
    python benchmarks/bench_e2e.py --quick --data uniform,ragged --out bench_out/e2e  # CPU smoke run of both modes
    python benchmarks/bench_e2e.py --cpu --shapes small --data ragged --repeats 3 --out bench_out/e2e  # CPU numbers
    python benchmarks/bench_e2e.py --multi-gpu --shapes 8b --out bench_out/e2e   # N GPUs: DDP vs FSDP2 per rank
    python benchmarks/bench_e2e.py --multi-gpu --cpu --nproc 2 --out bench_out/e2e  # its CPU rehearsal (gloo)

The model is ``LlamaForCausalLM`` built from a config (random weights, seeded, the same bf16 weights for both
providers, so their 4-bit codes are identical): ``1b`` has Llama-3.2-1B's shape (16 layers, width 2048, MLP
8192, 32/8 heads), ``8b`` Llama-3-8B's (32 layers, 4096, 14336, 32/8), both with a 128,256-token vocabulary and
untied embeddings (as the measurements in docs/PERFORMANCE.md); ``small`` (4 layers, 256, 688, 8/4 heads, 8,192
tokens) and ``quick`` (2 layers, 64) are for the CPU. LoRA r = 16, alpha = 16, no dropout, on all seven
projections (q, k, v, o, gate, up, down); gradient checkpointing (non-reentrant); bf16 autocast over bf16
frozen weights on a GPU (fp32 on the CPU); gradient clipping at 1.0.

Data (``--data``, comma separated; each mode writes its own file):

* ``uniform`` (``e2e.json``): batch 4 x 2048 random tokens, every token a target, one micro-batch a step.
* ``ragged`` (``e2e_ragged.json``): example lengths drawn from a log-normal distribution (median 300 tokens
  at ``--seq-len`` 2048, scaled with it; sigma 1: a long tail, cut at ``--seq-len``), seeded; the first quarter
  of each example is its prompt (not a target). A step is one optimizer step over the next ``--step-examples``
  examples (the same examples for every provider), which each provider splits its own best way, micro-batches
  of at most ``--batch`` x ``--seq-len`` token slots, gradients accumulated, the loss the mean over the step's
  target tokens:

  * ``qlora_kernels``: sample packing, as the trainer's ``sample_packing: true`` (rows of ``--seq-len`` by the
    trainer's packer, ``--batch`` rows a micro-batch, position ids restarting per example);
  * ``hf_peft_bnb``: padding (``--batch`` examples a micro-batch, padded to the longest), HF Trainer's default;
  * ``hf_peft_bnb_padfree``: TRL's padding-free collator (``DataCollatorForLanguageModeling(padding_free=True)``:
    ``--batch`` examples flattened into one row with restarting position ids), where TRL is installed;
  * ``qlora_kernels_padded`` (not run unless named in ``--providers``): ours with padding, to separate the
    gain of packing from the rest.

  Tokens/s count *real* tokens (no padding); ``slot eff.`` is real tokens / token slots computed.

Providers:

* ``qlora_kernels``: ``apply_qlora`` (NF4, blocksize 64, double quant; ``--fused-mlp``: the fused QLoRA MLP,
  ``fuse_qlora_mlps``; ``--activation-offloading``: the trainer's offloading with checkpointing, the layer inputs
  in host memory), and the step the trainer runs (``qlora_kernels.train``): ``model_loss`` (decoder, then the
  chunked cross-entropy over the hidden states: no full-vocabulary logits), backward, clipping, then the
  configured optimizer (default the trainer's ``paged_adamw``: ``qlora_kernels.PagedAdamW``).
* ``hf_peft_bnb``: the projections replaced by ``bitsandbytes.nn.Linear4bit`` (nf4, compress_statistics,
  bf16 compute), ``peft.get_peft_model`` with the same ``LoraConfig``, ``model(input_ids, labels=...).loss``
  (full logits, upcast to fp32 by transformers; ``num_items_in_batch``: the step's target count), torch's
  fused AdamW (as the anchors were measured).

Timing: a few warm-up steps (optimizer states allocated), then ``--steps`` synchronized steps: uniform data
reports their median, ragged data (steps of different sizes, the same steps for every provider) the real
tokens and the steps of all of them over their total time (each step's time is kept in the row).
Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` over those steps, counting the weights, adapters,
optimizer states, activations and everything made on the way (``weights`` is what the model holds before the
first step); on the CPU the peak resident set size over those steps (each provider in a process of its own,
its peak reset after the model is built: Linux ``/proc/self/clear_refs``), ``weights`` its resident size then.
``--repeats N`` measures every provider N times, interleaved, and reports medians (a shared machine is noisy).
Prints a table last; writes ``e2e.json`` / ``e2e_ragged.json`` to ``--out``. Timing never decides a test.

N GPUs (``--multi-gpu``, ``e2e_multi_gpu.json``): the trainer's two ways over ``--nproc`` GPUs (default: all
visible), each under ``torchrun``: ``ddp`` (the whole 4-bit model on every rank, gradients all-reduced) and
``fsdp`` (``fsdp: true``: each block one FSDP2 unit, NF4 tensors and adapters sharded, :mod:`qlora_kernels.train.fsdp`),
both ``apply_qlora`` as above, checkpointing, PagedAdamW and the trainer's step (the loss over the global target
count, clipping over all shards), uniform data, ``--batch`` x ``--seq-len`` per rank. Per mode: tokens/s of the
whole job (all ranks' tokens over the median step) and per GPU, and per rank the peak memory over the timed steps
(``max_memory_allocated``), the memory after the build and the NF4 bytes held. With fewer than two GPUs it says
that it needs more and measures nothing; ``--cpu`` rehearses the same code over gloo processes (quick shape).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ResultFile, environment, load_bnb  # noqa: E402  (puts the repository on sys.path too)

import qlora_kernels as qk  # noqa: E402
from qlora_kernels.train.components import autocast, enable_checkpointing  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8192),
    "quick": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512),
}
# transformers + PEFT + bitsandbytes on an H200 (docs/PERFORMANCE.md): tokens/s, peak GiB; and the targets
ANCHORS_H200 = {"1b": (26253, 14.0), "8b": (6367, 19.8)}
TARGET_SPEEDUP, TARGET_MEMORY = 1.3, 0.7
PROVIDERS = ("qlora_kernels", "hf_peft_bnb")
RAGGED_PROVIDERS = ("qlora_kernels", "hf_peft_bnb", "hf_peft_bnb_padfree")
EXTRA_PROVIDERS = ("qlora_kernels_padded",)
DATA_MODES = ("uniform", "ragged")
RESULT_FILES = {"uniform": "e2e.json", "ragged": "e2e_ragged.json"}
SETTINGS = {"qlora_kernels": "packed", "qlora_kernels_padded": "padded", "hf_peft_bnb": "padded",
            "hf_peft_bnb_padfree": "padding-free"}  # in ragged mode
MEDIAN_AT_2048, SIGMA, MIN_LEN = 300, 1.0, 8  # the ragged lengths: log-normal, median scaled with --seq-len


def llama_config(shape: str, seq_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq_len, 2048), rms_norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=False, attn_implementation="sdpa",
                       bos_token_id=1, eos_token_id=2)


def build_dense(shape: str, seq_len: int, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    """The random-weight Llama in ``dtype`` on ``device`` (identical for a given seed)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(shape, seq_len))
    finally:
        torch.set_default_dtype(old)
    model.config.use_cache = False
    return model


# --------------------------------------------------------------------------- data


def ragged_lengths(n: int, seq_len: int, seed: int) -> list[int]:
    """``n`` example lengths, log-normal (median 300 at seq_len 2048, scaled with it; sigma 1), in [8, seq_len]."""
    g = torch.Generator().manual_seed(seed)
    median = MEDIAN_AT_2048 * seq_len / 2048
    z = torch.randn(n, generator=g, dtype=torch.float64)
    return (median * torch.exp(SIGMA * z)).round().clamp(MIN_LEN, seq_len).long().tolist()


def ragged_examples(n: int, seq_len: int, vocab: int, seed: int) -> list[Any]:
    """Random-token examples of :func:`ragged_lengths`; the first quarter of each is its prompt (label -100)."""
    from qlora_kernels.train.data import Example

    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for i, n_tok in enumerate(ragged_lengths(n, seq_len, seed)):
        ids = torch.randint(0, vocab, (n_tok,), generator=g).tolist()
        prompt = n_tok // 4
        out.append(Example(ids, [-100] * prompt + ids[prompt:], f"ragged:{i}"))
    return out


def step_batches(provider: str, examples: list[Any], batch: int, seq_len: int, seed: int) -> list[dict[str, Any]]:
    """The micro-batches a provider makes of one step's examples (its best setting, see the module docstring)."""
    from qlora_kernels.train.data import collate, collate_packed
    from qlora_kernels.train.packing import pack_bins

    if provider == "qlora_kernels":
        rows = pack_bins([len(e.input_ids) for e in examples], seq_len, seed)
        rows = [[examples[i] for i in r] for r in rows]
        return [collate_packed(rows[s:s + batch], 0) for s in range(0, len(rows), batch)]
    parts = [examples[s:s + batch] for s in range(0, len(examples), batch)]
    if provider == "hf_peft_bnb_padfree":
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
        out = []
        for part in parts:
            b = collator([{"input_ids": e.input_ids, "labels": e.labels} for e in part])
            out.append({"input_ids": b["input_ids"], "labels": b["labels"], "position_ids": b["position_ids"],
                        "attention_mask": torch.ones_like(b["input_ids"])})  # the mask only counts real tokens
        return out
    return [collate(part, 0) for part in parts]


def uniform_batches(batch: int, seq_len: int, vocab: int, seed: int) -> list[dict[str, Any]]:
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]


def targets(batches: list[dict[str, Any]]) -> int:
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


# --------------------------------------------------------------------------- providers


class Ours:
    """qlora_kernels: ``apply_qlora`` and the trainer's step (``model_loss`` with the chunked cross-entropy)."""

    def __init__(self, dense: nn.Module, args, amp: torch.dtype | None) -> None:
        from qlora_kernels.train.loss import model_loss

        self.model = qk.apply_qlora(dense, r=args.r, lora_alpha=args.r, lora_dropout=0.0,
                                    target_modules=PROJECTIONS, blocksize=64, double_quant=True)
        if args.fused_mlp:
            from qlora_kernels.nn.fused_mlp import fuse_qlora_mlps

            self.fused = fuse_qlora_mlps(self.model)
        enable_checkpointing(self.model)
        self.offloader = None
        if args.activation_offloading:
            from qlora_kernels.train.offload import ActivationOffloader

            self.offloader = ActivationOffloader(next(self.model.parameters()).device).attach(self.model)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        kw = dict(lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        if args.optimizer == "paged_adamw":
            self.opt = qk.PagedAdamW(self.params, **kw)
        else:
            self.opt = torch.optim.AdamW(self.params, fused=self.params[0].is_cuda, **kw)
        self.amp, self.loss_fn = amp, model_loss

    def step(self, batches: list[dict[str, torch.Tensor]], n: int) -> float:
        total = 0.0
        for b in batches:
            extra = (b["position_ids"],) if "position_ids" in b else ()
            with autocast(b["input_ids"].device, self.amp):
                s, _ = self.loss_fn(self.model, b["input_ids"], b["attention_mask"], b["labels"], None, *extra)
            loss = s / max(1, n)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


class HFPeftBnb:
    """transformers + PEFT + bitsandbytes: ``Linear4bit`` (nf4, double quant), ``get_peft_model``, ``.loss``."""

    def __init__(self, dense: nn.Module, args, amp: torch.dtype | None) -> None:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model

        compute = amp or torch.float32
        for name, lin in list(dense.named_modules()):
            if not (isinstance(lin, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS):
                continue
            device = lin.weight.device
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute, compress_statistics=True, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64, module=q)
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
            q = q.to(device)  # quantizes the weight
            parent, child = name.rsplit(".", 1)
            setattr(dense.get_submodule(parent), child, q)
            del lin
        cfg = LoraConfig(r=args.r, lora_alpha=args.r, lora_dropout=0.0, target_modules=PROJECTIONS, bias="none",
                         task_type="CAUSAL_LM")
        self.model = get_peft_model(dense, cfg)
        enable_checkpointing(self.model)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                     fused=self.params[0].is_cuda)
        self.amp = amp

    def step(self, batches: list[dict[str, torch.Tensor]], n: int) -> float:
        total = 0.0
        for b in batches:
            kw = ({"position_ids": b["position_ids"]} if "position_ids" in b  # padding-free: no 2-D mask
                  else {"attention_mask": b["attention_mask"]})
            with autocast(b["input_ids"].device, self.amp):
                loss = self.model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False,
                                  num_items_in_batch=n, **kw).loss
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


RUNNERS = {"qlora_kernels": Ours, "qlora_kernels_padded": Ours, "hf_peft_bnb": HFPeftBnb,
           "hf_peft_bnb_padfree": HFPeftBnb}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- host memory (CPU runs)


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size to its current one (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """The peak resident set size of this process (since :func:`reset_peak_rss`), MiB."""
    hwm = _status_kib("VmHWM")
    if hwm is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return hwm / 1024


# --------------------------------------------------------------------------- N GPUs: DDP vs FSDP2


MULTI_MODES = ("ddp", "fsdp")
MULTI_FILE = "e2e_multi_gpu.json"


def dist_child_main(spec_json: str) -> int:
    """One rank of a ``--multi-gpu`` measurement (under torchrun): build, warm up, time; rank 0 prints the row."""
    from qlora_kernels.nn.nf4_storage import resident_nf4_bytes
    from qlora_kernels.train import distributed as dp
    from qlora_kernels.train import fsdp
    from qlora_kernels.train.config import TrainConfig
    from qlora_kernels.train.loss import model_loss

    spec = json.loads(spec_json)
    args = argparse.Namespace(**spec)
    want = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    ctx = dp.init_distributed(want.type)
    device = dp.rank_device(want, ctx)
    amp = torch.bfloat16 if device.type == "cuda" else None
    shape, mode, B, T = spec["shape"], spec["mode"], args.batch, args.seq_len
    try:
        t0 = time.perf_counter()
        model = qk.apply_qlora(build_dense(shape, T, amp or torch.float32, device, args.seed), r=args.r,
                               lora_alpha=args.r, lora_dropout=0.0, target_modules=PROJECTIONS, blocksize=64,
                               double_quant=True)
        if mode == "fsdp":  # the trainer's sharding of a given model (its blocks, NF4 as parameters, fully_shard)
            cfg = TrainConfig(base_model="-", datasets=[], output_dir=str(Path(args.out) / f"fsdp_{shape}"),
                              fsdp=True, lora_target_modules=PROJECTIONS)
            model, _, _ = fsdp.build_model(cfg, device, ctx, model)
        enable_checkpointing(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = qk.PagedAdamW(params, lr=2e-4)
        runner = dp.wrap_model(model, ctx, device, fsdp=mode == "fsdp")
        _free(device)
        _sync(device)
        build_s = time.perf_counter() - t0
        weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else (_status_kib("VmRSS") or 0) * 1024
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak_rss()
        batch = {k: v.to(device) for k, v in uniform_batches(B, T, SHAPES[shape]["vocab_size"],
                                                             args.seed + ctx.rank)[0].items()}
        n = int(dp.all_reduce_sum([targets([batch])], ctx, device)[0])
        times, losses = [], []
        for i in range(args.warmup + args.steps):
            _sync(device)
            t = time.perf_counter()
            with autocast(device, amp):
                s, _ = runner(model_loss, batch["input_ids"], batch["attention_mask"], batch["labels"], None)
            (s / n * ctx.world_size).backward()  # the trainer's normalization (DDP / FSDP2 average over ranks)
            dp.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(dp.all_reduce_sum(s.detach().float().reshape(1), ctx, device)[0]) / n)
            _sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_mib() * 2**20
        mine = [peak, weights, resident_nf4_bytes(model)]
        every = dp.all_reduce_sum([v if r == ctx.rank else 0.0 for v in mine for r in range(ctx.world_size)], ctx,
                                  device).reshape(3, ctx.world_size).tolist()
        step_s = statistics.median(times)
        row = dict(mode=mode, shape=shape, world_size=ctx.world_size, backend=ctx.backend, batch_per_rank=B,
                   seq_len=T, r=args.r, build_s=round(build_s, 2), step_ms=step_s * 1e3,
                   tokens_per_s=ctx.world_size * B * T / step_s, tokens_per_s_per_rank=B * T / step_s,
                   peak_gib_per_rank=[v / 2**30 for v in every[0]], weights_gib_per_rank=[v / 2**30 for v in every[1]],
                   nf4_gib_per_rank=[v / 2**30 for v in every[2]], first_loss=losses[0], last_loss=losses[-1],
                   peak_is="max_memory_allocated" if device.type == "cuda" else "rss")
        if ctx.is_main:
            print(json.dumps(row), flush=True)
    finally:
        dp.teardown(ctx)
    return 0


def multi_gpu_main(args, out: Path) -> int:
    """``--multi-gpu``: DDP vs FSDP2 over N GPUs, each in its own torchrun; says so and measures nothing on < 2."""
    cuda = torch.cuda.is_available() and not args.cpu
    have = torch.cuda.device_count() if cuda else 0
    nproc = args.nproc or (have if cuda else 2)
    device = torch.device("cuda" if cuda else "cpu")
    env = {**environment(device), "gpus_visible": have, "nproc": nproc, "rehearsal_on_cpu": not cuda}
    res = ResultFile(out / MULTI_FILE, env=env, rows=[])
    if not cuda and not args.cpu:
        why = "the multi-GPU mode needs at least 2 GPUs; torch sees none (pass --cpu for a CPU rehearsal over gloo)"
    elif cuda and (have < 2 or nproc < 2 or nproc > have):
        why = (f"the multi-GPU mode needs at least 2 GPUs (and --nproc <= the GPUs visible); this machine has {have}"
               f" visible, --nproc {nproc}: nothing measured")
    else:
        why = None
    if why is not None:
        res.set(skipped=why)
        res.done()
        print(why)
        print(f"wrote {out / MULTI_FILE}")
        return 0
    quick = not cuda or args.quick
    shapes = ["quick"] if quick else args.shapes.split(",")
    batch, seq_len = args.batch or (2 if quick else 4), args.seq_len or (64 if quick else 2048)
    steps, warmup = (min(args.steps, 3), 1) if quick else (args.steps, args.warmup)
    for shape in shapes:
        for mode in MULTI_MODES:
            spec = {**vars(args), "shape": shape, "mode": mode, "batch": batch, "seq_len": seq_len, "steps": steps,
                    "warmup": warmup, "out": str(out)}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(Path(__file__).resolve()), "--dist-child", json.dumps(spec)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            if proc.returncode != 0 or not lines:
                row = dict(mode=mode, shape=shape, world_size=nproc,
                           error=f"torchrun exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
            else:
                row = json.loads(lines[-1])
            res.add("rows", row)
            print(f"  {shape:5s} {mode:5s} x{nproc} " + (f"{row['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in row
                                                        else row["error"][:200]), file=sys.stderr, flush=True)
    res.done()
    print(multi_table(res.data))
    print(f"wrote {out / MULTI_FILE}")
    return 0 if all("error" not in r for r in res.data["rows"]) else 1


def multi_table(result: dict[str, Any]) -> str:
    """DDP vs FSDP2 per shape: the job's and each GPU's tokens/s, each rank's peak memory, FSDP2 relative to DDP."""
    env = result["env"]
    lines = [f"QLoRA over {env['nproc']} {'CPU processes (gloo rehearsal)' if env['rehearsal_on_cpu'] else 'GPUs'} "
             f"({env['device']}, torch {env['torch']}): DDP replicates the 4-bit model, FSDP2 shards it",
             f"{'shape':6s} {'mode':5s} {'tokens/s':>10s} {'per rank':>9s} {'peak GiB/rank (max)':>20s} "
             f"{'at build':>9s} {'NF4 GiB/rank':>12s} {'loss@1':>8s} {'speed x':>8s} {'mem x':>6s}"]
    ddp = {r["shape"]: r for r in result["rows"] if r.get("mode") == "ddp" and "tokens_per_s" in r}
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['shape']:6s} {r['mode']:5s} error: {r['error'][:90]}")
            continue
        b = ddp.get(r["shape"])
        peak = max(r["peak_gib_per_rank"])
        speed = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else "-"
        mem = f"{peak / max(b['peak_gib_per_rank']):.2f}" if b else "-"
        lines.append(f"{r['shape']:6s} {r['mode']:5s} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s_per_rank']:>9,.0f} "
                     f"{peak:>20.3f} {max(r['weights_gib_per_rank']):>9.3f} {max(r['nf4_gib_per_rank']):>12.4f} "
                     f"{r['first_loss']:>8.4f} {speed:>8s} {mem:>6s}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- measuring


def measure(provider: str, shape: str, data: str, args, device: torch.device) -> dict[str, Any]:
    """Build the provider's model for ``shape``, run warm-up and timed steps on ``data``; the row of the table."""
    amp = torch.bfloat16 if device.type == "cuda" else None
    dtype = amp or torch.float32
    B, T = args.batch, args.seq_len
    vocab = SHAPES[shape]["vocab_size"]
    n_steps = args.warmup + args.steps
    if data == "ragged":
        K = args.step_examples
        pool = ragged_examples(K * n_steps, T, vocab, args.seed)
        plans = [step_batches(provider, pool[i * K:(i + 1) * K], B, T, args.seed + i) for i in range(n_steps)]
    else:
        plans = [uniform_batches(B, T, vocab, args.seed)] * n_steps
    t0 = time.perf_counter()
    dense = build_dense(shape, T, dtype, device, args.seed)
    runner = RUNNERS[provider](dense, args, amp)
    del dense
    _free(device)
    _sync(device)
    build_s = time.perf_counter() - t0
    row: dict[str, Any] = dict(provider=provider, shape=shape, data=data, batch=B, seq_len=T, r=args.r,
                               build_s=round(build_s, 2), trainable=sum(p.numel() for p in runner.params))
    if data == "ragged":
        row.update(setting=SETTINGS[provider], step_examples=args.step_examples)
    if isinstance(runner, Ours):
        row["optimizer"] = args.optimizer
        if args.fused_mlp:
            row["fused_mlp"] = runner.fused
        if args.activation_offloading:
            row["activation_offloading"] = True
    else:
        row["optimizer"] = "adamw_torch_fused" if device.type == "cuda" else "adamw_torch"
    if device.type == "cuda":
        row["weights_gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    else:
        row["weights_gib"] = (_status_kib("VmRSS") or 0) / 2**20  # resident size with the model built
        row["peak_is"] = "rss" if reset_peak_rss() else "rss_since_start"
    losses, times, rates = [], [], []
    real = slots = 0
    for i, batches in enumerate(plans):
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        n = targets(batches)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        _sync(device)
        t = time.perf_counter()
        loss = runner.step(batches, n)
        _sync(device)
        if i >= args.warmup:
            dt = time.perf_counter() - t
            times.append(dt)
            rates.append(tokens / dt)
            real += tokens
            slots += sum(b["input_ids"].numel() for b in batches)
        losses.append(float(loss))
    step_s = statistics.median(times)
    if data == "ragged":  # steps of different sizes: the timed steps' real tokens over their total time
        row.update(steps_per_s=len(times) / sum(times), tokens_per_s=real / sum(times),
                   step_times_s=[round(t, 4) for t in times])
    else:  # equal steps: the median step
        row.update(steps_per_s=1 / step_s, tokens_per_s=statistics.median(rates))
    row.update(step_ms=step_s * 1e3, slot_efficiency=real / max(1, slots), first_loss=losses[0], last_loss=losses[-1])
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        row["peak_gib"] = peak_rss_mib() / 1024
    del runner
    _free(device)
    return row


def measure_in_child(provider: str, shape: str, data: str, args) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process (the CPU's peak RSS is per process); its row."""
    spec = {**vars(args), "provider": provider, "shape": shape, "data": data}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=args.child_timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
    return json.loads(lines[-1])


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    args = argparse.Namespace(**spec)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    print(json.dumps(measure(spec["provider"], spec["shape"], spec["data"], args, device)), flush=True)
    return 0


def combine(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of the medians of repeated rows (every run's tokens/s and peak kept in ``runs``)."""
    if len(rows) == 1:
        return rows[0]
    row = dict(rows[0])
    for key in ("step_ms", "steps_per_s", "tokens_per_s", "slot_efficiency", "peak_gib", "weights_gib", "build_s"):
        if all(key in r for r in rows):
            row[key] = statistics.median(r[key] for r in rows)
    row["runs"] = [{k: r.get(k) for k in ("tokens_per_s", "steps_per_s", "peak_gib")} for r in rows]
    return row


def run(args, out: Path) -> dict[str, dict[str, Any]]:
    """Every data mode, shape and provider (``--repeats`` times, interleaved); ``{data mode: result}``."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    quick = args.quick or (device.type == "cpu" and args.shapes in ("1b,8b", "1b", "8b"))
    given_seq_len = args.seq_len
    if quick:
        args.shapes = "quick"
        args.batch = args.batch or 2
        args.steps, args.warmup = min(args.steps, 3), 1
        args.step_examples = args.step_examples or 8
    else:
        args.batch, args.seq_len = args.batch or 4, args.seq_len or 2048
        args.step_examples = args.step_examples or 16
    isolate = device.type == "cpu" if args.isolate is None else args.isolate
    env = environment(device)
    env["quick"] = quick
    results = {}
    for data in [d for d in args.data.split(",") if d]:
        if data not in DATA_MODES:
            raise SystemExit(f"--data: {data!r} is not one of {', '.join(DATA_MODES)}")
        known = RAGGED_PROVIDERS + EXTRA_PROVIDERS if data == "ragged" else PROVIDERS
        providers = [p for p in (args.providers or ",".join(RAGGED_PROVIDERS if data == "ragged" else PROVIDERS)
                                 ).split(",") if p in known]
        seq_len = given_seq_len or (args.seq_len if not quick else 256 if data == "ragged" else 64)
        run_args = argparse.Namespace(**{**vars(args), "seq_len": seq_len})
        skipped = {}
        if any(p.startswith("hf_peft_bnb") for p in providers):
            bnb, why = load_bnb(device)
            if bnb is None:
                skipped.update({p: why for p in providers if p.startswith("hf_peft_bnb")})
        if "hf_peft_bnb_padfree" in providers:
            try:
                from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: F401
            except Exception as exc:  # TRL not installed, or without the padding-free collator
                skipped["hf_peft_bnb_padfree"] = f"TRL's padding-free collator: {type(exc).__name__}: {exc}"[:300]
        providers = [p for p in providers if p not in skipped]
        res = ResultFile(out / RESULT_FILES[data], env={**env, "data": data, "isolated": isolate}, skipped=skipped,
                         rows=[], targets=dict(speedup=TARGET_SPEEDUP, memory=TARGET_MEMORY), anchors_h200=ANCHORS_H200)
        for shape in args.shapes.split(","):
            runs: dict[str, list[dict[str, Any]]] = {p: [] for p in providers}
            for rep in range(args.repeats):
                for provider in providers:
                    try:
                        row = (measure_in_child(provider, shape, data, run_args) if isolate
                               else measure(provider, shape, data, run_args, device))
                    except Exception as exc:  # one failing provider must not hide the others
                        row = dict(provider=provider, shape=shape, data=data,
                                   error=f"{type(exc).__name__}: {exc}"[:500])
                        _free(device)
                    runs[provider].append(row)
                    print(f"  {data:7s} {shape:5s} {provider:20s} run {rep + 1}/{args.repeats} "
                          + (f"{row['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in row else row["error"]),
                          file=sys.stderr, flush=True)
            for provider in providers:
                good = [r for r in runs[provider] if "error" not in r]
                res.add("rows", combine(good) if good else runs[provider][0])
        res.done()
        results[data] = res.data
    return results


def table(result: dict[str, Any]) -> str:
    """The summary table: one line per shape and provider, ours relative to transformers + PEFT + bnb (padded)."""
    rows = result["rows"]
    env = result["env"]
    ragged = env.get("data") == "ragged"
    gpu = env.get("cuda") is not None and "peak_is" not in (rows[0] if rows else {})
    base = {r["shape"]: r for r in rows if r["provider"] == "hf_peft_bnb" and "tokens_per_s" in r}
    peak = "peak GiB" if gpu else "RSS GiB"
    lines = [f"end-to-end QLoRA steps on {env['device']} (torch {env['torch']}), {env.get('data', 'uniform')} data; "
             f"targets vs hf_peft_bnb: >= {TARGET_SPEEDUP}x tokens/s, <= {TARGET_MEMORY}x peak memory"
             + ("; tokens are real tokens (no padding)" if ragged else ""),
             f"{'shape':6s} {'provider':20s} {'setting':12s} {'tokens/s':>10s} {'steps/s':>8s} {'slot eff':>8s} "
             f"{peak:>8s} {'at build':>8s} {'loss@1':>8s} {'speed x':>8s} {'mem x':>6s}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['shape']:6s} {r['provider']:20s} error: {r['error'][:90]}")
            continue
        b = base.get(r["shape"])
        speed = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else "-"
        mem = f"{r['peak_gib'] / b['peak_gib']:.2f}" if b and "peak_gib" in r and b.get("peak_gib") else "-"
        pk = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        weights = f"{r['weights_gib']:.2f}" if "weights_gib" in r else "-"
        setting = r.get("setting", "uniform") + ("+fused" if r.get("fused_mlp") else "") + (
            "+offload" if r.get("activation_offloading") else "")
        lines.append(f"{r['shape']:6s} {r['provider']:20s} {setting:12s} {r['tokens_per_s']:>10,.0f} "
                     f"{r['steps_per_s']:>8.3f} {r['slot_efficiency']:>8.2f} {pk:>8s} {weights:>8s} "
                     f"{r['first_loss']:>8.4f} {speed:>8s} {mem:>6s}")
    lines += [f"skipped: {p}: {why}" for p, why in result.get("skipped", {}).items()]
    if not ragged:
        for shape, (tps, gib) in ANCHORS_H200.items():
            if shape in base:
                lines.append(f"{shape:6s} {'anchor H200':20s} {'hf_peft_bnb':12s} {tps:>10,d} {'':>8s} {'':>8s} "
                             f"{gib:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/e2e", help="directory for e2e.json / e2e_ragged.json")
    p.add_argument("--quick", action="store_true", help="a tiny Llama (implied on the CPU for the 1b/8b shapes)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
    p.add_argument("--data", default="uniform", help="comma separated: " + ", ".join(DATA_MODES))
    p.add_argument("--shapes", default="1b,8b", help="comma separated: " + ", ".join(SHAPES))
    p.add_argument("--providers", default=None, help="comma separated, of: " + ", ".join(
        dict.fromkeys(PROVIDERS + RAGGED_PROVIDERS + EXTRA_PROVIDERS)) + " (default: the data mode's)")
    p.add_argument("--batch", type=int, default=None, help="sequences (ragged: packed rows or examples) per "
                   "micro-batch (default 4; 2 in quick mode)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence / row (default 2048; quick: 64 "
                   "uniform, 256 ragged)")
    p.add_argument("--step-examples", type=int, default=None, help="ragged: examples per optimizer step (default 16;"
                   " 8 in quick mode)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = r)")
    p.add_argument("--optimizer", choices=["paged_adamw", "adamw_torch"], default="paged_adamw",
                   help="qlora_kernels' optimizer (the trainer's default: paged_adamw)")
    p.add_argument("--fused-mlp", action="store_true", help="qlora_kernels: the fused QLoRA MLP (trainer key "
                   "fused_mlp: true)")
    p.add_argument("--activation-offloading", action="store_true", help="qlora_kernels: checkpointing with the layer "
                   "inputs offloaded to host memory (trainer key gradient_checkpointing: offload)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=1, help="measure every provider this many times, interleaved, "
                   "and report medians")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each measurement in a process of its own (default: on the CPU, for its peak RSS)")
    p.add_argument("--child-timeout", type=float, default=3600, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--multi-gpu", action="store_true", help=f"DDP vs FSDP2 over --nproc GPUs ({MULTI_FILE}; with "
                   "--cpu: a rehearsal over gloo processes)")
    p.add_argument("--nproc", type=int, default=None, help="--multi-gpu: processes / GPUs (default: all visible; 2 on "
                   "the CPU)")
    p.add_argument("--dist-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.child is not None:
        return child_main(args.child)
    if args.dist_child is not None:
        return dist_child_main(args.dist_child)
    out = Path(args.out)
    if args.multi_gpu:
        return multi_gpu_main(args, out)
    results = run(args, out)
    ok = True
    for data, result in results.items():
        print(table(result))
        print(f"wrote {out / RESULT_FILES[data]}")
        ok = ok and all("error" not in r for r in result["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
