"""Fine-tuned models out of the package: a base model and its LoRA adapter written as one checkpoint that plain
transformers (and the tools that read its format) loads without this package.

:func:`export_model` (the ``qlora-kernels export`` command) loads the base as the adapter was trained on it, in
NF4 (:func:`~qlora_kernels.load_4bit_model`: a float checkpoint quantized as it is read, a bitsandbytes 4-bit one on
its bytes), puts the adapter on it (:func:`~qlora_kernels.load_adapter`) and writes one of:

* ``merged16``: every adapted layer merged into a dense weight ``deq(W) + scaling · B @ A`` (computed in fp32,
  :func:`~qlora_kernels.merge_and_unload`), every other NF4 layer dequantized, saved in ``dtype`` (bf16, fp16 or
  fp32) with the tokenizer: an ordinary transformers directory (vLLM, TGI, llama.cpp's converter read it). Its
  logits are the adapter model's up to ``dtype``'s rounding. The base's NF4 values, not its original float
  weights, are what is merged into: the adapter was trained to correct that model.
* ``gguf``: the same merge in fp32 written as one ``model.gguf`` for llama.cpp / Ollama (:mod:`.gguf_export`:
  Llama, Mistral, Qwen2, Qwen3 with byte-level BPE tokenizers; ``gguf_type`` f16, bf16 or q8_0), the tokenizer and
  its chat template in the metadata. The cost is measured on the model rebuilt from the file's tensors.
* ``bnb4``: the same merge in fp32, quantized again to NF4 in bitsandbytes' format (the base's blocksize and
  double quantization) with its ``quantization_config``: transformers + bitsandbytes, and this package, load it in
  4 bits. Quantizing the merged weight is not lossless (PEFT #2321: merging into a 4-bit base without saying so
  loses the fine-tune); the cost is measured and printed: the max and mean |logit change| against the unmerged
  adapter model, and with ``eval_data`` the eval loss of both. ``max_loss_increase`` refuses (nothing written) a
  merge whose eval loss rises by more.

Every format reports these numbers for its own output, reloaded from the written files (``merged16`` by
transformers' ``from_pretrained``; ``bnb4`` by :func:`~qlora_kernels.load_4bit_model`, which reads the bytes
bitsandbytes reads and computes as the adapter model did).
Output goes to a temporary sibling directory renamed into place at the end: an error leaves nothing behind, and
an existing ``out_dir`` is refused.

``eval_data``: a JSONL file of rows with ``text``, or ``prompt`` and ``completion`` (joined), or alpaca's
``instruction`` / ``input`` / ``output``; its loss is the mean next-token cross-entropy over every token of the
rows. Without it the logits are compared on a few fixed random token sequences.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

FORMATS = ("merged16", "bnb4", "gguf")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and what it costs against the adapter model (the unmerged base + adapter)."""

    out_dir: str
    format: str
    dtype: str
    files: list[str] = field(default_factory=list)
    max_abs_logit_change: float = 0.0  # the written model, reloaded, against the adapter model
    mean_abs_logit_change: float = 0.0
    logit_scale: float = 0.0  # the adapter model's mean |logit|, for scale
    eval_loss_adapter: float | None = None  # with eval_data
    eval_loss_exported: float | None = None
    inputs: str = ""  # what the logits were compared on

    @property
    def eval_loss_increase(self) -> float | None:
        if self.eval_loss_adapter is None or self.eval_loss_exported is None:
            return None
        return self.eval_loss_exported - self.eval_loss_adapter

    def summary(self) -> str:
        lines = [f"exported {self.format} ({self.dtype}) to {self.out_dir}: {', '.join(self.files)}",
                 f"against the adapter model on {self.inputs}: |logit change| max {self.max_abs_logit_change:.3g}, "
                 f"mean {self.mean_abs_logit_change:.3g} (mean |logit| {self.logit_scale:.3g})"]
        if self.eval_loss_increase is not None:
            lines.append(f"eval loss {self.eval_loss_adapter:.5f} (adapter model) -> {self.eval_loss_exported:.5f} "
                         f"(exported), change {self.eval_loss_increase:+.5f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "eval_loss_increase": self.eval_loss_increase}


class ExportError(ValueError):
    """The export was refused (nothing written): bad input, or a merge that costs more than allowed."""


def export_model(base: str | Path, adapter: str | Path, out_dir: str | Path, *, format: str = "merged16",
                 dtype: str | torch.dtype = "bf16", eval_data: str | Path | None = None,
                 max_loss_increase: float | None = None, allow_other_base: bool = False,
                 max_eval_rows: int = 256, gguf_type: str = "q8_0") -> ExportReport:
    """Merge ``adapter`` into ``base`` and write ``out_dir`` in ``format`` (see the module docstring).

    Args:
        base: the base model directory the adapter was trained on (float or bitsandbytes 4-bit checkpoint).
        adapter: a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        out_dir: the directory to create (it must not exist).
        format: ``"merged16"``, ``"bnb4"`` or ``"gguf"``.
        dtype: the dtype of the written weights (``merged16``; ``bnb4``: of its dense layers and compute dtype):
            ``"bf16"``, ``"fp16"``, ``"fp32"`` or the torch dtype.
        eval_data: JSONL rows to measure the eval loss of the adapter model and of the export on.
        max_loss_increase: with ``eval_data``: refuse (ExportError, nothing written) an export whose eval loss is
            higher than the adapter model's by more than this.
        allow_other_base: export an adapter whose ``adapter_config.json`` names another base model whose shapes fit
            (by default that is refused).
        max_eval_rows: at most this many rows of ``eval_data`` are read.
        gguf_type: with ``format="gguf"``: ``"f16"``, ``"bf16"`` or ``"q8_0"`` (the 2-D tensors' type).

    Raises:
        FileNotFoundError: no base model directory, no adapter directory, no eval_data file.
        FileExistsError: ``out_dir`` exists.
        ExportError: a bad format, dtype or setting; an adapter for another base; a merge over the allowed loss.
        ValueError: an adapter whose shapes do not fit the base (from :func:`~qlora_kernels.load_adapter`).
    """
    from .generation import load_model
    from .hf import load_4bit_model, merge_and_unload
    from .hf.adapters import OtherBaseModelWarning
    from .nn import NF4Linear

    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    torch_dtype = _dtype(dtype)
    if format == "gguf":
        from .gguf_export import GGUF_TYPES, require_gguf

        if gguf_type not in GGUF_TYPES:
            raise ExportError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}; got {gguf_type!r}")
        require_gguf()  # the package is there, before anything loads
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"out_dir {str(out)!r} exists; export writes a new directory (remove it, or choose "
                              "another)")
    if max_loss_increase is not None:
        if isinstance(max_loss_increase, bool) or not isinstance(max_loss_increase, (int, float)) or not (
                math.isfinite(max_loss_increase) and max_loss_increase >= 0):
            raise ExportError(f"max_loss_increase must be a finite number >= 0; got {max_loss_increase!r}")
        if eval_data is None:
            raise ExportError("max_loss_increase needs eval_data: the eval loss is measured on it")
    if eval_data is not None and not Path(eval_data).is_file():
        raise FileNotFoundError(f"eval_data must be a JSONL file; {str(eval_data)!r} does not exist")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OtherBaseModelWarning)
        model, tokenizer = load_model(base, four_bit=True, adapter=adapter, dtype=torch.float32)
    for w in caught:
        if issubclass(w.category, OtherBaseModelWarning) and not allow_other_base:
            raise ExportError(f"{w.message}; export it anyway with allow_other_base=True (--allow-other-base)")
        if not issubclass(w.category, OtherBaseModelWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if format == "gguf":
        from .gguf_export import check_model

        check_model(model.config)  # an architecture or rope the writer cannot hold: refused before any work
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    blocksize = nf4[0].nf4_blocksize if nf4 else 64
    double_quant = any(m.nf4_nested_absmax is not None for m in nf4)

    inputs, what = _eval_inputs(eval_data, tokenizer, max_eval_rows, model)
    with torch.no_grad():
        want = [model(input_ids=x).logits.float() for x in inputs]
    loss_adapter = _loss(want, inputs) if eval_data is not None else None

    merge_and_unload(model, dtype=torch.float32)  # the fp32 merge; the adapter model's logits are kept above
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if format == "merged16":
            model.to(torch_dtype).save_pretrained(tmp, safe_serialization=True)
        elif format == "gguf":
            from .gguf_export import FILE_NAME, read_back, write_gguf

            scratch = tmp / "tokenizer"
            tokenizer.save_pretrained(scratch)  # (creates tmp too)
            write_gguf(model, tokenizer, scratch / "tokenizer.json", tmp / FILE_NAME, gguf_type, Path(base).name)
            shutil.rmtree(scratch)
            model.load_state_dict(read_back(tmp / FILE_NAME, model))  # the model the file holds, to measure
        else:
            dense = tmp / "merged-fp32"
            model.save_pretrained(dense, safe_serialization=True)
            quantized = load_4bit_model(dense, dtype=torch_dtype, blocksize=blocksize, double_quant=double_quant)
            quantized.save_pretrained(tmp, safe_serialization=True)
            shutil.rmtree(dense)
            del quantized
        if format == "gguf":
            got_model = model.eval()
        else:
            tokenizer.save_pretrained(tmp)
            del model
            got_model = _reload(tmp, format, torch_dtype)
        with torch.no_grad():
            got = [got_model(input_ids=x).logits.float() for x in inputs]
        diffs = torch.cat([(g - w).abs().flatten() for g, w in zip(got, want)])
        kind = gguf_type if format == "gguf" else str(torch_dtype).removeprefix("torch.")
        report = ExportReport(out_dir=str(out), format=format, dtype=kind,
                              files=sorted(p.name for p in tmp.iterdir()),
                              max_abs_logit_change=float(diffs.max()), mean_abs_logit_change=float(diffs.mean()),
                              logit_scale=float(torch.cat([w.abs().flatten() for w in want]).mean()),
                              eval_loss_adapter=loss_adapter,
                              eval_loss_exported=_loss(got, inputs) if eval_data is not None else None, inputs=what)
        increase = report.eval_loss_increase
        if max_loss_increase is not None and increase is not None and increase > max_loss_increase:
            raise ExportError(f"the {format} export raises the eval loss by {increase:.5f} "
                              f"({report.eval_loss_adapter:.5f} -> {report.eval_loss_exported:.5f}), more than "
                              f"max_loss_increase {max_loss_increase}; nothing written")
        (tmp / "export_report.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        report.files = sorted(p.name for p in tmp.iterdir())
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ExportError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")


def _reload(path: Path, format: str, dtype: torch.dtype) -> nn.Module:
    """The written model as plain transformers loads it (``bnb4``: this package's loader of the same bytes when
    bitsandbytes is not installed)."""
    from transformers import AutoModelForCausalLM

    if format == "bnb4":
        from .hf import load_4bit_model

        return load_4bit_model(path, dtype=dtype).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()


def _row_text(row: Any, where: str) -> str:
    if isinstance(row, dict):
        if isinstance(row.get("text"), str):
            return row["text"]
        if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            return row["prompt"] + row["completion"]
        if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
            return " ".join(x for x in (row["instruction"], row.get("input") or "", row["output"]) if x)
    raise ExportError(f"{where}: an eval row needs 'text', 'prompt' and 'completion', or 'instruction' and 'output' "
                      "(strings)")


def _eval_inputs(eval_data: str | Path | None, tokenizer: Any, max_rows: int, model: nn.Module) -> tuple[
        list[Tensor], str]:
    """The token sequences the logits are compared on (one tensor ``[1, T]`` each) and what they are."""
    if eval_data is None:
        vocab = int(model.get_input_embeddings().weight.shape[0])
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab, (1, 32), generator=g) for _ in range(4)], "4 random token sequences of 32"
    seqs = []
    with open(eval_data, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            if len(seqs) >= max_rows:
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ExportError(f"{eval_data}:{i + 1}: not JSON ({e.msg})") from None
            ids = tokenizer(_row_text(row, f"{eval_data}:{i + 1}"))["input_ids"]
            if len(ids) >= 2:
                seqs.append(torch.tensor([ids]))
    if not seqs:
        raise ExportError(f"eval_data {str(eval_data)!r} has no row of two tokens or more")
    return seqs, f"{len(seqs)} rows of {eval_data}"


def _loss(logits: list[Tensor], inputs: list[Tensor]) -> float:
    """Mean next-token cross-entropy over every predicted token of the sequences."""
    total, count = 0.0, 0
    for lg, x in zip(logits, inputs):
        total += float(torch.nn.functional.cross_entropy(lg[0, :-1], x[0, 1:], reduction="sum"))
        count += x.shape[1] - 1
    return total / max(1, count)
