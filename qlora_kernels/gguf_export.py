"""GGUF (llama.cpp, Ollama) from a merged transformers model: :func:`write_gguf`, used by
:func:`qlora_kernels.export.export_model` with ``format="gguf"``.

One ``model.gguf`` holds the weights, the architecture's hyper-parameters and the tokenizer (its tokens, token
types, BPE merges, special token ids and chat template), written with the ``gguf`` package (``pip install gguf``,
the ``export`` extra). Architectures: Llama and Mistral (llama.cpp's ``llama``; the query and key projections'
rows are reordered from transformers' rotate-half rope layout to GGML's interleaved pairs, as llama.cpp's own
converter does) and Qwen2 / Qwen3 (``qwen2`` / ``qwen3``, NEOX rope, nothing reordered), with default rope (no
rope scaling). Tokenizers: byte-level BPE (``tokenizer.json`` of model type BPE without byte fallback: GPT-2,
Llama 3, Qwen); SentencePiece tokenizers are refused, naming what they are.

Tensor types (``gguf_type``): ``f16``, ``bf16`` or ``q8_0`` (blocks of 32 with one fp16 scale; a matrix whose
rows are not whole blocks is written f16); the 1-D tensors (norms, biases) are always f32. :func:`read_back`
returns the written tensors as fp32 torch tensors in transformers' names and layout (reorder undone): the export
compares a model built from them with the adapter model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

GGUF_TYPES = ("f16", "bf16", "q8_0")
# transformers model_type -> (llama.cpp architecture, whether q/k rows are reordered for GGML's rope)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "qwen3": ("qwen3", False)}
FILE_NAME = "model.gguf"


class GGUFExportError(ValueError):
    """What this GGUF writer cannot represent (an architecture, a rope setting, a tokenizer), named."""


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("format gguf needs the gguf package: pip install gguf (or the export extra: "
                              "pip install 'qlora_kernels[export]')") from None
    return gguf


def check_model(config: Any) -> tuple[str, bool]:
    """``(llama.cpp architecture, reorder q/k)`` of a transformers config, or GGUFExportError naming what is not
    supported."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise GGUFExportError(f"format gguf: architecture {kind!r} is not supported (supported: "
                              f"{', '.join(ARCHITECTURES)}); export merged16 and convert it with llama.cpp's "
                              "convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise GGUFExportError(f"format gguf: rope_type {rope_type!r} (rope scaling) is not supported by this "
                              "writer; export merged16 and convert it with llama.cpp's convert_hf_to_gguf.py")
    return ARCHITECTURES[kind]


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _heads(config: Any) -> tuple[int, int]:
    """``(query heads, key/value heads)`` of a config."""
    n_head = int(config.num_attention_heads)
    return n_head, int(getattr(config, "num_key_value_heads", None) or n_head)


def reorder_rows(w: Tensor, n_head: int) -> Tensor:
    """transformers' rotate-half layout of a query or key projection (each head's first half of rows, then its
    second half) to GGML's interleaved pairs; ``n_head``: the projection's heads."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def restore_rows(w: Tensor, n_head: int) -> Tensor:
    """The inverse of :func:`reorder_rows`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_fields(tokenizer: Any, tokenizer_json: Path) -> dict[str, Any]:
    """Tokens by id, their types, the BPE merges and the special ids, or GGUFExportError for other tokenizers."""
    if not tokenizer_json.is_file():
        raise GGUFExportError("format gguf: the tokenizer has no tokenizer.json (a slow tokenizer); only fast "
                              "byte-level BPE tokenizers are written")
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"format gguf: a {model.get('type')} tokenizer is not supported; only byte-level BPE "
                              "(GPT-2, Llama 3, Qwen tokenizers)")
    if model.get("byte_fallback"):
        raise GGUFExportError("format gguf: a SentencePiece-style BPE tokenizer (byte_fallback, e.g. Llama 2, "
                              "Mistral v0.1) is not supported yet; export merged16 and convert it with llama.cpp")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED where the vocabulary has a hole
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, 1
    for added in spec.get("added_tokens", []):
        i = added["id"]
        if 0 <= i < size:
            types[i] = 3 if added.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_gguf(model: nn.Module, tokenizer: Any, tokenizer_json: Path, path: Path, gguf_type: str, name: str) -> None:
    """Write ``model`` (a dense, merged transformers causal LM) and ``tokenizer`` to ``path`` as GGUF."""
    gguf = require_gguf()
    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}; got {gguf_type!r}")
    config = model.config
    arch, reorder = check_model(config)
    fields = _tokenizer_fields(tokenizer, tokenizer_json)
    n_head, n_kv = _heads(config)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], int(config.num_hidden_layers))

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_dimension_count(_head_dim(config))
    w.add_key_length(_head_dim(config))
    w.add_value_length(_head_dim(config))
    w.add_vocab_size(len(fields["tokens"]))
    w.add_file_type(file_type)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(fields["tokens"])
    w.add_token_types(fields["types"])
    if fields["merges"]:
        w.add_token_merges(fields["merges"])
    for what, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                        ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
        if isinstance(value, int) and value >= 0:
            getattr(w, f"add_{what}_token_id")(value)
    # whether the tokenizer puts BOS / EOS around a text itself (its post-processor, whatever its add_bos_token says):
    # llama.cpp adds them as these flags say
    probe = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    w.add_add_bos_token(bos is not None and probe[:1] == [bos])
    w.add_add_eos_token(eos is not None and len(probe) > 1 and probe[-1:] == [eos])
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, t in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads the tied output projection from token_embd
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise GGUFExportError(f"format gguf: tensor {key!r} has no GGUF name for architecture {arch}")
        t = t.detach().float()
        if reorder and key.endswith("self_attn.q_proj.weight"):
            t = reorder_rows(t, n_head)
        elif reorder and key.endswith("self_attn.k_proj.weight"):
            t = reorder_rows(t, n_kv)
        data = t.numpy()
        if t.dim() == 1:
            w.add_tensor(target, data)
        elif gguf_type == "f16" or (gguf_type == "q8_0" and t.shape[-1] % 32):
            w.add_tensor(target, data.astype("float16"))
        else:
            qtype = gguf.GGMLQuantizationType.BF16 if gguf_type == "bf16" else gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_back(path: Path, model: nn.Module) -> dict[str, Tensor]:
    """The tensors of a GGUF file written by :func:`write_gguf` for ``model``, as fp32 torch tensors under ``model``'s
    state-dict names and shapes (the q/k reorder undone); a tied output projection is ``token_embd``'s."""
    gguf = require_gguf()
    config = model.config
    arch, reorder = check_model(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], int(config.num_hidden_layers))
    n_head, n_kv = _heads(config)
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    out = {}
    for key, ref in model.state_dict().items():
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if key == "lm_head.weight" and target not in stored:
            target = names.get_name("model.embed_tokens.weight", try_suffixes=(".weight",))
        t = stored[target]
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
        v = torch.from_numpy(values.astype("float32").copy())
        if reorder and key.endswith("self_attn.q_proj.weight"):
            v = restore_rows(v, n_head)
        elif reorder and key.endswith("self_attn.k_proj.weight"):
            v = restore_rows(v, n_kv)
        out[key] = v
    return out
