"""``qlora-kernels export`` / :func:`qlora_kernels.export.export_model`: merged16 reloads with plain transformers to
the adapter model's logits within the dtype's rounding; bnb4 reloads in 4 bits (transformers + bitsandbytes, and
load_4bit_model) and says what the requantization costs, refusing it past max_loss_increase; bad input leaves
nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.export import ExportError, export_model
from qlora_kernels.nn import NF4Linear

from . import bounds
from .hf_tiny import bnb_model, ids, tiny_tokenizer, write_tiny

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _adapter(base: Path, out: Path, std: float, seed: int = 0) -> Path:
    model = qk.load_4bit_model(base, dtype=torch.float32)
    qk.apply_qlora(model, r=4, lora_alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)
    qk.save_adapter(model, out)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("export")
    write_tiny(d / "base")  # hidden 64: whole NF4 blocks a row
    tiny_tokenizer().save_pretrained(d / "base")
    rows = [{"text": f"say {w} back: {w[::-1]}"} for w in ("cat", "dog", "sun", "map", "cup", "pen")]
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": d, "base": d / "base", "adapter": _adapter(d / "base", d / "adapter", 0.02),
            "eval": d / "eval.jsonl"}


def _adapter_model(assets):
    return qk.load_adapter(qk.load_4bit_model(assets["base"], dtype=torch.float32), assets["adapter"],
                           is_trainable=False).eval()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merged16_reloads_with_transformers_to_the_adapter_model(assets, tmp_path, dtype):
    out = tmp_path / "merged"
    report = export_model(assets["base"], assets["adapter"], out, format="merged16", dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config or config["quantization_config"] is None
    assert {"model.safetensors", "config.json", "tokenizer.json", "export_report.json"} <= set(report.files)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain transformers
    assert not any(isinstance(m, NF4Linear) for m in reloaded.modules())
    stored = reloaded.model.layers[0].self_attn.q_proj.weight
    want_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert AutoModelForCausalLM.from_pretrained(out).model.layers[0].self_attn.q_proj.weight.dtype == want_dtype
    x = ids()
    ours = _adapter_model(assets)
    with torch.no_grad():
        got, want = reloaded(input_ids=x).logits, ours(input_ids=x).logits
    if dtype == "fp32":
        with torch.no_grad():
            bounds.assert_logits_within("merged16 fp32 vs the adapter model", got, ours, x)
    else:  # bf16 weights: each weight rounded once (2^-9 relative), the forward in fp32 on the rounded weights
        rho = 2.0 ** -9 * 2 * (2 * 2 + 1)  # the rounded weights of 2 layers' 5 chained products, first order
        scale = bounds.abs_matmul(ours(input_ids=x, output_hidden_states=True).hidden_states[-1],
                                  ours.get_output_embeddings().weight)
        bounds.assert_within("merged16 bf16 vs the adapter model", got, want, rho * scale + 1e-3,
                             why="bf16 weight rounding 2^-9 x 10 chained products x |h| @ |W_lm|^T")
        assert float(stored.abs().sum()) > 0
    assert 0 < report.max_abs_logit_change and report.mean_abs_logit_change <= report.max_abs_logit_change
    assert (out / "export_report.json").is_file() and not list(tmp_path.glob(".tmp-export-*"))


def test_bnb4_reloads_in_4_bits_and_reports_its_cost(assets, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "bnb4"
    report = export_model(assets["base"], assets["adapter"], out, format="bnb4", dtype="fp32",
                          eval_data=assets["eval"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"]
    theirs = bnb_model(out)  # transformers + bitsandbytes
    assert type(theirs.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    ours = qk.load_4bit_model(out, dtype=torch.float32).eval()
    x = ids()
    with torch.no_grad():
        bounds.assert_logits_within("bitsandbytes vs ours on the exported bytes", theirs(input_ids=x).logits, ours, x)
    # requantizing the merged weights changes the model: measured, against the unmerged adapter model
    assert 0 < report.mean_abs_logit_change <= report.max_abs_logit_change
    assert report.eval_loss_adapter is not None and report.eval_loss_exported is not None
    assert report.inputs == f"6 rows of {assets['eval']}"
    saved = json.loads((out / "export_report.json").read_text())
    assert saved["eval_loss_increase"] == pytest.approx(report.eval_loss_increase)
    # a bound below the measured increase refuses, and leaves nothing behind
    refused = tmp_path / "refused"
    with pytest.raises(ExportError, match="raises the eval loss by"):
        export_model(assets["base"], _adapter(assets["base"], tmp_path / "big", 0.5), refused, format="bnb4",
                     dtype="fp32", eval_data=assets["eval"], max_loss_increase=0.0)
    assert not refused.exists() and not list(tmp_path.glob(".tmp-export-*"))


def test_bad_input_is_refused_before_anything_is_written(assets, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        export_model(assets["base"], assets["adapter"], out)
    new = tmp_path / "new"
    for kw, err, msg in (({"format": "gguf9"}, ExportError, "format must be one of merged16, bnb4"),
                         ({"dtype": "int8"}, ExportError, "dtype must be one of bf16, fp16, fp32"),
                         ({"max_loss_increase": 0.1}, ExportError, "max_loss_increase needs eval_data"),
                         ({"eval_data": tmp_path / "none.jsonl"}, FileNotFoundError, "eval_data must be a JSONL")):
        with pytest.raises(err, match=msg):
            export_model(assets["base"], assets["adapter"], new, **kw)
    with pytest.raises(FileNotFoundError, match="adapter must be a PEFT adapter directory"):
        export_model(assets["base"], tmp_path / "nothing", new)
    write_tiny(tmp_path / "gpt2", arch="gpt2")  # another architecture: the adapter's layers are not there
    with pytest.raises(ValueError, match="adapter"):
        export_model(tmp_path / "gpt2", assets["adapter"], new)
    # the same shapes under another name: refused unless allowed
    import shutil

    renamed = tmp_path / "renamed_base"
    shutil.copytree(assets["base"], renamed)
    with pytest.raises(ExportError, match="allow_other_base"):
        export_model(renamed, assets["adapter"], new)
    assert not new.exists() and not list(tmp_path.glob(".tmp-export-*"))
    report = export_model(renamed, assets["adapter"], new, allow_other_base=True)
    assert Path(report.out_dir) == new and new.is_dir()


def test_the_export_command(assets, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "qlora_kernels", "export", str(assets["base"]), "--adapter", str(assets["adapter"]),
           "--output", str(out), "--format", "merged16", "--dtype", "fp32", "--eval-data", str(assets["eval"]),
           "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["format"] == "merged16" and abs(rec["eval_loss_increase"]) < 1e-4
    assert (out / "model.safetensors").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 2 and "error: out_dir" in again.stderr and "exists" in again.stderr
