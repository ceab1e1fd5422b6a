"""FSDP2 (``fsdp: true``): ``torchrun --nproc_per_node=2 -m qlora_kernels.train`` on the CPU (gloo) with the 4-bit
weights sharded across the ranks trains the adapters one process trains with the same global batch; each rank holds
half the NF4 bytes, also while loading; a killed run resumes from its sharded checkpoint to the uninterrupted
result, also on another world size; the adapter is PEFT's; plus the loader's block hook, the optimizer on shards,
bitsandbytes-4bit checkpoints, and the errors of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import qlora_kernels as qk
from qlora_kernels.demo.synthetic import instruction_rows, make_languages, save_random_model
from qlora_kernels.hf.layers import linear_modules
from qlora_kernels.hf.loading import BlockHook
from qlora_kernels.nn.nf4_storage import resident_nf4_bytes
from qlora_kernels.train import ConfigError, TrainingError, fsdp, load_config, train
from qlora_kernels.train.distributed import DistContext

from . import bounds

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fsdp")
    model = save_random_model(d / "model", hidden_size=64, num_layers=2)
    rows = instruction_rows(make_languages(), 14, seed=4)
    # 9 train examples: the last global micro-batch of 4 leaves rank 1 without one; 5 eval examples in batches of 2:
    # rank 0 runs 2 eval batches, rank 1 one and a placeholder (each forward of a sharded model is a collective)
    for name, part in (("sft.jsonl", rows[:9]), ("eval.jsonl", rows[9:])):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return {"model": model, "root": d, "sft": d / "sft.jsonl", "eval": d / "eval.jsonl"}


def raw_config(assets, out: Path, **kw) -> dict:
    raw = {"base_model": str(assets["model"]), "output_dir": str(out),
           "datasets": [{"path": str(assets["sft"]), "type": "alpaca"}],
           "test_datasets": [{"path": str(assets["eval"]), "type": "alpaca"}],
           "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "sequence_len": 64, "micro_batch_size": 2,
           "gradient_accumulation_steps": 2, "max_steps": 4, "learning_rate": 1e-2, "warmup_steps": 0,
           "optimizer": "paged_adamw", "max_grad_norm": 1.0, "eval_steps": 4, "save_steps": 2, "seed": 1,
           "progress_bar": False, "fsdp": True}
    raw.update(kw)
    return raw


# --------------------------------------------------------------------------- one process: the parts


def _bnb_checkpoint(float_dir: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from qlora_kernels.hf import QLoraKernelsConfig

    AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=QLoraKernelsConfig()).save_pretrained(out)
    return out


def _mixtral_checkpoint(out: Path) -> Path:
    """A tiny Mixtral saved as transformers 5 saves it: per-expert tensors, fused into 3-D experts when loaded."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=96, num_local_experts=4, num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["float", "bnb4", "mixtral"])
def test_block_hook_loads_block_by_block_and_the_same_tensors(assets, tmp_path, kind):
    path = {"float": lambda: assets["model"], "bnb4": lambda: _bnb_checkpoint(assets["model"], tmp_path / "nf4"),
            "mixtral": lambda: _mixtral_checkpoint(tmp_path / "mixtral")}[kind]()
    whole = qk.load_4bit_model(path, dtype=torch.float32)
    seen = []

    def done(name: str, block: nn.Module) -> None:
        model = block_owner[0]
        later = [b for b in blocks if b not in seen and b != name]
        # this block complete, the later ones still on the meta device, the embeddings too
        assert not any(t.is_meta for t in [*block.parameters(), *block.buffers()])
        assert all(next(model.get_submodule(b).parameters()).is_meta for b in later)
        assert model.get_input_embeddings().weight.is_meta
        seen.append(name)

    block_owner, blocks = [], []

    def find(model: nn.Module) -> list[str]:
        block_owner.append(model)
        blocks.extend(fsdp.find_blocks(model))
        return blocks

    streamed = qk.load_4bit_model(path, dtype=torch.float32, block_hook=BlockHook(find, done))
    assert seen == ["model.layers.0", "model.layers.1"]
    a, b = whole.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resident_nf4_bytes(whole) == resident_nf4_bytes(streamed) > 0


def test_blocks_that_cannot_be_found_name_the_classes_and_the_key(assets):
    model = qk.load_4bit_model(assets["model"], dtype=torch.float32)
    assert fsdp.find_blocks(model) == ["model.layers.0", "model.layers.1"]  # _no_split_modules
    assert fsdp.find_blocks(model, "LlamaDecoderLayer") == ["model.layers.0", "model.layers.1"]
    with pytest.raises(ConfigError) as e:
        fsdp.find_blocks(model, ["GPTBlock"])
    msg = str(e.value)
    for part in ("['GPTBlock']", "fsdp_config.transformer_layer_cls_to_wrap", "fsdp_transformer_layer_cls_to_wrap",
                 "LlamaDecoderLayer (2x)"):
        assert part in msg, msg
    model._no_split_modules = None
    with pytest.raises(ConfigError, match="LlamaForCausalLM._no_split_modules is not set"):
        fsdp.find_blocks(model)


def test_mixed_trainable_dtypes_in_a_unit_are_refused_before_training():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    qk.apply_qlora(block, r=4, lora_alpha=8, target_modules=["0", "1"])
    fsdp.check_unit_dtypes("model.layers.0", block)  # fp32 adapters: fine
    block[1].lora_A.to(torch.bfloat16)
    with pytest.raises(TrainingError) as e:
        fsdp.check_unit_dtypes("model.layers.0", block)
    assert "model.layers.0" in str(e.value) and "float32" in str(e.value) and "bfloat16: 1.lora_A.weight" in str(
        e.value)


def test_fsdp_config_keys(assets, tmp_path):
    base = raw_config(assets, tmp_path / "o")
    cfg = load_config(raw={**base, "fsdp": ["full_shard", "auto_wrap"],
                           "fsdp_config": {"fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                                           "fsdp_version": 2, "reshard_after_forward": False}})
    assert cfg.fsdp is True and cfg.fsdp_config.transformer_layer_cls_to_wrap == "LlamaDecoderLayer"
    assert not cfg.fsdp_config.reshard_after_forward and cfg.fsdp_version == 2
    assert cfg.aliases["fsdp_config.fsdp_transformer_layer_cls_to_wrap"] == "fsdp_config.transformer_layer_cls_to_wrap"
    cfg = load_config(raw={**base, "fsdp_transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})  # transformers'
    assert cfg.fsdp_config.transformer_layer_cls_to_wrap == ["LlamaDecoderLayer"]
    assert load_config(raw={**base, "fsdp": ["shard_grad_op"]}).fsdp_config.reshard_after_forward is False
    for extra, words in [({"ddp": True}, "ddp, fsdp: set at most one of them to true"),
                         ({"fsdp": False, "fsdp_config": {"reshard_after_forward": False}}, "applies with fsdp: true"),
                         ({"fsdp": ["full_shard", "offload"]}, "'offload'"),
                         ({"fsdp_version": 1}, "fsdp_version: 1 is not allowed"),
                         ({"fsdp_config": {"state_dict_type": "FULL_STATE_DICT"}}, "SHARDED_STATE_DICT"),
                         ({"deepspeed": "zero3.json"}, "set fsdp: true"),
                         ({"fp16": True}, "fp16, fsdp")]:
        with pytest.raises(ConfigError) as e:
            load_config(raw={**base, **extra})
        assert words in str(e.value), str(e.value)


def test_resume_keys_allow_another_world_size_with_the_same_global_micro_batch():
    key = {"train_examples": 9, "micro_batch_size": 2, "seed": 1, "gradient_accumulation_steps": 2, "world_size": 2,
           "fsdp": True}
    one = {k: v for k, v in key.items() if k != "world_size"}
    assert fsdp.run_key_problem(key, key) is None
    assert fsdp.run_key_problem(key, {**one, "micro_batch_size": 4}) is None  # 1 x 4 == 2 x 2
    msg = fsdp.run_key_problem(key, one)
    assert "2 processes x micro_batch_size 2" in msg and "1 x 2 = 2" in msg and "stays 4" in msg
    assert "data position" in fsdp.run_key_problem(key, {**key, "seed": 2})


@pytest.mark.parametrize("n,world,bs", [(4, 2, 2), (5, 2, 2), (9, 4, 1), (1, 2, 3), (0, 2, 2)])
def test_eval_placeholders_even_out_the_forwards(n, world, bs):
    runs = []
    for r in range(world):
        extra = fsdp.eval_placeholders(n, bs, DistContext(r, world, r, "gloo"))
        lo, hi = qk.train.distributed.shard_bounds(n, r, world)
        runs.append(-(-(hi - lo) // bs) + extra)
        assert extra >= 0
    assert len(set(runs)) == 1


# --------------------------------------------------------------------------- two processes under torchrun

_KILLED_AFTER_STEP_2 = """
import os, sys
from qlora_kernels.train import load_config, train
# a hard kill (no cleanup, no final save) right after step 2 and its checkpoint
train(load_config(sys.argv[1], sys.argv[2:]), on_step_end=lambda step, rec: os._exit(17) if step == 2 else None)
"""

_UNITS = """
import json, sys
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
import qlora_kernels as qk
from qlora_kernels.nn.nf4_storage import resident_nf4_bytes
from qlora_kernels.train import TrainingError, load_config
from qlora_kernels.train import distributed as dp, fsdp
from qlora_kernels.train.components import build_model
from qlora_kernels.train.loss import model_loss

cfg_path, bnb_dir, out = sys.argv[1:4]
ctx = dp.init_distributed("cpu")
cpu, r, res = torch.device("cpu"), ctx.rank, {}
ids = torch.randint(3, 600, (4, 12), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)

# a bitsandbytes-4bit checkpoint, loaded block by block and sharded: the one-process loss, half the NF4 bytes
cfg = load_config(cfg_path, [f"base_model={bnb_dir}", f"output_dir={out}/bnb"])
model, report, _ = fsdp.build_model(cfg, cpu, ctx)
with torch.no_grad():
    part = model_loss(model, ids[2 * r:2 * r + 2], mask[:2], ids[2 * r:2 * r + 2])[0]
    ref = build_model(cfg, cpu)
    res["bnb_loss"] = [float(dp.all_reduce_sum(part.reshape(1), ctx)[0]), float(model_loss(ref, ids, mask, ids)[0])]
res["bnb_bytes"] = [report.nf4_resident_bytes, resident_nf4_bytes(ref), report.load_peak_nf4_bytes,
                    report.largest_block_nf4_bytes]

# the input embedding and the output projection: units of their own, sharded also at the activations' peak (after
# the forward, before the backward: the loss is vocabulary-parallel), and again after a full forward (which gathers
# the output projection for its logits)
emb, head = model.model.embed_tokens, model.lm_head
loss = model_loss(model, ids[2 * r:2 * r + 2], mask[:2], ids[2 * r:2 * r + 2])[0]
res["vocab_at_peak"] = [type(emb.weight).__name__, type(head.weight).__name__, list(head.weight.to_local().shape),
                        list(head.weight.shape)]
loss.backward()
with torch.no_grad():
    logits = model(input_ids=ids[:2]).logits
    want = ref(input_ids=ids[:2]).logits
res["vocab_after_forward"] = [type(emb.weight).__name__, type(head.weight).__name__,
                              float((logits - want).abs().max()), float(want.abs().max())]
model.zero_grad(set_to_none=True)

# qweight of a sharded layer says so; between unshard() and reshard() it is the whole weight
layer = model.model.layers[0].self_attn.q_proj
try:
    layer.qweight
    res["qweight_error"] = None
except RuntimeError as e:
    res["qweight_error"] = str(e)
model.model.layers[0].unshard()
res["unsharded_weight_equal"] = torch.equal(layer.qweight.dequantize(),
                                            ref.model.layers[0].self_attn.q_proj.qweight.dequantize())
model.model.layers[0].reshard()

# PagedAdamW, 8-bit states, on DTensor shards == the same optimizer on this rank's shard as a plain tensor
mesh = init_device_mesh("cpu", (ctx.world_size,))
g = torch.Generator().manual_seed(1)
full, grads = torch.randn(64, 300, generator=g), [torch.randn(64, 300, generator=g) for _ in range(3)]
p = nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
q = nn.Parameter(p.to_local().detach().clone())
o_sharded = qk.PagedAdamW([p], lr=1e-2, weight_decay=0.1, state_bits=8, min_8bit_size=0)
o_plain = qk.PagedAdamW([q], lr=1e-2, weight_decay=0.1, state_bits=8, min_8bit_size=0)
for gr in grads:
    p.grad = distribute_tensor(gr, mesh, [Shard(0)])
    q.grad = p.grad.to_local().clone()
    res["global_norm"] = [dp.clip_grad_norm_([p], 1e9), float(gr.norm())]
    o_sharded.step()
    o_plain.step()
res["paged8_equal"] = torch.equal(p.to_local(), q)
st = o_sharded.state_dict()["state"][0]
res["paged8_state"] = [type(st["exp_avg"]).__name__, list(st["exp_avg"].shape),
                       torch.equal(st["exp_avg"].to_local(), o_plain.state_dict()["state"][0]["exp_avg"])]

# mixed trainable dtypes in a block: refused before any step, on every rank
mixed = build_model(load_config(cfg_path, [f"output_dir={out}/mixed"]), cpu)
mixed.model.layers[1].mlp.down_proj.lora_A.to(torch.bfloat16)
try:
    fsdp.build_model(cfg, cpu, ctx, mixed)
    res["mixed"] = None
except TrainingError as e:
    res["mixed"] = str(e)
if r == 0:
    with open(f"{out}/units.json", "w") as f:
        json.dump(res, f)
dp.teardown(ctx)
"""


def run_torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH",
                                                                                                       "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=str(REPO))


def _records(out: Path, key: str = "loss") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory) -> dict[str, Path]:
    """One process (micro-batch 4); two FSDP ranks (micro-batch 2 each) uninterrupted; the same killed after
    step 2; that one resumed from its checkpoint-2 under torchrun."""
    d = tmp_path_factory.mktemp("fsdp_runs")
    cfg = d / "fsdp.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(assets, d / "full")))
    one = train(load_config(raw=raw_config(assets, d / "one", micro_batch_size=4, fsdp=False)), quiet=True)
    assert one.global_step == 4
    full = run_torchrun(["-m", "qlora_kernels.train", str(cfg)])
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    assert full.stdout.count("trained 4 steps") == 1  # only rank 0 reports
    (d / "killed.py").write_text(_KILLED_AFTER_STEP_2)
    killed = run_torchrun([str(d / "killed.py"), str(cfg), f"output_dir={d / 'killed'}"])
    assert killed.returncode != 0 and (d / "killed" / "checkpoint-2").is_dir(), killed.stderr[-3000:]
    resumed = run_torchrun(["-m", "qlora_kernels.train", str(cfg), f"output_dir={d / 'resumed'}",
                            f"resume_from_checkpoint={d / 'killed' / 'checkpoint-2'}"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"root": d, "one": d / "one", "full": d / "full", "killed": d / "killed", "resumed": d / "resumed",
            "full_stdout": full.stdout}


def test_two_fsdp_ranks_train_the_adapters_of_one_process(runs):
    a = load_file(str(runs["full"] / "adapter_model.safetensors"))
    b = load_file(str(runs["one"] / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)
    got, want = _records(runs["full"]), _records(runs["one"])
    assert [r["step"] for r in got] == [1, 2, 3, 4] and [r["target_tokens"] for r in got] == [
        r["target_tokens"] for r in want]
    # fp32 summation order differs (shards, reduce-scatter, micro-batch 2 x 2 ranks vs 4): the longest reduction
    # is a global batch's tokens (2 x 2 x 2 rows of <= 64), the model has 2 layers
    weight_bound = bounds.assert_same_training(got, want, a, b, num_layers=2, reduce_len=512)
    (e_got,), (e_want,) = _records(runs["full"], "eval_loss"), _records(runs["one"], "eval_loss")
    bound, why = bounds.loss_after_training(e_want["eval_loss"], 2, 512, want[-1]["grad_norm"],
                                            sum(v.numel() for v in b.values()), weight_bound)
    bounds.assert_within("eval_loss", e_got["eval_loss"], e_want["eval_loss"], bound, why=why)
    assert "fully sharded (FSDP2) over 2 processes" in runs["full_stdout"]


def test_a_group_of_one_runs_the_sharded_path_and_trains_as_one_process(assets, runs, tmp_path):
    """fsdp_config.shard_one_process: one process (no torchrun) joins a gloo group of one and shards over it (the
    path the GPU check runs on one GPU over nccl): the adapters and losses of the unsharded process, within bounds."""
    cfg = tmp_path / "one.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(assets, tmp_path / "out", micro_batch_size=4,
                                             fsdp_config={"shard_one_process": True})))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "qlora_kernels.train", str(cfg)], env=env, capture_output=True,
                          text=True, timeout=240, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fully sharded (FSDP2) over 1 processes (gloo)" in proc.stdout
    rep = json.loads((tmp_path / "out" / fsdp.FSDP_REPORT).read_text())
    assert rep["nf4_resident_bytes_per_rank"] == [rep["nf4_model_bytes"]]
    a = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    b = load_file(str(runs["one"] / "adapter_model.safetensors"))
    got, want = _records(tmp_path / "out"), _records(runs["one"])
    assert a.keys() == b.keys() and [r["step"] for r in got] == [1, 2, 3, 4]
    bounds.assert_same_training(got, want, a, b, num_layers=2, reduce_len=512)
    assert (tmp_path / "out" / "checkpoint-4").is_dir()


def test_each_rank_holds_half_the_nf4_bytes_also_while_loading(runs):
    rep = json.loads((runs["full"] / fsdp.FSDP_REPORT).read_text())
    total, per_rank = rep["nf4_model_bytes"], rep["nf4_resident_bytes_per_rank"]
    peaks = rep["load_peak_nf4_bytes_per_rank"]
    assert rep["blocks"] == ["model.layers.0", "model.layers.1"] and total > 60_000
    for held, peak in zip(per_rank, peaks):
        assert abs(held - total / 2) <= 0.01 * total  # FSDP2 pads each tensor's shards to equal size
        # while loading: the shards of the blocks before + one whole block (here: 1/4 + 1/2), never the whole model
        assert peak <= total / 2 + rep["largest_block_nf4_bytes"] + 0.01 * total and peak <= 0.76 * total


_READ_IN_PART = """
import json, os, sys
import torch
from safetensors.torch import save_file
from qlora_kernels.train import load_config
from qlora_kernels.train import distributed as dp, fsdp
from qlora_kernels.train.loss import model_loss

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

tiny, out, part, *models = sys.argv[1:]
fsdp_on = os.environ.get("WORLD_SIZE") is not None
ctx = dp.init_distributed("cpu")
def cfg(model, o):
    data = os.path.join(os.path.dirname(out), "x.jsonl")
    return load_config(raw={"base_model": model, "output_dir": o, "datasets": [{"path": data, "type": "alpaca"}],
                            "lora_r": 4, "lora_alpha": 8, "fsdp": fsdp_on,
                            "fsdp_config": {"read_in_part": part == "1"}})
fsdp.build_model(cfg(tiny, out + "/tiny"), torch.device("cpu"), ctx)  # imports and first-use allocations
res = []
for i, path in enumerate(models):
    base = status("VmRSS:")
    try:
        with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) from here on
            f.write("5")
        rss = True
    except OSError:
        rss = False
    model, report, _ = fsdp.build_model(cfg(path, f"{out}/m{i}"), torch.device("cpu"), ctx)
    peak = status("VmHWM:") - base if rss else None
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # every rank the same batch: a forward through the sharded units
        loss = float(model_loss(model, ids, torch.ones_like(ids), ids)[0])
    local = {n: (p.to_local() if hasattr(p, "to_local") else p).detach().contiguous()
             for n, p in model.named_parameters()}
    local.update({f"{n}.offsets": torch.tensor([float(v) for k, v in sorted(vars(m).items()) if k == "nf4_offset"]
                                               + [w[3] for _, w in sorted(getattr(m, "_weights", {}).items())])
                  for n, m in model.named_modules() if hasattr(m, "nf4_offset") or hasattr(m, "_weights")})
    save_file(local, f"{out}/shards{i}-{ctx.rank}.safetensors")
    res.append({"peak_growth": peak, "loss": loss, "layers": report.layers_read_in_part if report else 0,
                "read": report.weight_bytes_read if report else None,
                "whole": report.weight_bytes_whole if report else None})
    del model
with open(f"{out}/rank{ctx.rank}.json", "w") as f:
    json.dump(res, f)
dp.teardown(ctx)
"""


def _fused_experts_checkpoint(path: Path) -> Path:
    """A tiny float Mixtral whose checkpoint holds its experts fused (``experts.gate_up_proj`` [E, 2I, H], as
    gpt-oss-style checkpoints store them), so a rank can read part of each."""
    from safetensors.torch import save_file

    from .hf_tiny import write_tiny

    model = write_tiny(path, "mixtral")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    return path


def test_each_rank_reads_half_the_weights_and_holds_the_same_shards(assets, tmp_path):
    """Reading 1/N (``fsdp_config.read_in_part``, the default) against every rank reading each weight whole, and
    against one process: the same NF4 shards bit for bit, half the weight bytes read, about half the peak RSS; for
    a float Llama, a bitsandbytes 4-bit checkpoint (its packed codes read in part), a Mixtral with fused experts
    stored (the experts quantized from their parts), one with its experts stored one by one (Mixtral's own
    layout, which transformers stacks into fused experts: each rank reads its part of the stacked tensors), and a
    GPT-2, whose Conv1D weights are stored transposed (each rank reads columns of them)."""
    pytest.importorskip("bitsandbytes")
    from .hf_tiny import write_bnb_checkpoint, write_tiny

    big = save_random_model(tmp_path / "big", hidden_size=2048, num_layers=1)  # 160 MB of fp32 weights
    bnb = write_bnb_checkpoint(write_tiny(tmp_path / "fp", "llama") and tmp_path / "fp", tmp_path / "bnb")
    moe = _fused_experts_checkpoint(tmp_path / "moe")
    per_expert = write_tiny(tmp_path / "per_expert", "mixtral") and tmp_path / "per_expert"
    gpt2 = write_tiny(tmp_path / "gpt2", "gpt2") and tmp_path / "gpt2"
    (tmp_path / "x.jsonl").write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    (tmp_path / "run.py").write_text(_READ_IN_PART)
    res = {}
    for name, part, nproc in (("part", "1", 2), ("whole", "0", 2), ("one", "1", 1)):
        out = tmp_path / name
        out.mkdir()
        args = [str(tmp_path / "run.py"), str(assets["model"]), str(out), part, str(big)]
        args += [str(bnb), str(moe), str(per_expert), str(gpt2)] if nproc == 2 else []
        proc = (run_torchrun(args) if nproc == 2 else
                subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=240, cwd=str(tmp_path),
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        res[name] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    for i in range(5):  # the same bytes on each rank, and the same double-quantization offsets
        for r in range(2):
            a = load_file(tmp_path / "part" / f"shards{i}-{r}.safetensors")
            b = load_file(tmp_path / "whole" / f"shards{i}-{r}.safetensors")
            assert a.keys() == b.keys() and any(k.endswith("_packed") for k in a), i
            assert [k for k in a if not torch.equal(a[k], b[k])] == [], i
    for r in range(2):  # the same forward (the same bytes, the same kernels); the float Llama's is one process's
        assert [m["loss"] for m in res["part"][r]] == [m["loss"] for m in res["whole"][r]]
        # but for the output projection's vocabulary-parallel loss: each rank's logits of its rows (the GEMM over the
        # hidden width) and the ranks' log-sum-exps combined (over the vocabulary), two reductions evaluated in
        # another order; the loss is a sum of positive cross-entropies, so their relative bound is the sum's
        got, want = res["part"][r][0]["loss"], res["one"][0][0]["loss"]
        bounds.assert_within("loss", got, want, bounds.network(2, 2048) * abs(want) + bounds.reduction(want, 22),
                             why="the head's GEMM (2048 terms) and log-sum-exp, and the sum over 22 tokens")
    # float Llama: 7 linear layers, 1 block; bnb: 2 blocks; Mixtral: 4 attention projections + experts, 2 blocks
    # (both layouts); and each model's input embedding and output projection (read by rows); GPT-2: 4 Conv1D layers,
    # 2 blocks (its embedding is tied to its output projection: both whole)
    for i, layers in enumerate((9, 16, 12, 12, 8)):
        reads, whole = [rank[i]["read"] for rank in res["part"]], res["part"][0][i]["whole"]
        assert [rank[i]["layers"] for rank in res["part"]] == [layers, layers], i
        # each byte read once, by the rank holding it (the NF4 blocks two shards share are read by both)
        assert whole <= sum(reads) <= 1.01 * whole and max(reads) <= 0.51 * whole, (i, reads, whole)
        assert all(rank[i]["layers"] == 0 for rank in res["whole"])
    one = res["one"][0][0]["peak_growth"]
    if one is None:
        pytest.skip("/proc/self/clear_refs is not writable here: the peak RSS is not measured")
    for part, whole in zip(res["part"], res["whole"]):
        # measured: 59-62 MiB a rank reading 1/N, 103-119 MiB reading whole, 105-113 MiB one process (one block of
        # 150 MB of fp32 weights: its largest tensor, 32 MiB, read and quantized whole, or half of it)
        assert part[0]["peak_growth"] <= 0.75 * one and part[0]["peak_growth"] <= 0.75 * whole[0]["peak_growth"], res


def test_the_memory_plan_counts_what_the_ranks_hold(assets, runs):
    """memory_plan, from the shapes only, gives the NF4 bytes the run measured block by block (exactly) and each rank's
    share (within FSDP2's padding of each tensor to equal shards)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    rep = json.loads((runs["full"] / fsdp.FSDP_REPORT).read_text())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(assets["model"]))
    plan = fsdp.memory_plan(model, 2, r=4)
    assert plan.nf4_bytes == rep["nf4_model_bytes"]
    n_tensors = 5 * sum(1 for _, m, k in linear_modules(model) if k == "linear") - 5  # (but the output projection)
    for held in rep["nf4_resident_bytes_per_rank"]:
        assert plan.nf4_bytes / 2 <= held <= plan.nf4_bytes / 2 + n_tensors * 4  # padding: < one element a tensor
    assert plan.largest_block_bytes > 0 and plan.head_bytes == model.lm_head.weight.numel() * 2
    # the run sharded the input embedding and the output projection by rows, as the plan counts them
    assert rep["vocabulary_units"] == ["model.embed_tokens", "lm_head"] and plan.head_sharded
    assert plan.embedding_bytes == model.model.embed_tokens.weight.numel() * 2


def test_the_readme_memory_table_is_the_memory_plan():
    """The README's per-rank table and its 70B-on-2x24-GiB / 8B-on-1x16-GiB sentences, from memory_plan of the models'
    shapes (built on the meta device: no weights)."""
    import re

    from transformers import AutoModelForCausalLM, LlamaConfig

    text = (REPO / "README.md").read_text()
    gib = 2 ** 30
    shapes = {"Llama-3-8B": (4096, 14336, 32, 32), "Llama-3-70B": (8192, 28672, 80, 64),
              "Llama-3.1-405B": (16384, 53248, 126, 128)}
    plans = {}
    for name, (h, inter, layers, heads) in shapes.items():
        cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        plans[name] = [fsdp.memory_plan(model, n) for n in (2, 4, 8)]
        pair = r"([\d.]+) / ([\d.]+)"
        row = re.search(rf"^\| {re.escape(name)} \(([\d.]+) GiB\) \| ([\d.]+) \| {pair} \| {pair} \| {pair} \|$",
                        text, re.M)
        assert row, name
        p2 = plans[name][0]
        want = [p2.nf4_bytes, p2.ddp_bytes, *(b for p in plans[name] for b in (p.fsdp_bytes, p.forward_start_bytes))]
        got = [float(v) for v in row.groups()]
        for g, w in zip(got, want):
            assert abs(g - w / gib) <= 0.05 + 0.0005 * g, (name, got, [round(v / gib, 2) for v in want])
    p70, p8 = plans["Llama-3-70B"][0], plans["Llama-3-8B"][0]
    assert p70.head_sharded and p70.embedding_bytes == p70.head_bytes  # both units of their own, sharded
    assert f"holds {p70.fsdp_bytes / gib:.1f} GiB a rank at the activations' peak" in text
    assert f"{24 - p70.fsdp_bytes / gib:.1f} GiB are left" in text
    assert f"each forward starts at\n{p70.forward_start_bytes / gib:.1f} GiB" in text
    assert f"holds {p8.ddp_bytes / gib:.1f} GiB" in text and f"leaving {16 - p8.ddp_bytes / gib:.1f} GiB" in text


def test_a_killed_run_resumes_from_its_sharded_checkpoint_to_the_uninterrupted_result(runs):
    ckpt = runs["killed"] / "checkpoint-2"
    files = sorted(p.name for p in (ckpt / "sharded").iterdir())
    assert files == ["shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert not (runs["killed"] / "adapter_model.safetensors").exists()  # killed: no final save
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["sharded"]["world_size"] == 2 and state["run_key"]["fsdp"] is True
    full = [(r["step"], r["loss"], r["grad_norm"]) for r in _records(runs["full"])]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in _records(runs["resumed"])] == full[2:]
    a = load_file(str(runs["resumed"] / "adapter_model.safetensors"))
    b = load_file(str(runs["full"] / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_another_world_size_resumes_with_the_same_global_micro_batch(assets, runs, capsys):
    ckpt = runs["killed"] / "checkpoint-2"
    out = runs["root"] / "one_resumed"
    cfg = load_config(raw=raw_config(assets, out, micro_batch_size=4, resume_from_checkpoint=str(ckpt)))
    res = train(cfg)
    said = capsys.readouterr().out
    assert "FSDP is a no-op" in said and f"resumed from {ckpt} at step 2" in said
    full = _records(runs["full"])
    for x, y in zip(_records(out), full[2:]):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    assert res.global_step == 4
    with pytest.raises(TrainingError) as e:  # 1 x 2 is not the global micro-batch 2 x 2 it was written with
        train(load_config(raw=raw_config(assets, runs["root"] / "refused", resume_from_checkpoint=str(ckpt))),
              quiet=True)
    assert "micro_batch_size x world_size stays 4" in str(e.value)


def test_the_adapter_is_peft_s_and_loads_there(assets, runs):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
    with torch.no_grad():  # the base our adapters trained on: each linear layer's NF4 round trip
        for name, m in base.named_modules():
            if isinstance(m, nn.Linear) and name != "lm_head":
                m.weight.copy_(qk.dequantize_nf4(qk.quantize_nf4(m.weight)))
    ids = torch.randint(3, 600, (2, 16), generator=torch.Generator().manual_seed(2))
    # Each run's adapter on PEFT's dense layers gives what it gives on ours (the two runs' adapters are compared
    # with each other, within their bound, in test_two_fsdp_ranks_train_the_adapters_of_one_process).
    for run in ("full", "one"):
        model = peft.PeftModel.from_pretrained(base, str(runs[run])).eval()
        saved = load_file(str(runs[run] / "adapter_model.safetensors"))
        loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
        assert len(loaded) == len(saved) and all(torch.equal(loaded[k], v) for k, v in saved.items())
        ours = qk.hf.load_adapter(qk.hf.load_4bit_model(assets["model"], dtype=torch.float32), runs[run]).eval()
        with torch.no_grad():
            got = ours(ids).logits
            out = model(ids, output_hidden_states=True)
        # two 2-layer forwards that round differently (fused LoRA on NF4 vs PEFT's dense layers), on the scale
        # of the last reduction's terms, |h| @ |W_lm|^T
        rho = bounds.training_rounding(2, 128)[0]
        scale = bounds.abs_matmul(out.hidden_states[-1], model.get_output_embeddings().weight)
        bounds.assert_within(f"{run}: logits, ours vs PEFT", got, out.logits, rho * scale,
                             why=f"rho_forward {rho:.3g} x |h| @ |W_lm|^T")
        base = model.unload()
    assert json.loads((runs["full"] / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_sharded_units_bnb4_checkpoint_optimizer_clipping_and_bad_dtypes(assets, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(assets, tmp_path / "o")))
    bnb = _bnb_checkpoint(assets["model"], tmp_path / "nf4")
    (tmp_path / "units.py").write_text(_UNITS)
    proc = run_torchrun([str(tmp_path / "units.py"), str(cfg), str(bnb), str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "units.json").read_text())
    sharded, whole = res["bnb_loss"]
    assert sharded == pytest.approx(whole, rel=1e-6)
    held, total, peak, block = res["bnb_bytes"]
    assert abs(held - total / 2) <= 0.01 * total and peak <= total / 2 + block + 0.01 * total and peak <= 0.76 * total
    assert res["vocab_at_peak"][:2] == ["DTensor", "DTensor"]
    rows, cols = res["vocab_at_peak"][3]
    assert res["vocab_at_peak"][2] == [-(-rows // 2), cols]
    assert res["vocab_after_forward"][:2] == ["DTensor", "DTensor"]
    assert res["vocab_after_forward"][2] == 0.0, res["vocab_after_forward"]  # the same bytes, the same kernels
    assert "sharded by FSDP2" in res["qweight_error"] and res["unsharded_weight_equal"]
    assert res["paged8_equal"] and res["paged8_state"] == ["DTensor", [64, 300], True]
    assert res["global_norm"][0] == pytest.approx(res["global_norm"][1], rel=1e-5)
    assert "model.layers.1" in res["mixed"] and "bfloat16" in res["mixed"] and "one dtype" in res["mixed"]


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="with 2 GPUs the benchmark would run for real")
def test_the_multi_gpu_benchmark_says_it_needs_more_gpus(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_e2e
    finally:
        sys.path.pop(0)
    assert bench_e2e.main(["--multi-gpu", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / bench_e2e.MULTI_FILE).read_text())
    assert "needs at least 2 GPUs" in res["skipped"] and res["rows"] == [] and res["complete"]


# --------------------------------------------------------------------------- the other objectives under fsdp


@pytest.fixture(scope="module")
def objective_assets(assets, tmp_path_factory) -> dict[str, Path]:
    """Preference pairs (a reward model) and prompts with a rewarded answer (GRPO), and a copy of the model whose
    generation config ends a sequence at 1 token in 5: completions end at different steps on the two ranks."""
    import shutil

    from qlora_kernels.train.data import write_jsonl

    d = tmp_path_factory.mktemp("fsdp_objectives")
    langs = make_languages()
    pairs = [{"prompt": f"{r['instruction']} {r['input']} =", "chosen": f" {r['output']}", "rejected": f" {r['input']}"}
             for r in instruction_rows(langs, 14, seed=5)]
    write_jsonl(pairs[:9], d / "pref.jsonl")  # the last global micro-batch of 4 leaves rank 1 without a pair
    write_jsonl(pairs[9:], d / "pref_eval.jsonl")
    rows = instruction_rows(langs, 12, seed=4)
    write_jsonl([{"prompt": f"{r['instruction']} {r['input']} =", "answer": r["output"]} for r in rows[:9]],
                d / "prompts.jsonl")  # 9 prompts, 4 a generation batch: rank 1 gets none in the third
    write_jsonl([{"prompt": f"{r['instruction']} {r['input']} ="} for r in rows[9:]], d / "prompts_eval.jsonl")
    (d / "rewards.py").write_text("def length(prompts, completions, **kw):\n"
                                  "    return [len(c) / 10 for c in completions]\n")
    model = d / "model"
    shutil.copytree(assets["model"], model)
    gen = json.loads((model / "generation_config.json").read_text())
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    (model / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, *range(3, vocab, 5)]}))
    return {"root": d, "model": model, "pref": d / "pref.jsonl", "pref_eval": d / "pref_eval.jsonl",
            "prompts": d / "prompts.jsonl", "prompts_eval": d / "prompts_eval.jsonl", "rewards": d / "rewards.py"}


def test_a_reward_model_under_fsdp_trains_the_adapters_and_head_of_one_process(assets, objective_assets, tmp_path):
    """The score head (trained whole) is a unit of its own: 2 ranks x micro-batch 2 give one process's
    micro-batch 4, the adapter holds the head, and the sharded checkpoint resumes."""
    oa = objective_assets
    kw = {"objective": "reward", "datasets": [{"path": str(oa["pref"]), "type": "preference"}],
          "test_datasets": [{"path": str(oa["pref_eval"]), "type": "preference"}]}
    cfg = tmp_path / "reward.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(assets, tmp_path / "full", **kw)))
    full = run_torchrun(["-m", "qlora_kernels.train", str(cfg)])
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    assert "trained whole and sharded as units of their own: score" in full.stdout
    one = train(load_config(raw=raw_config(assets, tmp_path / "one", micro_batch_size=4, fsdp=False, **kw)),
                quiet=True)
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in a and a.keys() == b.keys()
    got, want = _records(tmp_path / "full"), [r for r in one.history if "loss" in r]
    assert [r["pairs"] for r in got] == [r["pairs"] for r in want] == [8, 5, 5, 8]  # 9 pairs an epoch
    # the longest reduction: a global batch's sequences (2 x 4 pairs x 2 of <= 64 tokens)
    bounds.assert_same_training(got, want, a, b, num_layers=2, reduce_len=1024)
    (e_got,), (e_want,) = _records(tmp_path / "full", "eval_loss"), [r for r in one.history if "eval_loss" in r]
    assert e_got["eval_accuracy"] == e_want["eval_accuracy"]
    resumed = run_torchrun(["-m", "qlora_kernels.train", str(cfg), f"output_dir={tmp_path / 'resumed'}",
                            f"resume_from_checkpoint={tmp_path / 'full' / 'checkpoint-2'}"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [(r["loss"], r["grad_norm"]) for r in _records(tmp_path / "resumed")] == [(r["loss"], r["grad_norm"])
                                                                                     for r in got[2:]]
    c = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_grpo_under_fsdp_generates_in_step_and_trains_as_ddp(assets, objective_assets, tmp_path):
    """GRPO on the sharded model: the ranks' decode steps stay in step while their completions end at different
    lengths, a rank without prompts (the third generation batch) or with fewer eval prompts generates
    placeholders; the rollouts equal DDP's (same seeds, same weights), the steps equal it within rounding, and the
    sharded checkpoint resumes with the generation state."""
    oa = objective_assets
    raw = raw_config(assets, tmp_path / "fsdp", objective="grpo", base_model=str(oa["model"]),
                     datasets=[{"path": str(oa["prompts"]), "type": "prompt"}],
                     test_datasets=[{"path": str(oa["prompts_eval"]), "type": "prompt"}],
                     reward_funcs=[f"{oa['rewards']}:length"], num_generations=4, max_completion_length=6,
                     temperature=1.0, micro_batch_size=4, max_steps=3, eval_steps=3, eval_batch_size=1,
                     beta=0.04, loss_type="grpo", optimizer="adamw_torch")
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    runs = {}
    for name, extra in (("fsdp", []), ("ddp", ["fsdp=false"])):
        proc = run_torchrun(["-m", "qlora_kernels.train", str(cfg), f"output_dir={tmp_path / name}", *extra])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = _records(tmp_path / name)
    got, want = runs["fsdp"], runs["ddp"]
    rollout = ("reward", "reward_std", "completions/mean_length", "completions/max_length", "normalizer")
    assert [[r[k] for k in rollout] for r in got] == [[r[k] for k in rollout] for r in want]
    lengths = [r["completions/mean_length"] for r in want]
    assert all(0 < x < 6 for x in lengths)  # completions ended early, at different steps
    a = load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    # the loss's terms: importance ratios (~1) times advantages, each of magnitude <= (G - 1) / sqrt(G) = 1.5 in a
    # group of G = 4 normalized by its std, plus beta x the KL; the longest reduction a global batch's tokens
    bounds.assert_same_training(got, want, a, b, num_layers=2, reduce_len=512,
                                loss_scale=lambda r: 1.5 + 0.04 * abs(r["kl"]))
    (e_got,), (e_want,) = _records(tmp_path / "fsdp", "eval_loss"), _records(tmp_path / "ddp", "eval_loss")
    assert e_got["eval_reward"] == e_want["eval_reward"]
    resumed = run_torchrun(["-m", "qlora_kernels.train", str(cfg), f"output_dir={tmp_path / 'resumed'}",
                            f"resume_from_checkpoint={tmp_path / 'fsdp' / 'checkpoint-2'}"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [(r["loss"], r["reward"]) for r in _records(tmp_path / "resumed")] == [(r["loss"], r["reward"])
                                                                                 for r in got[2:]]
