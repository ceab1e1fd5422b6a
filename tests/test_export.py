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


# --------------------------------------------------------------------------- gguf


def test_gguf_query_key_reorder_turns_rotate_half_rope_into_interleaved_pairs():
    """llama.cpp's Llama rope rotates adjacent pairs (2i, 2i+1); transformers' rotates (i, i + d/2). The rows written
    for q_proj / k_proj, rotated GGML's way, give transformers' rotated vector, reordered."""
    from qlora_kernels.gguf_export import reorder_rows, restore_rows

    g = torch.Generator().manual_seed(0)
    n_head, d, k, pos = 3, 8, 5, 7
    w, x = torch.randn(n_head * d, k, generator=g, dtype=torch.float64), torch.randn(k, generator=g,
                                                                                     dtype=torch.float64)
    theta = pos * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [d/2]
    cos, sin = theta.cos(), theta.sin()
    y = (w @ x).view(n_head, d)
    a, b = y[:, :d // 2], y[:, d // 2:]
    hf = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=1)  # rotate_half
    z = (reorder_rows(w, n_head) @ x).view(n_head, d // 2, 2)
    ggml = torch.stack([z[..., 0] * cos - z[..., 1] * sin, z[..., 1] * cos + z[..., 0] * sin], dim=-1)
    torch.testing.assert_close(restore_rows(ggml.reshape(n_head * d, 1), n_head).view(n_head, d), hf)
    assert torch.equal(restore_rows(reorder_rows(w, n_head), n_head), w)


@pytest.fixture(scope="module")
def demo_adapter(tmp_path_factory) -> dict[str, Path]:
    """The demo's tiny Llama (a byte-level BPE tokenizer with a chat template) and an adapter on it."""
    from qlora_kernels.demo import synthetic

    d = tmp_path_factory.mktemp("gguf")
    return {"base": synthetic.BASE_MODEL_DIR, "adapter": _adapter(synthetic.BASE_MODEL_DIR, d / "adapter", 0.01),
            "root": d}


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_gguf_reads_back_with_every_tensor_and_the_tokenizer(demo_adapter, tmp_path, gguf_type):
    gguf = pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from qlora_kernels.gguf_export import reorder_rows

    out = tmp_path / "gguf"
    report = export_model(demo_adapter["base"], demo_adapter["adapter"], out, format="gguf", gguf_type=gguf_type)
    assert report.files == ["export_report.json", "model.gguf"] and report.dtype == gguf_type
    merged = qk.merge_and_unload(_adapter_model({"base": demo_adapter["base"], "adapter": demo_adapter["adapter"]}),
                                 dtype=torch.float32)
    cfg, tok = merged.config, AutoTokenizer.from_pretrained(demo_adapter["base"])
    reader = gguf.GGUFReader(str(out / "model.gguf"))

    def field(name):
        f = reader.get_field(name)
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()

    assert field("general.architecture") == "llama" and field("llama.block_count") == cfg.num_hidden_layers
    assert field("llama.attention.head_count") == cfg.num_attention_heads
    assert field("llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert field("llama.context_length") == cfg.max_position_embeddings
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == len(tok.get_vocab()) and tokens[tok.eos_token_id] == tok.eos_token
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.chat_template") == tok.chat_template
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field("tokenizer.ggml.add_bos_token") is True and field("tokenizer.ggml.add_eos_token") is False  # "a" ->
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # [BOS, a]: its post-processor adds BOS, not EOS
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    stored = {t.name: t for t in reader.tensors}
    state = merged.state_dict()
    assert len(stored) == len(state)  # every tensor (the output projection is not tied here)
    for key, want in state.items():
        t = stored[names.get_name(key, try_suffixes=(".weight", ".bias"))]
        assert [int(n) for n in t.shape][::-1] == list(want.shape), key  # GGUF lists the fastest dimension first
        if "q_proj" in key:
            want = reorder_rows(want, cfg.num_attention_heads)
        elif "k_proj" in key:
            want = reorder_rows(want, cfg.num_key_value_heads)
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape).astype("float32"))
        if want.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(got, want), key
        elif gguf_type == "f16":
            assert torch.equal(got, want.half().float()), key
        elif gguf_type == "bf16":
            assert torch.equal(got, want.bfloat16().float()), key
        else:  # q8_0: blocks of 32 along a row, scale = max |w| / 127 in fp16, codes rounded to nearest
            blocks = want.reshape(-1, 32)
            scale = blocks.abs().amax(dim=1, keepdim=True) / 127
            bound = (0.5 * scale + 127 * scale * 2.0 ** -11).expand_as(blocks).reshape(want.shape) + 1e-12
            assert bool(((got - want).abs() <= bound).all()), key
    assert 0 < report.max_abs_logit_change < 0.1 * report.logit_scale


def test_llama_cpp_runs_the_gguf_as_our_model_does(demo_adapter, tmp_path):
    """Optional (llama-cpp-python installed): llama.cpp reads the f16 GGUF, tokenizes a prompt into our tokenizer's ids,
    computes our merged model's logits within the bound of f16 weights and activations (ggml rounds both to f16 and
    accumulates in fp32), and generates our greedy tokens wherever our top-2 logits are not within that bound."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    from transformers import AutoTokenizer

    out = tmp_path / "gguf"
    export_model(demo_adapter["base"], demo_adapter["adapter"], out, format="gguf", gguf_type="f16")
    merged = qk.merge_and_unload(_adapter_model({"base": demo_adapter["base"], "adapter": demo_adapter["adapter"]}),
                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(demo_adapter["base"])
    prompt = "Translate into Lerish: ka mo ti ="
    ids = tok(prompt)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    try:
        assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids
        new = []
        for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            new.append(int(t))
            if len(new) == 12:
                break
        seq = ids + new
        llm.reset()
        llm.eval(seq)
        theirs = torch.from_numpy(np.array(llm.scores[: len(seq)], dtype=np.float32))
    finally:
        llm.close()
    cfg = merged.config
    n = bounds.model_reduce_len(merged, torch.tensor([seq]))
    rho = bounds.llama_depth(cfg.num_hidden_layers) * (2 * bounds.unit_roundoff(torch.float16) + 2 * bounds.gamma(n))
    with torch.no_grad():
        h = merged(input_ids=torch.tensor([seq]), output_hidden_states=True)
    ours = h.logits[0]
    bound = rho * bounds.abs_matmul(h.hidden_states[-1][0].float(), merged.lm_head.weight.detach().float())
    bounds.assert_within("llama.cpp vs ours, logits", theirs, ours, bound,
                         why=f"{bounds.llama_depth(cfg.num_hidden_layers)} chained reductions x (2 u_fp16 + 2 "
                             f"gamma_{n}(fp32)), x |h| @ |W_out|^T")
    top2 = ours.topk(2, dim=-1)
    for i in range(len(ids) - 1, len(seq) - 1):  # position i predicts token i + 1
        gap = float(top2.values[i, 0] - top2.values[i, 1])
        if gap <= 2 * float(bound[i].max()):
            break  # a near-tie: either token is a right answer from here on
        assert seq[i + 1] == int(top2.indices[i, 0]), (i, seq[len(ids):])


def test_gguf_refuses_what_it_cannot_hold(assets, tmp_path):
    pytest.importorskip("gguf")
    with pytest.raises(ValueError, match="a WordLevel tokenizer is not supported"):  # the tests' tiny tokenizer
        export_model(assets["base"], assets["adapter"], tmp_path / "x", format="gguf")
    with pytest.raises(ExportError, match="gguf_type must be one of f16, bf16, q8_0"):
        export_model(assets["base"], assets["adapter"], tmp_path / "x", format="gguf", gguf_type="q4_k")
    write_tiny(tmp_path / "gpt2", arch="gpt2")
    _adapter(tmp_path / "gpt2", tmp_path / "gpt2_adapter", 0.01)
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        export_model(tmp_path / "gpt2", tmp_path / "gpt2_adapter", tmp_path / "x", format="gguf")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".tmp-export-*"))
