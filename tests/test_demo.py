"""The demo end to end (shortened), and its adapter loaded by PEFT on the unquantized base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kernels import cli
from qlora_kernels.demo import synthetic
from qlora_kernels.demo.run import exact_match
from qlora_kernels.train.data import read_rows

EVAL_ROWS = 60


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    code = cli.main(["demo", "--steps", "80", "--eval-rows", str(EVAL_ROWS), "--output-dir", str(out),
                     "--no-progress", "--grpo-steps", "0"])  # the GRPO stage: tests/test_dpo.py's full demo
    assert code == 0
    return out


def test_shipped_assets_are_small_and_safetensors_only():
    files = [p for p in synthetic.DATA_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 3_000_000
    assert (synthetic.BASE_MODEL_DIR / "model.safetensors").is_file()
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


def test_held_out_rows_are_not_in_training_data():
    train = {json.dumps(r, sort_keys=True) for _, r in read_rows(synthetic.TRAIN_FILE)}
    evals = [r for _, r in read_rows(synthetic.EVAL_FILE)]
    assert len(evals) == 200 and not any(json.dumps(r, sort_keys=True) in train for r in evals)
    held = synthetic.held_out_sentences(evals)
    assert not held & synthetic.held_out_sentences([r for _, r in read_rows(synthetic.TRAIN_FILE)])


def test_demo_fine_tune_improves_held_out_exact_match(demo_run):
    res = json.loads((demo_run / "demo_result.json").read_text())
    assert res["steps"] == 80
    assert res["after"] >= 0.6 and res["after"] >= res["before"] + 0.3, res
    assert (demo_run / "adapter_model.safetensors").is_file() and (demo_run / "loss.png").is_file()


def test_demo_adapter_loads_with_peft(demo_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(synthetic.BASE_MODEL_DIR, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(demo_run))
    saved = load_file(str(demo_run / "adapter_model.safetensors"))
    loaded = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) > 0
    for key, value in saved.items():
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(loaded[name].detach(), value.to(loaded[name].dtype)), key
    # The adapter also works on the unquantized base (PEFT's own LoRA forward).
    tok = AutoTokenizer.from_pretrained(synthetic.BASE_MODEL_DIR)
    rows = [r for _, r in read_rows(synthetic.EVAL_FILE)][:EVAL_ROWS]
    acc, _ = exact_match(peft_model, tok, rows)
    res = json.loads((demo_run / "demo_result.json").read_text())
    assert acc >= res["after"] - 0.15, (acc, res)
