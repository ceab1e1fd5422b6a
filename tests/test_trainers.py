"""transformers' Trainer and TRL's SFTTrainer / DPOTrainer, unchanged, on a model loaded with QLoraKernelsConfig and
given PEFT adapters with qlora_kernels.hf.LoraConfig (or loaded by load_4bit_model, adapted by apply_qlora and made a
PeftModel by as_peft_model): they train, checkpoint PEFT adapters, resume, save_model.

Oracles: an uninterrupted run (for the resumed one), and the saved adapter reloaded three ways onto a fresh load of the
same 4-bit checkpoint: PEFT on ours (bitwise-equal logits), qlora_kernels.load_adapter (bitwise), PEFT on transformers'
own bitsandbytes model (1e-5). DPO's reference is the policy with its adapters disabled: first-step rewards exactly 0.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qlora_kernels as qk

from .hf_tiny import bnb_model, ids, tiny_tokenizer, write_tiny

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from transformers import AutoModelForCausalLM  # noqa: E402

from qlora_kernels.hf import LoraConfig, NF4LoraLinear, QLoraKernelsConfig, as_peft_model, bnb_free_config  # noqa: E402

from . import bounds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
WORDS = ["cat", "dog", "sun", "map", "cup", "pen", "box", "key"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny fp32 model (with tokenizer), and its 4-bit checkpoint as save_pretrained of our load writes it."""
    root = tmp_path_factory.mktemp("trainers")
    write_tiny(root / "fp32")
    _load(root / "fp32").save_pretrained(root / "nf4")
    return root


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QLoraKernelsConfig(), dtype=torch.float32)


def _lora():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _common(out, steps=2, bf16=False):
    # TRL's configs default to bf16 mixed precision (autocast on the CPU too); the Trainer / SFT runs use fp32, so that
    # the trained model's own logits compare bit for bit with the reloads; the DPO run keeps TRL's default
    return dict(output_dir=str(out), max_steps=steps, save_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, report_to=[], use_cpu=True, seed=0, bf16=bf16)


def _adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _check_checkpoints(out, steps=2):
    for step in range(1, steps + 1):
        files = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert ADAPTER_FILES <= files and "model.safetensors" not in files, files
        assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files


def _check_reloads(adapter_dir, trained, nf4_dir, compare_trained=True):
    """The saved adapter is the trained one (every tensor bitwise) and reloads onto fresh loads of the 4-bit checkpoint:
    PEFT on ours and qlora_kernels.load_adapter give the same logits bit for bit (and the trained model's, when it runs
    in fp32: under bf16 mixed precision accelerate leaves the trained model's forward in autocast), PEFT on
    transformers' bitsandbytes model within 1e-5. Returns the largest bitsandbytes difference."""
    from safetensors.torch import load_file

    assert ADAPTER_FILES <= {p.name for p in Path(adapter_dir).iterdir()}
    saved = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    live = {n.replace(".default.", "."): p for n, p in trained.named_parameters() if ".default." in n}
    assert set(saved) == set(live) and all(torch.equal(saved[k], live[k].detach()) for k in saved)
    x = ids()
    with torch.no_grad():
        ours = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(nf4_dir, config=bnb_free_config(nf4_dir), dtype=torch.float32,
                                                 quantization_config=QLoraKernelsConfig()),
            adapter_dir, config=LoraConfig.from_pretrained(adapter_dir)).eval()
        assert isinstance(ours.base_model.model.model.layers[0].self_attn.q_proj, NF4LoraLinear)
        want = ours(input_ids=x).logits
        if compare_trained:
            torch.testing.assert_close(trained.eval()(input_ids=x).logits, want, atol=0, rtol=0)
        convenience = qk.load_adapter(qk.load_4bit_model(nf4_dir, dtype=torch.float32), adapter_dir).eval()
        torch.testing.assert_close(convenience(input_ids=x).logits, want, atol=0, rtol=0)
    pytest.importorskip("bitsandbytes")
    # train mode (PEFT sets eval): bitsandbytes repacks into another CPU layout in an eval-mode, no-grad forward
    ref = peft.PeftModel.from_pretrained(bnb_model(nf4_dir), adapter_dir).train()
    got, bound, why = bounds.logits_bound(ref, x)
    bounds.assert_within("bitsandbytes + PEFT vs ours", got, want, bound, why=why)
    return float((got - want).abs().max())


def _check_resume(make_trainer, out, first_run):
    """A second run resumed from checkpoint-1 ends with the uninterrupted run's adapters, bit for bit."""
    trainer = make_trainer(out)
    trainer.train(resume_from_checkpoint=str(out.parent / first_run / "checkpoint-1"))
    return trainer


def _applied(path):
    """The other way in: our loader and apply_qlora, then as_peft_model for the Trainer."""
    return as_peft_model(qk.apply_qlora(qk.load_4bit_model(path, dtype=torch.float32), r=4, lora_alpha=8))


@pytest.mark.parametrize("route", ["get_peft_model", "apply_qlora"])
def test_hf_trainer(dirs, tmp_path, route):
    rows = [{"input_ids": ids(1, 10, seed=i)[0].tolist(), "labels": ids(1, 10, seed=i)[0].tolist()} for i in range(8)]

    def make(out):
        model = peft.get_peft_model(_load(dirs / "fp32"), _lora()) if route == "get_peft_model" else _applied(
            dirs / "nf4")
        return transformers.Trainer(model=model, args=transformers.TrainingArguments(**_common(out)),
                                    train_dataset=rows)

    trainer = make(tmp_path / "run")
    trainer.train()
    _check_checkpoints(tmp_path / "run")
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "model.safetensors").exists()
    _check_reloads(tmp_path / "final", trainer.model, dirs / "nf4")
    resumed = _check_resume(make, tmp_path / "resumed", "run")
    want, got = _adapters(trainer.model), _adapters(resumed.model)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_sft_trainer(dirs, tmp_path):
    from trl import SFTConfig, SFTTrainer

    rows = datasets.Dataset.from_list([{"text": f"{w} -> {w[::-1]}"} for w in WORDS])

    def make(out):
        return SFTTrainer(model=_load(dirs / "fp32"), args=SFTConfig(max_length=32, **_common(out)), train_dataset=rows,
                          processing_class=tiny_tokenizer(), peft_config=_lora())

    trainer = make(tmp_path / "run")
    assert isinstance(trainer.model, peft.PeftModel)
    trainer.train()
    _check_checkpoints(tmp_path / "run")
    trainer.save_model(str(tmp_path / "final"))
    _check_reloads(tmp_path / "final", trainer.model, dirs / "nf4")
    resumed = _check_resume(make, tmp_path / "resumed", "run")
    want, got = _adapters(trainer.model), _adapters(resumed.model)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("route", ["peft_config", "apply_qlora"])
def test_dpo_trainer_reference_is_the_model_with_adapters_disabled(dirs, tmp_path, route):
    """No second model: DPOTrainer's reference is the policy with its adapters disabled, and the first step's rewards
    (beta * the policy / reference log-ratio, LoRA B = 0) are exactly 0 (TRL rebuilt a full-precision reference from
    config._name_or_path for a model it did not know to be a PEFT model: 0.012)."""
    from trl import DPOConfig, DPOTrainer

    rows = datasets.Dataset.from_list([{"prompt": f"{w} -> ", "chosen": w[::-1].upper(), "rejected": w[::-1]}
                                       for w in WORDS])

    def make(out):
        args = DPOConfig(beta=0.1, max_length=32, **_common(out, bf16=True))
        if route == "apply_qlora":
            return DPOTrainer(model=_applied(dirs / "nf4"), args=args, train_dataset=rows,
                              processing_class=tiny_tokenizer())
        return DPOTrainer(model=_load(dirs / "fp32"), args=args, train_dataset=rows, processing_class=tiny_tokenizer(),
                          peft_config=_lora())

    trainer = make(tmp_path / "run")
    assert trainer.ref_model is None and isinstance(trainer.model, peft.PeftModel)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/chosen" in h]
    assert logs[0]["rewards/chosen"] == 0.0 and logs[0]["rewards/rejected"] == 0.0
    assert logs[0]["rewards/margins"] == 0.0 and logs[-1]["rewards/margins"] != 0.0  # and then it learns
    assert trainer.args.bf16  # TRL's default: the policy and the reference ran under bf16 autocast, still exactly 0
    _check_checkpoints(tmp_path / "run")
    trainer.save_model(str(tmp_path / "final"))
    _check_reloads(tmp_path / "final", trainer.model, dirs / "nf4", compare_trained=False)
    resumed = _check_resume(make, tmp_path / "resumed", "run")
    want, got = _adapters(trainer.model), _adapters(resumed.model)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("script", ["hf_trl_qlora.py", "pytorch_qlora.py"])
def test_example_scripts_run(script, tmp_path):
    """The README's HF/TRL and plain-PyTorch examples run on a CPU with the tiny model they build."""
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--out", str(tmp_path), "--steps", "2"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max |logit difference| 0" in proc.stdout, proc.stdout
    if script == "hf_trl_qlora.py":
        assert "first-step rewards chosen / rejected 0.0 0.0" in proc.stdout
        assert ADAPTER_FILES <= {p.name for p in (tmp_path / "sft" / "final").iterdir()}
    else:
        assert ADAPTER_FILES <= {p.name for p in (tmp_path / "adapter").iterdir()}
