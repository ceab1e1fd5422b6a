"""Text generation: one home for everything that decodes from a model (the ``generate`` and ``chat`` commands, the
demo's exact-match evaluation, and later the rollouts of online objectives).

Two calls:

* :func:`load_model` -- a local transformers directory as a model and its tokenizer, 4-bit by default (a float
  checkpoint quantized at load, or a bitsandbytes 4-bit checkpoint on its stored bytes, by
  :func:`~qlora_kernels.load_4bit_model`) or dense (``four_bit=False``), optionally with a PEFT LoRA adapter
  loaded live (not merged: at decode the adapter is two skinny products beside the NF4 GEMV);
* :func:`generate` -- completions of a list of prompts, in left-padded batches through transformers'
  ``generate()`` (under ``torch.inference_mode()``), with the numbers of tokens and the time spent. The KV cache
  is transformers' dynamic one by default; ``cache="static"`` takes its static cache with the decode step
  compiled by ``torch.compile`` (see :data:`CACHES`).

A prompt is a string, or a conversation (a list of ``{"role", "content"}`` messages, TRL's conversational
format) rendered by the tokenizer's chat template with the generation prompt. A string gets the chat template too
(as one user message) when ``chat_template`` is true, or when it is ``None`` (the default) and the tokenizer has a
template; ``chat_template=False`` feeds it as it is (a model trained on a raw prompt format, such as the demo's
alpaca prompts).

Sampling follows transformers' names: ``temperature``, ``top_p``, ``top_k``. On purpose unlike
``generate()``'s defaults, a temperature of 0 (the default here) is greedy decoding, as in vLLM and the OpenAI
API, and the sampling settings a checkpoint's ``generation_config.json`` carries are not applied: a call gives
the same text on every run unless it asks for sampling. With sampling, ``seed`` fixes the draws (same seed, same
prompts and ``batch_size``: same text; other batches draw in another order) without touching the caller's
random state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .dtypes import FLOAT_DTYPES

Message = dict[str, str]
Prompt = str | Sequence[Message]

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Completion:
    """One prompt's completion: its text (special tokens dropped), the new token ids (up to and including the
    end-of-sequence token when one came), the number of prompt tokens, and why it ended: ``"stop"`` (an
    end-of-sequence token) or ``"length"`` (``max_new_tokens`` reached), the OpenAI API's names."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str


@dataclass
class GenerationStats:
    """What :func:`generate` spent: ``prefill_s`` is the time to the first new token of each batch (the prompt's
    forward pass), ``decode_s`` the rest; the rates count real tokens (no padding), decode tokens per second over
    every sequence of a batch still running."""

    prompts: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    batches: int = 0

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """New tokens per second after the first of each sequence (the steady decode rate)."""
        later = self.new_tokens - self.prompts
        return later / self.decode_s if self.decode_s > 0 and later > 0 else 0.0

    @property
    def tok_s(self) -> float:
        """New tokens per second of the whole call, prefill included."""
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.prompts} prompt(s), {self.prompt_tokens} prompt tokens, {self.new_tokens} new tokens in "
                f"{self.total_s:.2f} s: {self.tok_s:.1f} tok/s (prefill {self.prefill_tok_s:.0f} tok/s, decode "
                f"{self.decode_tok_s:.1f} tok/s)")


@dataclass
class GenerationResult:
    completions: list[Completion]
    stats: GenerationStats = field(default_factory=GenerationStats)

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]


# ---------------------------------------------------------------------------------------------
# loading


def load_model(model_dir: str | Path, *, four_bit: bool = True, adapter: str | Path | None = None,
               dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None,
               tokenizer_dir: str | Path | None = None) -> tuple[nn.Module, Any]:
    """A local transformers model directory as ``(model, tokenizer)`` for generation, in eval mode.

    Args:
        model_dir: a directory with ``config.json``, safetensors weights and a tokenizer.
        four_bit: NF4 linear layers (:func:`~qlora_kernels.load_4bit_model`: a float checkpoint is quantized as
            it is read, a bitsandbytes 4-bit checkpoint taken on its bytes); False loads the dense model
            (``AutoModelForCausalLM.from_pretrained``), which a 4-bit checkpoint cannot give.
        adapter: a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``), loaded
            live and frozen (:func:`~qlora_kernels.load_adapter`; on a dense model, plain LoRA on the dense
            layers, nothing quantized).
        dtype: the compute dtype (default bf16, which the CPU and GPU kernels decode fastest).
        device: where the model goes (default CPU).
        tokenizer_dir: the tokenizer's directory when it is not ``model_dir``.

    Raises:
        FileNotFoundError: no model directory (or no config.json), no adapter directory.
        ValueError: an adapter for another model (naming the layers that do not fit), a 4-bit checkpoint with
            ``four_bit=False``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .bnb_format import read_quantization_config
    from .hf import load_4bit_model, load_adapter
    from .hf.layers import KEEP_DENSE, linear_modules

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise FileNotFoundError(f"model_dir must be a local transformers model directory; {str(path)!r} {what}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16; got {dtype}")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        what = "does not exist" if not Path(adapter).exists() else "has no adapter_config.json"
        raise FileNotFoundError(f"adapter must be a PEFT adapter directory; {str(adapter)!r} {what}")
    tok_path = Path(tokenizer_dir) if tokenizer_dir is not None else path
    tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
    if four_bit:
        model = load_4bit_model(path, dtype=dtype, device=device)
    else:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if read_quantization_config(config) is not None:
            raise ValueError(f"{str(path)!r} holds a 4-bit checkpoint, which cannot be loaded dense; load it 4-bit "
                             "(four_bit=True, the command's default)")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        if device is not None:
            model.to(device)
        for _, module, _ in linear_modules(model):
            setattr(module, KEEP_DENSE, True)  # an adapter on a dense model is plain LoRA: nothing is quantized
    if adapter is not None:
        load_adapter(model, adapter, is_trainable=False)
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# prompts


def context_length(model: nn.Module, tokenizer: Any = None) -> int | None:
    """The number of positions the model takes (prompt and new tokens together), from its config
    (``max_position_embeddings`` or its older names), or None when neither the config nor the tokenizer says."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 0:
            return n
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < 10**8 else None  # transformers' "no limit" is a huge number


def _check_messages(messages: Any, where: str) -> list[Message]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where} must be a non-empty list of {{'role', 'content'}} messages; got {messages!r}")
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}, message {j}: must be a dict with string 'role' and 'content'; got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}, message {j}: role must be one of {list(ROLES)}; got {m['role']!r}")
    if not any(m["content"].strip() for m in messages):
        raise ValueError(f"{where} is empty: every message's content is blank")
    return list(messages)


def render_prompt(prompt: Prompt, tokenizer: Any, chat_template: bool | None = None, where: str = "prompt") -> str:
    """The text a prompt becomes: a conversation through the tokenizer's chat template with the generation
    prompt; a string through it as one user message (``chat_template`` true, or None and the tokenizer has a
    template), else as it is."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where} is empty")
        if chat_template is False or (chat_template is None and not has_template):
            return prompt
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = _check_messages(prompt, where)
        if chat_template is False:
            raise ValueError(f"{where} is a conversation, which needs the chat template; chat_template is False")
    if not has_template:
        raise ValueError(f"{where}: the tokenizer has no chat_template to render a conversation with; give the "
                         "prompt as plain text (and chat_template=False / --no-chat-template)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(text: str, tokenizer: Any, templated: bool) -> list[int]:
    # A chat template writes its own special tokens (BOS and the turn markers); plain text gets the tokenizer's.
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


def encode_prompt(prompt: Prompt, tokenizer: Any, chat_template: bool | None = None, where: str = "prompt") -> tuple[
        list[int], bool]:
    """``(token ids, templated)`` of a prompt as :func:`generate` feeds it (:func:`render_prompt`, then the tokenizer
    with its special tokens unless a chat template wrote them); ``templated``: whether the chat template rendered it.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    templated = not isinstance(prompt, str) or chat_template is True or (chat_template is None and has_template)
    return _encode(render_prompt(prompt, tokenizer, chat_template, where), tokenizer, templated), templated


# ---------------------------------------------------------------------------------------------
# generating


class _Clock:
    """A ``generate()`` streamer that notes when the first new token of a batch came (prefill done) and, when
    given ``on_tokens``, hands it every new token column (streaming)."""

    def __init__(self, on_tokens: Callable[[torch.Tensor], None] | None = None) -> None:
        self.on_tokens = on_tokens
        self.calls = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 1:  # the prompt
            return
        if self.first is None:
            self.first = time.perf_counter()
        if self.on_tokens is not None:
            self.on_tokens(value)

    def end(self) -> None:
        pass


#: The KV caches :func:`generate` takes. ``"dynamic"``: transformers' default cache, eager. ``"static"``: its static
#: cache (sized to the batch's prompt plus ``max_new_tokens``), with the decode step compiled by ``torch.compile``
#: (inductor), on the CPU too, where transformers compiles only when asked: the first call of each batch shape
#: compiles (seconds to a minute), later ones reuse it, so it pays off for long generations and many prompts of
#: one shape. Measured on a 2-core CPU (a random 4-layer Llama, hidden 1024, batch 1): ~1.2x the dynamic cache's
#: decode tok/s; see benchmarks/RESULTS.md.
CACHES = ("dynamic", "static")


def cache_kwargs(cache: str) -> dict[str, Any]:
    """The keyword arguments of transformers' ``generate()`` for one of :data:`CACHES`."""
    if cache == "dynamic":
        return {}
    from transformers.generation import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False)
    # transformers' own flag (the CompileConfig class documents it) for compiling on devices other than GPUs
    config._compile_all_devices = True
    return dict(cache_implementation="static", compile_config=config)


def check_sampling(max_new_tokens: Any, temperature: Any, top_p: Any, top_k: Any, seed: Any, batch_size: Any,
                   cache: Any = "dynamic") -> None:
    """Raise ValueError naming the first bad generation setting (the checks :func:`generate` makes first; the
    command line makes them before it loads a model)."""
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {', '.join(CACHES)}; got {cache!r}")

    def positive_int(v: Any, name: str) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")

    positive_int(max_new_tokens, "max_new_tokens")
    positive_int(batch_size, "batch_size")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy); got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: no top-k cut); got {top_k!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0 or None; got {seed!r}")


# The end-of-turn markers of the common chat templates (ChatML, Llama 3, Gemma, Phi-3): a templated prompt's
# answer ends at the first of them the tokenizer has as a special token, as chat front ends stop.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def eos_token_ids(model: nn.Module, tokenizer: Any, templated: bool = False) -> list[int]:
    """The tokens that end a sequence: the model's generation config's and the tokenizer's, and with a chat
    template (``templated``) the end-of-turn markers of :data:`END_OF_TURN` that the tokenizer has."""
    ids: list[int] = []
    gc = getattr(model, "generation_config", None)
    values: list[Any] = [getattr(gc, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    if templated:
        special = set(getattr(tokenizer, "all_special_tokens", []) or [])
        values += [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN if t in special]
    for v in values:
        for i in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(i, int) and i >= 0 and i not in ids:
                ids.append(i)
    return ids


def sharded_ranks(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2 units across more than one process: then each of its forward passes is a
    collective, and every rank must run as many."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             batch_size: int = 8, chat_template: bool | None | Sequence[bool | None] = None,
             on_tokens: Callable[[torch.Tensor], None] | None = None, cache: str = "dynamic") -> GenerationResult:
    """Complete ``prompts`` (strings or conversations; see the module's docstring), ``batch_size`` at a time,
    left-padded, under ``torch.inference_mode()``, with the ``cache`` asked for.

    A model sharded with FSDP2 over several processes (:func:`sharded_ranks`) generates with the ranks in step:
    each forward is a collective, so a rank whose sequences have all ended runs the others' remaining steps too
    (transformers' ``synced_gpus``), under ``torch.no_grad()`` (FSDP2 keeps a root's gathered parameters after a
    forward; inference tensors could not be used by the training step after). Call it on every rank with the
    same number of batches (``ceil(len(prompts) / batch_size)``).

    Args:
        max_new_tokens: the most new tokens per prompt; a sequence also ends at an end-of-sequence token (the
            model's generation config's or the tokenizer's).
        temperature: 0 is greedy decoding; above 0, sampling at that temperature after the ``top_k`` (0: off)
            and ``top_p`` (1: off) cuts.
        seed: the sampling draws' seed (None: the global random state, as ``generate()`` draws).
        chat_template: see :func:`render_prompt`; one value for every prompt, or a list of one per prompt.
        on_tokens: called with each step's new tokens (a ``[batch]`` tensor) as they come: streaming.
        cache: ``"dynamic"`` or ``"static"`` (the static cache with the decode step compiled; :data:`CACHES`).

    Returns:
        The completions in the order of ``prompts`` and the token counts and times (:class:`GenerationStats`).

    Raises:
        ValueError naming the prompt: an empty prompt, a malformed conversation, a conversation without a chat
        template, a prompt whose tokens and ``max_new_tokens`` together exceed the model's context; a bad
        sampling setting, naming it.
    """
    synced = sharded_ranks(model)
    with torch.no_grad() if synced else torch.inference_mode():
        return _generate(model, tokenizer, prompts, max_new_tokens, temperature, top_p, top_k, seed, batch_size,
                         chat_template, on_tokens, cache, synced)


def _generate(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], max_new_tokens: int, temperature: float,
              top_p: float, top_k: int, seed: int | None, batch_size: int,
              chat_template: bool | None | Sequence[bool | None], on_tokens: Callable[[torch.Tensor], None] | None,
              cache: str, synced: bool) -> GenerationResult:
    check_sampling(max_new_tokens, temperature, top_p, top_k, seed, batch_size, cache)
    if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of prompts; got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: nothing to generate")
    per_prompt = list(chat_template) if isinstance(chat_template, (list, tuple)) else [chat_template] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"chat_template has {len(per_prompt)} values for {len(prompts)} prompts")
    pairs = [encode_prompt(p, tokenizer, t, where=f"prompt {i}") for i, (p, t) in enumerate(zip(prompts, per_prompt))]
    encoded, templated = [e for e, _ in pairs], [t for _, t in pairs]
    ctx = context_length(model, tokenizer)
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} gives no tokens")
        if ctx is not None and len(ids) + max_new_tokens > ctx:
            raise ValueError(f"prompt {i} is {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is more "
                             f"than the model's context of {ctx} positions (shorten the prompt or lower "
                             "max_new_tokens)")
    eos = eos_token_ids(model, tokenizer, templated=any(templated))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    device = next(model.parameters()).device
    sampling = temperature > 0
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=sampling, num_beams=1,
                                  pad_token_id=pad, eos_token_id=eos or None, use_cache=True, **cache_kwargs(cache))
    if synced:
        kwargs["synced_gpus"] = True
    # Every knob is set, so that none of a checkpoint's generation_config sampling defaults applies.
    kwargs.update(dict(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k)) if sampling else
                  dict(temperature=None, top_p=None, top_k=None))

    stats = GenerationStats()
    completions: list[Completion] = []
    was_training = model.training
    model.eval()
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None)
    try:
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            for s in range(0, len(encoded), batch_size):
                chunk = encoded[s:s + batch_size]
                width = max(map(len, chunk))
                ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
                clock = _Clock(on_tokens)
                t0 = time.perf_counter()
                out = model.generate(input_ids=ids, attention_mask=mask, streamer=clock, **kwargs)
                t1 = time.perf_counter()
                first = clock.first if clock.first is not None else t1
                stats.prefill_s += first - t0
                stats.decode_s += t1 - first
                stats.batches += 1
                for c, row in zip(chunk, out[:, width:].tolist()):
                    cut = next((j + 1 for j, t in enumerate(row) if t in eos), None)
                    new = row[:cut] if cut is not None else row
                    stats.prompts += 1
                    stats.prompt_tokens += len(c)
                    stats.new_tokens += len(new)
                    completions.append(Completion(
                        text=tokenizer.decode(new, skip_special_tokens=True), token_ids=new, prompt_tokens=len(c),
                        finish_reason="stop" if cut is not None else "length"))
    finally:
        model.train(was_training)
    return GenerationResult(completions, stats)


# ---------------------------------------------------------------------------------------------
# prompt files, streaming text, conversations


def prompt_of_row(row: Any, where: str) -> tuple[Prompt, bool | None]:
    """The prompt of one data row, in the formats the trainer reads: ``prompt`` (a string, or a conversation:
    TRL's standard and conversational prompt formats), ``messages`` (a conversation; a trailing assistant turn,
    the reference answer, is left out so the model gives its own) or alpaca's ``instruction`` (+ ``input``), which
    becomes the alpaca prompt. Returns the prompt and the ``chat_template`` value it takes (:func:`generate`):
    False for an alpaca prompt (a raw prompt format of its own), None (the default rule) for the others."""
    from .train.templates import alpaca_prompt

    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object; got {type(row).__name__}")
    if "prompt" in row:
        p = row["prompt"]
        if isinstance(p, str):
            return p, None
        return _check_messages(p, f"{where}: 'prompt'"), None
    if "messages" in row:
        msgs = _check_messages(row["messages"], f"{where}: 'messages'")
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise ValueError(f"{where}: 'messages' has only assistant turns; there is nothing to answer")
        return msgs, None
    if "instruction" in row:
        ins, inp = row["instruction"], row.get("input") or ""
        if not isinstance(ins, str) or not isinstance(inp, str):
            raise ValueError(f"{where}: 'instruction' and 'input' must be strings")
        return alpaca_prompt(ins, inp), False
    raise ValueError(f"{where}: no prompt column: expected 'prompt', 'messages' or 'instruction'; the row has "
                     f"{sorted(row)}")


def read_prompt_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL prompt file (blank lines skipped), each checked to hold a prompt (:func:`prompt_of_row`).

    Raises:
        FileNotFoundError: no such file. ValueError naming the file and line: a line that is not JSON, a row
        without a prompt, a file without rows.
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    rows = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        prompt_of_row(row, f"{path}:{n}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts in the file")
    return rows


class TextStream:
    """Incremental detokenization for streaming: :meth:`push` takes a sequence's new token ids and returns the
    text they add, holding back a trailing partial character (a token that ends inside a multi-byte UTF-8
    character) until the next token completes it."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.ids: list[int] = []
        self.shown = 0
        self.stopped = False

    def push(self, ids: Sequence[int]) -> str:
        for i in ids:
            if self.stopped or i in self.stop_ids:
                self.stopped = True
                break
            self.ids.append(int(i))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not self.stopped:
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new


class Chat:
    """A conversation with a model: :meth:`reply` answers the next user message, with the earlier turns (and a
    system message, if given) rendered by the tokenizer's chat template; when the conversation no longer fits the
    context with ``max_new_tokens`` after it, the oldest exchanges are dropped (the system message stays).

    Raises:
        ValueError: the tokenizer has no chat template.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, system: str | None = None, **sampling: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat needs a tokenizer with a chat_template; this one has none (use generate with "
                             "plain-text prompts)")
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        check_sampling(sampling.get("max_new_tokens", 128), sampling.get("temperature", 0.0),
                        sampling.get("top_p", 1.0), sampling.get("top_k", 0), sampling.get("seed"), 1,
                        sampling.get("cache", "dynamic"))
        self.system = system
        self.turns: list[Message] = []
        self.dropped = 0  # exchanges dropped to fit the context so far
        self.replies = 0  # with a seed, reply k draws with seed + k: a conversation replays the same
        self.last_stats: GenerationStats | None = None

    def reset(self) -> None:
        self.turns, self.dropped, self.replies = [], 0, 0

    def messages(self) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def _fit(self) -> None:
        ctx = context_length(self.model, self.tokenizer)
        if ctx is None:
            return
        budget = ctx - self.sampling.get("max_new_tokens", 128)
        while True:
            text = render_prompt(self.messages(), self.tokenizer, True)
            if len(_encode(text, self.tokenizer, True)) <= budget:
                return
            if len(self.turns) <= 1:
                n = len(_encode(text, self.tokenizer, True))
                raise ValueError(f"the message is {n} tokens with the template; with max_new_tokens="
                                 f"{self.sampling.get('max_new_tokens', 128)} that is more than the model's context "
                                 f"of {ctx} positions")
            self.turns = self.turns[2:] if self.turns[1]["role"] == "assistant" else self.turns[1:]
            self.dropped += 1

    def reply(self, message: str, on_text: Callable[[str], None] | None = None) -> str:
        """The model's answer to ``message`` (streamed to ``on_text`` piece by piece when given), appended to
        the conversation. An exception while generating (a Ctrl-C) leaves the conversation as it was before."""
        if not isinstance(message, str) or not message.strip():
            raise ValueError("the message is empty")
        before = list(self.turns), self.dropped
        self.turns.append({"role": "user", "content": message})
        try:
            self._fit()
            stream = TextStream(self.tokenizer, eos_token_ids(self.model, self.tokenizer, templated=True))
            hook = None if on_text is None else (lambda col: on_text(stream.push(col.tolist())))
            sampling = dict(self.sampling)
            if sampling.get("seed") is not None:
                sampling["seed"] += self.replies
            result = generate(self.model, self.tokenizer, [self.messages()], chat_template=True, batch_size=1,
                              on_tokens=hook, **sampling)
        except BaseException:
            self.turns, self.dropped = before
            raise
        text = result.completions[0].text
        self.turns.append({"role": "assistant", "content": text})
        self.replies += 1
        self.last_stats = result.stats
        return text
