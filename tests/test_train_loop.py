"""The SFT loop end to end on a tiny random Llama: outputs, exact resume, Ctrl-C, NaN stop, early stopping,
gradient checkpointing, and training the same QLoRA model under transformers.Trainer."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qlora_kernels as qk
from qlora_kernels.demo.synthetic import instruction_rows, make_languages, save_random_model
from qlora_kernels.train import TrainingError, load_config, train

from . import bounds

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sft")
    model = save_random_model(d / "model", hidden_size=32, num_layers=2)
    langs = make_languages()
    for name, n, seed in (("train", 48, 1), ("eval", 8, 2)):
        with open(d / f"{name}.jsonl", "w") as f:
            for r in instruction_rows(langs, n, seed):
                f.write(json.dumps(r) + "\n")
    return {"model": model, "train": d / "train.jsonl", "eval": d / "eval.jsonl", "root": d}


def config(assets, out: Path, **kw):
    raw = {"base_model": str(assets["model"]), "output_dir": str(out),
           "datasets": [{"path": str(assets["train"]), "type": "alpaca"}],
           "test_datasets": [{"path": str(assets["eval"]), "type": "alpaca"}],
           "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "sequence_len": 96, "micro_batch_size": 4,
           "gradient_accumulation_steps": 2, "max_steps": 6, "learning_rate": 5e-3, "warmup_steps": 2,
           "optimizer": "adamw_torch", "weight_decay": 0.01, "eval_steps": 3, "save_steps": 3, "seed": 3,
           "progress_bar": False}
    raw.update(kw)
    return load_config(raw=raw)


def losses(history):
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in history if "loss" in r]


def test_train_writes_adapter_metrics_plot_and_checkpoints(assets, tmp_path):
    out = tmp_path / "run"
    res = train(config(assets, out, save_total_limit=1), quiet=True)
    assert res.global_step == 6 and res.eval_loss is not None and not res.stopped_early
    for f in ("adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "loss.png", "config.yaml"):
        assert (out / f).is_file(), f
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]  # save_total_limit: 1
    assert (out / "checkpoint-6" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(out.glob(".tmp-*"))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in recs if "eval_loss" in r] == [3, 6]
    assert all(r["target_tokens"] > 0 and r["tokens_per_s"] > 0 for r in train_recs)
    assert train_recs[0]["lr"] == 0.0  # warmup 0, 1/2 (as transformers' schedules), then the peak, then cosine
    assert train_recs[1]["lr"] == pytest.approx(5e-3 / 2)
    assert train_recs[2]["lr"] == pytest.approx(5e-3)
    assert train_recs[-1]["lr"] < train_recs[3]["lr"]
    sd = load_file(str(out / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in sd.items())
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [{"warmup_steps": 0}, {"warmup_steps": 1}, {"warmup_steps": 4},
                                    {"warmup_ratio": 0.25}, {"warmup_ratio": 0.1}])
def test_lr_schedule_is_transformers_schedule(kind, warmup, tmp_path):
    """The lr of each step (as the loop uses and logs it) equals transformers' schedule of the same name
    (constant: get_constant_schedule_with_warmup), warmup_ratio rounded up to steps as TrainingArguments does."""
    from types import SimpleNamespace

    import transformers
    from transformers import TrainingArguments

    from qlora_kernels.train.components import build_scheduler

    total = 13
    hf_warmup = TrainingArguments(output_dir=str(tmp_path), report_to=[],
                                  warmup_steps=warmup.get("warmup_steps", warmup.get("warmup_ratio"))
                                  ).get_warmup_steps(total)
    hf_fn = {"cosine": transformers.get_cosine_schedule_with_warmup,
             "linear": transformers.get_linear_schedule_with_warmup,
             "constant": lambda o, w, t: transformers.get_constant_schedule_with_warmup(o, w)}[kind]

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        sched = make(opt)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    cfg = SimpleNamespace(lr_scheduler=kind, **({"warmup_steps": None, "warmup_ratio": None} | warmup))
    ours = lrs(lambda o: build_scheduler(cfg, o, total))
    theirs = lrs(lambda o: hf_fn(o, hf_warmup, total))
    assert ours == pytest.approx(theirs, abs=1e-12), (ours, theirs)
    assert (ours[0] == 0.0) == (hf_warmup > 0)


def test_loss_decreases(assets, tmp_path):
    res = train(config(assets, tmp_path / "r", max_steps=12, eval_steps=None, save_steps=None, lora_dropout=0.0,
                       learning_rate=1e-2), quiet=True)
    tr = [r["loss"] for r in res.history if "loss" in r]
    assert sum(tr[-3:]) / 3 < sum(tr[:3]) / 3


def test_accumulated_steps_equal_one_big_batch(assets, tmp_path):
    """2 micro-batches of 2 == 1 micro-batch of 4 (same examples per step): the loop divides by the target tokens of
    the whole accumulated batch, so losses, gradient norms and the trained adapter agree."""
    kw = dict(max_steps=3, lora_dropout=0.0, eval_steps=None, save_steps=None)
    a = train(config(assets, tmp_path / "a", micro_batch_size=2, gradient_accumulation_steps=2, **kw), quiet=True)
    b = train(config(assets, tmp_path / "b", micro_batch_size=4, gradient_accumulation_steps=1, **kw), quiet=True)
    sa = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    sb = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    # 2 layers; the longest reduction: a step's tokens (4 rows of <= 96); weight decay 0.01
    bounds.assert_same_training(a.history, b.history, sa, sb, num_layers=2, reduce_len=4 * 96, weight_decay=0.01)


def test_resume_after_ctrl_c_is_bit_identical(assets, tmp_path):
    full = train(config(assets, tmp_path / "full"), quiet=True)

    def press_ctrl_c(step, rec):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(config(assets, out), on_step_end=press_ctrl_c, quiet=True)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()  # written on Ctrl-C (save_steps is 3)
    assert not (out / "adapter_model.safetensors").exists()
    resumed = train(config(assets, out, resume_from_checkpoint=str(out / "checkpoint-2")), quiet=True)
    assert losses(resumed.history) == losses(full.history)  # exact float equality, steps 1..6
    assert resumed.eval_loss == full.eval_loss
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_is_held_inside_a_critical_section_and_stops_after_it():
    from qlora_kernels.train.loop import _SigintLatch

    with _SigintLatch() as latch:
        os.kill(os.getpid(), signal.SIGINT)  # the first: a request, no exception
        assert latch.requested and not latch.stop
        with pytest.raises(KeyboardInterrupt):
            with latch.critical():
                os.kill(os.getpid(), signal.SIGINT)  # the second, inside: held
                os.kill(os.getpid(), signal.SIGINT)
                assert latch.stop
                done = True  # the block ran to its end
        assert done
        with latch.critical(reraise=False):  # the fit loop's own saves: it stops by itself afterwards
            pass
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # outside any section: at once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_between_steps_still_writes_the_checkpoint(assets, tmp_path):
    def press_ctrl_c_twice(step, rec):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # "stop at once": the step boundary is still saved

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(config(assets, out), on_step_end=press_ctrl_c_twice, quiet=True)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["loop"]["global_step"] == 2


def test_cli_exits_130_with_a_checkpoint_after_two_ctrl_c(assets, tmp_path):
    """The command line, as a user presses Ctrl-C twice in a row: exit status 130 (not death by the signal)
    and a complete checkpoint, wherever the second press lands (the step, the update, the save, the exit)."""
    import subprocess
    import sys
    import time

    out = tmp_path / "cli"
    cfg = {"base_model": str(assets["model"]), "output_dir": str(out),
           "datasets": [{"path": str(assets["train"]), "type": "alpaca"}], "lora_r": 4, "sequence_len": 96,
           "micro_batch_size": 4, "max_steps": 100000, "save_steps": 1000, "optimizer": "adamw_torch",
           "progress_bar": False}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))  # YAML is a superset of JSON
    proc = subprocess.Popen([sys.executable, "-m", "qlora_kernels", "train", str(tmp_path / "cfg.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"  # created empty at the start; a record comes after a finished step

        def stepped() -> bool:
            return metrics.exists() and metrics.stat().st_size > 0

        while not stepped() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.json").is_file(), (saved, output)
    assert "saved to" in output


def test_resume_from_periodic_checkpoint_and_raw_interrupt(assets, tmp_path):
    full = train(config(assets, tmp_path / "full", max_steps=5, save_steps=2), quiet=True)

    def interrupt(step, rec):
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(config(assets, out, max_steps=5, save_steps=2), on_step_end=interrupt, quiet=True)
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-3").is_dir()
    for ck in ("checkpoint-2", "checkpoint-3"):
        res = train(config(assets, tmp_path / ck, max_steps=5, save_steps=2,
                           resume_from_checkpoint=str(out / ck)), quiet=True)
        start = int(ck.split("-")[1])
        assert losses(res.history) == [x for x in losses(full.history) if x[0] > start]


def test_resume_rejects_a_different_run(assets, tmp_path):
    train(config(assets, tmp_path / "a", max_steps=3), quiet=True)
    with pytest.raises(TrainingError, match="data position would not match"):
        train(config(assets, tmp_path / "b", micro_batch_size=2, resume_from_checkpoint=str(tmp_path / "a" /
                                                                                           "checkpoint-3")),
              quiet=True)


def test_nan_loss_stops_with_step_batch_and_checkpoint(assets, tmp_path):
    def poison(step, rec):
        if step == 2:
            from qlora_kernels.nn import QLoraLinear

            layer = next(m for m in model_ref[0].modules() if isinstance(m, QLoraLinear))
            with torch.no_grad():
                layer.lora_A.weight.fill_(float("nan"))
                layer.lora_B.weight.fill_(1.0)

    from qlora_kernels.train.components import build_model

    cfg = config(assets, tmp_path / "nan", save_steps=2)
    torch.manual_seed(cfg.seed)
    model_ref = [build_model(cfg)]
    with pytest.raises(TrainingError) as e:
        train(cfg, model=model_ref[0], on_step_end=poison, quiet=True)
    msg = str(e.value)
    assert "non-finite loss" in msg and "at step 3" in msg and "micro-batch 1/2" in msg
    assert "train.jsonl:" in msg
    assert f"last good checkpoint: {tmp_path / 'nan' / 'checkpoint-2'}" in msg


def test_early_stopping(assets, tmp_path):
    res = train(config(assets, tmp_path / "es", learning_rate=1e-30, eval_steps=1, early_stopping_patience=2,
                       max_steps=10, lora_dropout=0.0), quiet=True)
    assert res.stopped_early and res.global_step == 3
    assert [r["step"] for r in res.history if "eval_loss" in r] == [1, 2, 3]


def test_gradient_checkpointing_gives_the_same_losses(assets, tmp_path):
    from qlora_kernels.train.components import build_model

    kw = dict(max_steps=2, save_steps=None, eval_steps=None, lora_dropout=0.0)
    a = train(config(assets, tmp_path / "a", **kw), quiet=True)
    cfg = config(assets, tmp_path / "b", gradient_checkpointing=True, **kw)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    b = train(cfg, model=model, quiet=True)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    # the recomputed forward is the same arithmetic, the gradients accumulate in another order
    bounds.assert_same_training(b.history, a.history, {}, {}, num_layers=2, reduce_len=8 * 96)


@pytest.mark.parametrize("opt", ["paged_adamw", "paged_adamw_8bit"])
def test_paged_optimizers_train_and_resume(assets, tmp_path, opt):
    full = train(config(assets, tmp_path / "full", optimizer=opt, max_steps=4, save_steps=2), quiet=True)
    res = train(config(assets, tmp_path / "res", optimizer=opt, max_steps=4, save_steps=2,
                       resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2")), quiet=True)
    assert losses(res.history) == [x for x in losses(full.history) if x[0] > 2]


def test_apply_qlora_model_trains_under_hf_trainer(assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from qlora_kernels.nn import QLoraLinear
    from qlora_kernels.train.data import load_examples

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    qk.apply_qlora(model, r=4, lora_alpha=8)
    tok = AutoTokenizer.from_pretrained(assets["model"])
    examples, _, _ = load_examples(config(assets, tmp_path / "x", sequence_len=64), tok)
    n = min(len(e.input_ids) for e in examples[:8])
    rows = [{"input_ids": e.input_ids[:n], "labels": e.labels[:n], "attention_mask": [1] * n} for e in examples[:8]]
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in before}
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=[{k: torch.tensor(v) for k, v in r.items()} for r in rows])
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    assert any(isinstance(m, QLoraLinear) for m in model.modules())
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
