"""Data parallelism: ``torchrun --nproc_per_node=2 -m qlora_kernels.train`` on the CPU (gloo) trains the same adapters
as one process with the same global batch (SFT and DPO, gradient accumulation, uneven token counts across ranks and a
rank left without examples in the last micro-batch), and only rank 0 writes; plus the sharding helpers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlora_kernels.demo.synthetic import instruction_rows, make_languages, save_random_model
from qlora_kernels.train import load_config, train
from qlora_kernels.train.data import Example, MicroBatchStream, write_jsonl
from qlora_kernels.train.distributed import (
    SINGLE,
    DistContext,
    ForwardRunner,
    all_reduce_sum,
    clip_grad_norm_,
    no_sync,
    shard,
    shard_bounds,
    unwrap_model,
    wrap_model,
)

from . import bounds

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers (no processes)


@pytest.mark.parametrize("n,world", [(8, 2), (9, 2), (1, 2), (0, 3), (10, 4)])
def test_shard_bounds_split_contiguously_and_completely(n, world):
    parts = [shard_bounds(n, r, world) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    sizes = [b - a for a, b in parts]
    assert max(sizes) - min(sizes) <= 1


def _examples(n: int) -> list[Example]:
    return [Example([1, 10 + i, 2], [1, 10 + i, 2], f"f:{i}") for i in range(n)]


def test_sharded_stream_ranks_see_the_single_process_batches():
    exs = _examples(9)
    single = MicroBatchStream(exs, 4, seed=5, pad_id=0)
    ranks = [MicroBatchStream(exs, 2, seed=5, pad_id=0, ctx=DistContext(r, 2, r, "gloo")) for r in range(2)]
    for _ in range(6):  # two epochs: 4 + 4 + 1 examples each
        _, want = single.next()
        got = [s.next() for s in ranks]
        assert [e.source for _, part in got for e in part] == [e.source for e in want]
        if len(want) == 1:  # rank 1 has nothing: a placeholder batch that trains nothing
            batch, part = got[1]
            assert part == [] and batch["input_ids"].shape[0] == 1 and (batch["labels"] == -100).all()
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_single_process_helpers_are_identities():
    t = torch.tensor([1.5, 2.0])
    assert torch.equal(all_reduce_sum(t, SINGLE), t) and all_reduce_sum([3, 4], SINGLE).tolist() == [3.0, 4.0]
    assert shard([1, 2, 3], SINGLE) == [1, 2, 3]
    assert shard([1, 2, 3, 4, 5], DistContext(0, 2, 0, "gloo")) == [1, 2, 3]  # contiguous, as shard_bounds
    assert shard([1, 2, 3, 4, 5], DistContext(1, 2, 1, "gloo")) == [4, 5]
    model = torch.nn.Linear(2, 2)
    runner = wrap_model(model, SINGLE, torch.device("cpu"))
    assert unwrap_model(runner) is model and runner(lambda m, x: m(x), torch.ones(1, 2)).shape == (1, 2)


def test_clipping_and_gradient_sync_helpers():
    """clip_grad_norm_ is torch's (the norm as a float); under FSDP2 no_sync sets the units' gradient sync instead of
    entering DDP's no_sync, and wrap_model adds no DDP wrapper."""
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([3.0, 4.0, 0.0])
    assert clip_grad_norm_([w], 1.0) == pytest.approx(5.0) and torch.allclose(w.grad.norm(), torch.tensor(1.0))
    model = torch.nn.Linear(2, 2)
    runner = wrap_model(model, DistContext(0, 2, 0, "gloo"), torch.device("cpu"), fsdp=True)
    assert type(runner) is ForwardRunner and unwrap_model(runner) is model and runner.fsdp_units == []
    calls = []

    class Unit:
        def set_requires_gradient_sync(self, sync: bool) -> None:
            calls.append(sync)

    runner.fsdp_units = [Unit()]
    for sync in (False, False, True):  # three accumulation micro-batches
        with no_sync(runner, sync):
            pass
    assert calls == [False, False, True]


# --------------------------------------------------------------------------- two processes under torchrun


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ddp")
    model = save_random_model(d / "model", hidden_size=32, num_layers=2)
    langs = make_languages()
    rows = instruction_rows(langs, 13, seed=4)
    with open(d / "sft.jsonl", "w") as f:
        for r in rows[:9]:  # 9 examples, global micro-batch 4: the third has 1 example, so rank 1 gets none
            f.write(json.dumps(r) + "\n")
    with open(d / "eval.jsonl", "w") as f:
        for r in rows[9:]:
            f.write(json.dumps(r) + "\n")
    pairs = [{"prompt": f"{r['instruction']} {r['input']} =", "chosen": f" {r['output']}", "rejected": f" {r['input']}"}
             for r in instruction_rows(langs, 12, seed=5)]
    write_jsonl(pairs[:9], d / "pref.jsonl")
    write_jsonl(pairs[9:], d / "pref_eval.jsonl")
    prompts = [{"prompt": f"{r['instruction']} {r['input']} =", "answer": r["output"]} for r in rows]
    write_jsonl(prompts[:9], d / "prompts.jsonl")  # 9 prompts, 4 a generation batch: rank 1 gets none in the third
    write_jsonl(prompts[9:], d / "prompts_eval.jsonl")
    (d / "rewards.py").write_text("def first_word(prompts, completions, answer, **kw):\n"
                                  "    return [float(c.split()[:1] == a.split()[:1]) for c, a in zip(completions, "
                                  "answer)]\n")
    return {"model": model, "root": d, "sft": d / "sft.jsonl", "eval": d / "eval.jsonl", "pref": d / "pref.jsonl",
            "pref_eval": d / "pref_eval.jsonl", "prompts": d / "prompts.jsonl",
            "prompts_eval": d / "prompts_eval.jsonl",
            "rewards": d / "rewards.py"}


def raw_config(assets, out: Path, dpo: bool, **kw) -> dict:
    train_file, eval_file, kind = ((assets["pref"], assets["pref_eval"], "preference") if dpo
                                   else (assets["sft"], assets["eval"], "alpaca"))
    raw = {"base_model": str(assets["model"]), "output_dir": str(out),
           "datasets": [{"path": str(train_file), "type": kind}], "test_datasets": [{"path": str(eval_file),
                                                                                     "type": kind}],
           "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "sequence_len": 64, "micro_batch_size": 4,
           "gradient_accumulation_steps": 2, "max_steps": 3, "learning_rate": 1e-2, "warmup_steps": 0,
           "optimizer": "adamw_torch", "max_grad_norm": 1.0, "eval_steps": 3, "save_steps": 2, "seed": 1,
           "progress_bar": False}
    if dpo:
        raw.update({"rl": "dpo", "dpo_beta": 0.5})
    raw.update(kw)
    return raw


def run_torchrun(cfg_path: Path, nproc: int = 2, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH",
                                                                                                       "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "qlora_kernels.train", str(cfg_path), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=str(REPO))


def _train_records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dpo,packed", [(False, False), (True, False), (False, True)],
                         ids=["sft", "dpo", "sft-packed"])
def test_two_gloo_processes_train_the_same_adapter_as_one(assets, tmp_path, dpo, packed):
    """2 ranks x micro-batch 2 == 1 process x micro-batch 4 (same global batch, 2 accumulation steps each); with
    sample_packing the units split are the packed rows."""
    ddp_out = tmp_path / "ddp"
    cfg_path = tmp_path / "ddp.yaml"
    kw = {"sample_packing": True} if packed else {}
    cfg_path.write_text(yaml.safe_dump(raw_config(assets, ddp_out, dpo, micro_batch_size=2, **kw)))
    proc = run_torchrun(cfg_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("trained 3 steps") == 1  # only rank 0 reports

    one = train(load_config(raw=raw_config(assets, tmp_path / "one", dpo, **kw)), quiet=True)
    a = load_file(str(ddp_out / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)
    # rank 0 alone wrote: one record per step (not two), the global loss, eval and checkpoints
    recs = _train_records(ddp_out)
    steps = [r for r in recs if "loss" in r]
    want = [r for r in one.history if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    count = "pairs" if dpo else "target_tokens"
    assert [r[count] for r in steps] == [r[count] for r in want]
    # fp32 summation order differs (per-rank partial sums, then the all-reduce): the longest reduction is a global
    # batch's tokens (2 x 4 rows of <= 64; DPO: twice as many sequences), the model has 2 layers
    reduce_len = 1024 if dpo else 512
    dpo_scale = (lambda r: 0.5 * 2 * (abs(r["logps/chosen"]) + abs(r["logps/rejected"]))) if dpo else None
    weight_bound = bounds.assert_same_training(steps, want, a, b, num_layers=2, reduce_len=reduce_len,
                                               loss_scale=dpo_scale)
    evals = [r for r in recs if "eval_loss" in r]
    assert len(evals) == 1
    bound, why = bounds.loss_after_training(one.eval_loss if dpo_scale is None else dpo_scale(want[-1]), 2,
                                            reduce_len, want[-1]["grad_norm"], sum(v.numel() for v in b.values()),
                                            weight_bound)
    bounds.assert_within("eval_loss", evals[0]["eval_loss"], one.eval_loss, bound, why=why)
    if dpo:
        assert evals[0]["eval_rewards/accuracies"] == [r for r in one.history if "eval_loss" in r][0][
            "eval_rewards/accuracies"]
    assert sorted(p.name for p in ddp_out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not list(ddp_out.glob(".tmp-*"))
    state = json.loads((ddp_out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["run_key"]["world_size"] == 2


def test_resume_under_torchrun_continues_the_run(assets, tmp_path):
    out = tmp_path / "run"
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(raw_config(assets, out, False, micro_batch_size=2, max_steps=4,
                                                  eval_steps=None)))
    full = run_torchrun(cfg_path)
    assert full.returncode == 0, full.stderr[-3000:]
    full_steps = [(r["step"], r["loss"]) for r in _train_records(out) if "loss" in r]
    res_out = tmp_path / "resumed"
    res = run_torchrun(cfg_path, extra=(f"output_dir={res_out}", f"resume_from_checkpoint={out / 'checkpoint-2'}"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [(r["step"], r["loss"]) for r in _train_records(res_out) if "loss" in r] == full_steps[2:]


def test_grpo_under_torchrun_splits_prompts_over_ranks_and_resumes(assets, tmp_path):
    """GRPO with 2 ranks: each generates for its share of every generation batch (rank 1 none in the third: it runs
    placeholders), rewards and lengths are summed over both, rank 0 alone writes, and a resumed run continues with the
    same rollouts (each rank's sampling seed follows from the run's seed, its rank and the batches drawn)."""
    raw = {"base_model": str(assets["model"]), "objective": "grpo",
           "datasets": [{"path": str(assets["prompts"]), "type": "prompt"}],
           "test_datasets": [{"path": str(assets["prompts_eval"]), "type": "prompt"}],
           "reward_funcs": [f"{assets['rewards']}:first_word"], "num_generations": 4, "max_completion_length": 6,
           "lora_r": 4, "lora_alpha": 8, "sequence_len": 64, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
           "max_steps": 3, "learning_rate": 1e-2, "warmup_steps": 0, "optimizer": "adamw_torch", "eval_steps": 3,
           "save_steps": 2, "seed": 1, "progress_bar": False, "beta": 0.04, "loss_type": "grpo"}
    out = tmp_path / "run"
    cfg_path = tmp_path / "grpo.yaml"
    cfg_path.write_text(yaml.safe_dump({**raw, "output_dir": str(out)}))
    full = run_torchrun(cfg_path)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    recs = _train_records(out)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # 2 prompts a rank a step, 4 completions each: 16 completions; the third step only 1 prompt (rank 0)
    assert all(math.isfinite(r["loss"]) and r["completions/max_length"] <= 6 for r in steps)
    assert len([r for r in recs if "eval_loss" in r]) == 1
    res_out = tmp_path / "resumed"
    res = run_torchrun(cfg_path, extra=(f"output_dir={res_out}", f"resume_from_checkpoint={out / 'checkpoint-2'}"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    again = [r for r in _train_records(res_out) if "loss" in r]
    assert [(r["step"], r["loss"], r["reward"]) for r in again] == [(r["step"], r["loss"], r["reward"])
                                                                      for r in steps[2:]]
