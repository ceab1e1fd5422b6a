"""Training data: local JSON/JSONL/parquet rows -> tokenized items -> padded micro-batches.

An item is an :class:`Example` (SFT: token ids and labels) or a :class:`PreferencePair` (DPO: a chosen
and a rejected :class:`Example` of the same prompt). SFT row types (extra fields are ignored):

* ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str}``; ``output`` is trained.
* ``completion``: ``{"prompt": str, "completion": str}``; ``completion`` is trained.
* ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}``;
  every assistant message is trained.
* ``text``: ``{"text": str}``; all of it is trained.

Preference row types (DPO, reward models), each with an optional numeric ``margin`` (read by the reward-model loss):

* ``preference``: ``{"prompt": str, "chosen": str, "rejected": str}``; the completions are appended to
  the prompt as they are (include any separator), and the end-of-sequence token closes each one.
* ``hh-rlhf``: ``{"chosen": str, "rejected": str}``, two full Anthropic-HH dialogues
  (``"\\n\\nHuman: … \\n\\nAssistant: …"``) that share a prefix; the prompt is the shared prefix up to
  and including its last ``"\\n\\nAssistant:"``, the completions are what follows it in each dialogue.

Labels are the input ids with -100 wherever the token is not trained (prompt, template text,
padding). The tokenizer's end-of-sequence token closes every alpaca/completion/text example and
is trained, so the model learns to stop. An example longer than ``sequence_len`` is truncated and
counted; one left with no target token is dropped and counted (a pair, if either side has none). A
malformed row (including one that is not UTF-8 or holds a lone surrogate escape) raises
:class:`DataError` naming its file and line, or is skipped and counted with ``skip_bad_rows``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import PREFERENCE_TYPES, DatasetConfig, TrainConfig
from .distributed import SINGLE, DistContext, shard
from .loss import IGNORE_INDEX
from .packing import collate_segments
from .templates import Segment, alpaca_segments, chat_segments

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
HH_ASSISTANT = "\n\nAssistant:"
CHAT_ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A malformed data file or row; the message names the file and line."""


@dataclass
class Example:
    """One tokenized example and where it came from (``file:line``)."""

    input_ids: list[int]
    labels: list[int]
    source: str

    @property
    def num_targets(self) -> int:
        """Target tokens under the shifted loss (a label at position 0 is never predicted)."""
        return sum(1 for y in self.labels[1:] if y != IGNORE_INDEX)


@dataclass
class PreferencePair:
    """One tokenized preference pair, where it came from, and (once computed) its reference log-probs."""

    chosen: Example
    rejected: Example
    source: str
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    margin: float = 0.0  # the row's optional "margin" (how much better chosen is; the reward-model loss reads it)


@dataclass
class DataStats:
    """Counts reported after loading."""

    rows: int = 0
    examples: int = 0
    skipped_bad_rows: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    dropped_too_long: int = 0
    tokens: int = 0
    target_tokens: int = 0
    bad_row_messages: list[str] = field(default_factory=list)
    prompts_only: bool = False  # prompt rows (GRPO): no targets, nothing truncated

    def summary(self) -> str:
        too_long = f"dropped as longer than sequence_len {self.dropped_too_long}, " if self.dropped_too_long else ""
        if self.prompts_only:
            return (f"{self.examples} prompts from {self.rows} rows ({self.tokens} tokens); prompts with more than "
                    f"sequence_len - max_completion_length tokens dropped {self.dropped_too_long}, skipped bad rows "
                    f"{self.skipped_bad_rows}")
        return (f"{self.examples} examples from {self.rows} rows ({self.tokens} tokens, {self.target_tokens} "
                f"trained); truncated {self.truncated}, dropped without target {self.dropped_no_target}, "
                + too_long + f"skipped bad rows {self.skipped_bad_rows}")


# --------------------------------------------------------------------------- reading files


def _files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in DATA_SUFFIXES)
        if not files:
            raise DataError(f"{p}: directory holds no {', '.join(DATA_SUFFIXES)} files")
        return files
    if p.suffix not in DATA_SUFFIXES:
        raise DataError(f"{p}: unsupported file type {p.suffix!r}; allowed: {', '.join(DATA_SUFFIXES)}")
    return [p]


def _not_unicode(value: Any, where: str = "") -> str | None:
    """Where a string in ``value`` (nested dicts and lists) holds a lone surrogate, which JSON's ``\\ud800``
    escapes can produce but no text encoding can write; None if there is none."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return (f"holds a lone surrogate escape (\\u{ord(value[e.start]):04x}) in {where or 'the row'}; text "
                    "must be valid Unicode")
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        problem = _not_unicode(v, f"{where}[{k}]" if isinstance(k, int) else (f"{where}.{k}" if where else repr(k)))
        if problem:
            return problem
    return None


def _utf8_error(f: Path, data: bytes, e: UnicodeDecodeError, line: int | None = None) -> DataError:
    if line is None:  # a whole file: find the line
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    else:
        col = e.start + 1
    return DataError(f"{f}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at byte {col} of the line); save the "
                     "file as UTF-8")


def read_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(source, row)`` for each row of a file or directory; ``source`` is ``file:line``.

    A JSONL line that is not valid UTF-8, not valid JSON, or holds a lone surrogate escape (valid
    JSON such as ``"\\ud800"``, but not text) is yielded as a :class:`DataError` instance in place
    of the row, so that the caller decides between failing and skipping; so is such a row of a
    ``.json`` file. A ``.json`` file that is not UTF-8 or not JSON raises :class:`DataError`.
    """
    for f in _files(path):
        if f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                for i, raw in enumerate(fh, 1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        yield f"{f}:{i}", _utf8_error(f, raw, e, line=i)
                        continue
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        yield f"{f}:{i}", DataError(f"{f}:{i}: not valid JSON ({e.msg})")
                        continue
                    problem = _not_unicode(row)
                    yield f"{f}:{i}", DataError(f"{f}:{i}: {problem}") if problem else row
        elif f.suffix == ".json":
            data = f.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(f, data, e) from None
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{f}:{e.lineno}: not valid JSON ({e.msg})") from None
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataError(f"{f}: a .json data file must hold a list of rows (or {{'data': [...]}})")
            for i, row in enumerate(data):
                problem = _not_unicode(row)
                yield f"{f}:row {i}", DataError(f"{f}:row {i}: {problem}") if problem else row
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{f}: reading parquet needs pyarrow (pip install pyarrow)") from None
            try:
                rows = pq.read_table(f).to_pylist()
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError derive from these
                raise DataError(f"{f}: not a readable parquet file ({type(e).__name__}: {e})") from None
            for i, row in enumerate(rows):
                yield f"{f}:row {i}", row


def checked_rows(ds: DatasetConfig, cfg: TrainConfig, stats: DataStats,
                 check: Callable[[Any, str], str | None]) -> Iterator[tuple[str, Any]]:
    """``(source, row)`` for each well-formed row of a dataset, counted in ``stats``. A malformed row
    (unreadable, or ``check(row, ds.type)`` names a problem) is an error naming file and line, or,
    with ``skip_bad_rows``, skipped and counted (the first five messages kept)."""
    for source, row in read_rows(ds.path):
        stats.rows += 1
        problem = str(row) if isinstance(row, DataError) else check(row, ds.type)
        if problem is None:
            yield source, row
            continue
        msg = problem if isinstance(row, DataError) else f"{source}: {problem}"
        if not cfg.skip_bad_rows:
            raise DataError(f"{msg} (set skip_bad_rows: true to skip and count such rows)")
        stats.skipped_bad_rows += 1
        if len(stats.bad_row_messages) < 5:
            stats.bad_row_messages.append(msg)


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as JSONL, one JSON object a line, UTF-8 (for generated data sets); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return p


# --------------------------------------------------------------------------- SFT rows


def check_row(row: Any, row_type: str) -> str | None:
    """What is wrong with ``row`` for ``row_type``, or None if it is well formed."""
    if not isinstance(row, dict):
        return f"a {row_type} row must be a JSON object, got {type(row).__name__}"

    def need_str(key: str, optional: bool = False) -> str | None:
        v = row.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            got = "missing" if key not in row else f"{type(v).__name__} {v!r}"[:60]
            return f"{row_type} row needs a string {key!r} (got {got})"
        return None

    if row_type == "alpaca":
        return need_str("instruction") or need_str("input", optional=True) or need_str("output")
    if row_type == "completion":
        return need_str("prompt") or need_str("completion")
    if row_type == "text":
        return need_str("text")
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "chat row needs a non-empty list 'messages' of {role, content}"
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            return f"chat row messages[{j}] must be {{role: one of {', '.join(CHAT_ROLES)}, content: str}}; got {m!r}"[
                :200]
    if not any(m["role"] == "assistant" for m in msgs):
        return "chat row has no assistant message to train on"
    return None


def resolve_template(row_type: str, prompt_template: str | None) -> str | None:
    """The template used for a dataset type: the configured one, else alpaca/chatml by type."""
    if row_type in ("completion", "text"):
        return None
    if prompt_template is not None:
        return prompt_template
    return "alpaca" if row_type == "alpaca" else "chatml"


def row_segments(row: dict[str, Any], row_type: str, template: str | None, tokenizer: Any) -> tuple[
        list[Segment], bool]:
    """``(segments, add_eos)`` for a checked row."""
    if row_type == "alpaca":
        segs = alpaca_segments(row["instruction"], row.get("input") or "", row["output"], template, tokenizer)
        return segs, template == "alpaca"
    if row_type == "completion":
        return [(row["prompt"], False), (row["completion"], True)], True
    if row_type == "text":
        return [(row["text"], True)], True
    messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return chat_segments(messages, template, tokenizer), False


def tokenize_segments(segments: list[Segment], tokenizer: Any, add_eos: bool = True,
                      train_on_inputs: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels of the concatenated segments.

    The text is tokenized once (with the tokenizer's own special-token convention, e.g. a BOS,
    unless the text already starts with it); a token is a target when its first character lies in
    a trained segment. Needs a fast tokenizer (character offsets).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("SFT data needs a fast (Rust) tokenizer to locate trained characters; got "
                        f"{type(tokenizer).__name__}")
    text = "".join(t for t, _ in segments)
    trained = bytearray(len(text))
    pos = 0
    for t, on in segments:
        if on:
            trained[pos:pos + len(t)] = b"\x01" * len(t)
        pos += len(t)
    bos = getattr(tokenizer, "bos_token", None)
    enc = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)), return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = []
    for tok, (s, e) in zip(ids, enc["offset_mapping"]):
        real = e > s
        labels.append(tok if real and (train_on_inputs or trained[s]) else IGNORE_INDEX)
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    return ids, labels


def load_dataset(ds: DatasetConfig, cfg: TrainConfig, tokenizer: Any, stats: DataStats) -> list[Example]:
    """Read, check, format and tokenize one dataset; updates ``stats``."""
    template = resolve_template(ds.type, cfg.prompt_template)
    out: list[Example] = []
    for source, row in checked_rows(ds, cfg, stats, check_row):
        try:
            segments, add_eos = row_segments(row, ds.type, template, tokenizer)
        except ValueError as e:  # a template that cannot format this row: not skippable, the config is wrong
            raise DataError(f"{source}: {e}") from None
        ids, labels = tokenize_segments(segments, tokenizer, add_eos, cfg.train_on_inputs)
        if len(ids) > cfg.sequence_len:
            stats.truncated += 1
            ids, labels = ids[:cfg.sequence_len], labels[:cfg.sequence_len]
        ex = Example(ids, labels, source)
        n = ex.num_targets
        if n == 0:
            stats.dropped_no_target += 1
            continue
        stats.examples += 1
        stats.tokens += len(ids)
        stats.target_tokens += n
        out.append(ex)
    return out


# --------------------------------------------------------------------------- preference rows (DPO)


def split_hh_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen completion, rejected completion)`` of two Anthropic-HH dialogues.

    The prompt is the longest common prefix cut just after its last ``"\\n\\nAssistant:"``.
    Raises ValueError if the common prefix holds no such marker.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    if cut < 0:
        raise ValueError(f"the chosen and rejected dialogues share no {HH_ASSISTANT!r} turn, so the prompt cannot "
                         f"be found (shared prefix: {chosen[:n][:80]!r})")
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def check_preference_row(row: Any, row_type: str) -> str | None:
    """What is wrong with ``row`` for ``row_type`` ('preference' or 'hh-rlhf'), or None if well formed."""
    if not isinstance(row, dict):
        return f"a {row_type} row must be a JSON object, got {type(row).__name__}"
    keys = ("prompt", "chosen", "rejected") if row_type == "preference" else ("chosen", "rejected")
    for k in keys:
        if not isinstance(row.get(k), str):
            got = "missing" if k not in row else f"{type(row.get(k)).__name__} {row.get(k)!r}"[:60]
            return f"{row_type} row needs a string {k!r} (got {got})"
    if row_type == "hh-rlhf":
        try:
            split_hh_dialogue(row["chosen"], row["rejected"])
        except ValueError as e:
            return str(e)
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        return f"a {row_type} row's optional 'margin' must be a finite number (got {margin!r})"[:120]
    return None


def preference_texts(row: dict[str, Any], row_type: str) -> tuple[str, str, str]:
    """``(prompt, chosen completion, rejected completion)`` of a checked row."""
    if row_type == "hh-rlhf":
        return split_hh_dialogue(row["chosen"], row["rejected"])
    return row["prompt"], row["chosen"], row["rejected"]


def _tokenize_completion(prompt: str, completion: str, tokenizer: Any, sequence_len: int,
                         stats: DataStats, source: str) -> Example:
    ids, labels = tokenize_segments([(prompt, False), (completion, True)], tokenizer, add_eos=True)
    if len(ids) > sequence_len:
        stats.truncated += 1
        ids, labels = ids[:sequence_len], labels[:sequence_len]
    return Example(ids, labels, source)


def load_preference_dataset(ds: DatasetConfig, cfg: TrainConfig, tokenizer: Any, stats: DataStats,
                            too_long: str = "truncate") -> list[PreferencePair]:
    """Read, check and tokenize one preference dataset; updates ``stats`` (``examples`` counts pairs).

    A sequence longer than ``sequence_len`` is cut at the end (and counted in ``truncated``), or with
    ``too_long="drop"`` its pair is dropped (and counted in ``dropped_too_long``: what TRL's RewardTrainer does, since
    a reward model scores the last token); a pair where either side keeps no completion token is dropped (and
    counted in ``dropped_no_target``). A row's optional ``margin`` goes to :attr:`PreferencePair.margin`.
    """
    if ds.type not in PREFERENCE_TYPES:
        raise DataError(f"{ds.path}: dataset type {ds.type!r} is not a preference type; DPO reads "
                        f"{', '.join(PREFERENCE_TYPES)}")
    out: list[PreferencePair] = []
    for source, row in checked_rows(ds, cfg, stats, check_preference_row):
        prompt, chosen, rejected = preference_texts(row, ds.type)
        if too_long == "drop":
            a, b = (Example(*tokenize_segments([(prompt, False), (c, True)], tokenizer, add_eos=True), source)
                    for c in (chosen, rejected))
            if max(len(a.input_ids), len(b.input_ids)) > cfg.sequence_len:
                stats.dropped_too_long += 1
                continue
        else:
            a = _tokenize_completion(prompt, chosen, tokenizer, cfg.sequence_len, stats, source)
            b = _tokenize_completion(prompt, rejected, tokenizer, cfg.sequence_len, stats, source)
        if a.num_targets == 0 or b.num_targets == 0:
            stats.dropped_no_target += 1
            continue
        stats.examples += 1
        stats.tokens += len(a.input_ids) + len(b.input_ids)
        stats.target_tokens += a.num_targets + b.num_targets
        out.append(PreferencePair(a, b, source, margin=float(row.get("margin") or 0.0)))
    return out


# --------------------------------------------------------------------------- prompt rows (GRPO)


@dataclass
class PromptItem:
    """One prompt of an online objective: the prompt as the row gave it (a string, or a conversation), its token ids
    as generation feeds them, whether the chat template rendered it, the row's other fields (handed to the reward
    functions as columns) and where it came from."""

    prompt: Any
    input_ids: list[int]
    templated: bool
    columns: dict[str, Any]
    source: str


def check_prompt_row(row: Any, row_type: str) -> str | None:
    """What is wrong with a ``prompt`` row (TRL's prompt-only formats: ``{"prompt": str}`` or ``{"prompt":
    [{"role", "content"}, ...]}``, other fields kept as columns), or None if well formed."""
    if not isinstance(row, dict):
        return f"a prompt row must be a JSON object, got {type(row).__name__}"
    p = row.get("prompt")
    if isinstance(p, str):
        return None if p.strip() else "a prompt row's 'prompt' is empty"
    if isinstance(p, list) and p and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                         and isinstance(m.get("content"), str) for m in p):
        return None
    got = "missing" if "prompt" not in row else f"{type(p).__name__} {p!r}"[:60]
    return f"a prompt row needs 'prompt': a string or a list of {{role, content}} messages (got {got})"


def load_prompt_dataset(ds: DatasetConfig, cfg: TrainConfig, tokenizer: Any, stats: DataStats) -> list[PromptItem]:
    """Read, check and tokenize one prompt dataset; updates ``stats`` (``examples`` counts prompts). A string prompt is
    fed as it is (TRL's standard format), a conversation through the tokenizer's chat template with the generation
    prompt. A prompt with more than ``sequence_len - max_completion_length`` tokens is dropped (and counted)."""
    from qlora_kernels.generation import encode_prompt

    room = cfg.sequence_len - cfg.max_completion_length
    stats.prompts_only = True
    out: list[PromptItem] = []
    for source, row in checked_rows(ds, cfg, stats, check_prompt_row):
        p = row["prompt"]
        try:
            ids, templated = encode_prompt(p, tokenizer, chat_template=False if isinstance(p, str) else None,
                                           where=source)
        except ValueError as e:
            raise DataError(str(e)) from None
        if len(ids) > room:
            stats.dropped_too_long += 1
            continue
        stats.examples += 1
        stats.tokens += len(ids)
        out.append(PromptItem(p, ids, templated, {k: v for k, v in row.items() if k != "prompt"}, source))
    return out


def load_prompts(cfg: TrainConfig, tokenizer: Any) -> tuple[list[PromptItem], list[PromptItem], DataStats]:
    """Train and eval prompts for a config: eval from eval-split datasets, else ``val_set_size`` of train."""
    return load_split(cfg, tokenizer, load_prompt_dataset, "prompt")


# --------------------------------------------------------------------------- train / eval split


def load_split(
    cfg: TrainConfig, tokenizer: Any, load_one: Callable[..., list], noun: str
) -> tuple[list, list, DataStats]:
    """Train and eval items for a config, each dataset read by ``load_one(ds, cfg, tokenizer, stats)``:
    eval from eval-split datasets, else ``val_set_size`` of train (a seeded random hold-out).
    ``noun`` names an item in errors ("example", "pair")."""
    stats = DataStats()
    train = [item for d in cfg.train_datasets for item in load_one(d, cfg, tokenizer, stats)]
    evals = [item for d in cfg.eval_datasets for item in load_one(d, cfg, tokenizer, stats)]
    if cfg.val_set_size > 0:
        k = int(cfg.val_set_size) if cfg.val_set_size >= 1 else max(1, round(cfg.val_set_size * len(train)))
        if k >= len(train):
            raise DataError(f"val_set_size {cfg.val_set_size} leaves no training {noun} out of {len(train)}")
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        held = set(perm[:k])
        evals = [train[i] for i in sorted(held)]
        train = [item for i, item in enumerate(train) if i not in held]
    if not train:
        raise DataError(f"no training {noun}s left after loading (" + stats.summary() + ")")
    return train, evals, stats


def load_examples(cfg: TrainConfig, tokenizer: Any) -> tuple[list[Example], list[Example], DataStats]:
    """Train and eval examples for a config: eval from eval-split datasets, else ``val_set_size`` of train."""
    return load_split(cfg, tokenizer, load_dataset, "example")


def load_pairs(cfg: TrainConfig, tokenizer: Any, too_long: str = "truncate") -> tuple[
        list[PreferencePair], list[PreferencePair], DataStats]:
    """Train and eval pairs for a config: eval from eval-split datasets, else ``val_set_size`` of train; ``too_long``:
    see :func:`load_preference_dataset`."""
    if too_long not in ("truncate", "drop"):
        raise ValueError(f"too_long must be 'truncate' or 'drop'; got {too_long!r}")
    return load_split(cfg, tokenizer, lambda *a: load_preference_dataset(*a, too_long=too_long), "pair")


# --------------------------------------------------------------------------- batching


def collate(examples: list[Example], pad_id: int, counted: bool = True) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples: input_ids, attention_mask, labels (-100 on padding).

    ``counted=False``: a placeholder batch that runs but counts for nothing (every label -100: no target
    token, a loss of 0), see :class:`MicroBatchStream`.
    """
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        if counted:
            labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(pairs: list[PreferencePair], pad_id: int, counted: bool = True) -> dict[str, torch.Tensor]:
    """One right-padded batch of ``2B`` rows: the B chosen sequences, then the B rejected ones.

    Keys: ``input_ids``, ``attention_mask``, ``labels`` ``[2B, T]``; ``pair_weight`` ``[B]`` (1 for every
    pair; 0 with ``counted=False``, a placeholder batch that must run but not count, see
    :class:`MicroBatchStream`); ``margin`` ``[B]`` (the rows' margins, 0 where a row has none); and ``ref_logps``
    ``[2B]`` when every pair carries precomputed reference log-probs.
    """
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return _with_pair_keys(batch, pairs, counted)


def _with_pair_keys(batch: dict[str, torch.Tensor], pairs: list[PreferencePair], counted: bool) -> dict[
        str, torch.Tensor]:
    """``batch`` with the keys of the pairs themselves added: ``pair_weight`` ``[B]`` (1 each, 0 when not
    ``counted``), ``margin`` ``[B]`` and, when every pair carries them, ``ref_logps`` ``[2B]`` (the B chosen, then the
    B rejected)."""
    batch["pair_weight"] = torch.full((len(pairs),), 1.0 if counted else 0.0)
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    if pairs and all(p.ref_chosen is not None and p.ref_rejected is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs],
                                          dtype=torch.float32)
    return batch


def collate_packed(rows: list[list[Example]], pad_id: int, counted: bool = True) -> dict[str, torch.Tensor]:
    """One packed batch of SFT examples (sample packing): row r holds the examples ``rows[r]``, each attending only to
    itself; see :func:`.packing.collate_segments` for the keys."""
    return collate_segments(rows, pad_id, counted)


def collate_packed_pairs(rows: list[list[PreferencePair]], pad_id: int, counted: bool = True) -> dict[
        str, torch.Tensor]:
    """One packed batch of preference pairs: row r holds the pairs ``rows[r]``, the chosen and the rejected sequence of
    each one its own segment (they never attend to each other), see :func:`.packing.collate_segments`.

    The B pairs of the batch are numbered in row order; ``sequence_ids`` are ``j`` for pair j's chosen sequence and
    ``B + j`` for its rejected one, so the log-probs per sequence come out as :func:`collate_pairs`' rows do (the B
    chosen, then the B rejected). ``pair_weight`` and ``ref_logps`` as in :func:`collate_pairs`.
    """
    pairs = [p for row in rows for p in row]
    B = len(pairs)
    segments, numbers, j = [], [], 0
    for row in rows:
        segs, ids = [], []
        for p in row:
            segs += [p.chosen, p.rejected]
            ids += [j, B + j]
            j += 1
        segments.append(segs)
        numbers.append(ids)
    return _with_pair_keys(collate_segments(segments, pad_id, True, numbers), pairs, counted)


class MicroBatchStream:
    """An endless stream of shuffled micro-batches with a resumable position, split across ranks.

    Epoch ``e`` visits the items in ``randperm(n, seed + e)`` order, one *global* micro-batch of
    ``micro_batch_size × world_size`` items at a time (the last one of an epoch may be smaller); this rank
    collates its contiguous part of it (:func:`.distributed.shard`) with ``collate_fn(items, pad_id)``.
    Every rank draws the same order, so N ranks see exactly the items one process with ``micro_batch_size
    × N`` would see, step for step; with one process it is the plain shuffled stream. The position
    ``(epoch, index)`` is all the state there is, so resuming from it replays exactly the same micro-batches.

    With ``rows`` (sample packing: lists of item indices, :func:`.packing.pack_bins`) the units drawn, shuffled
    and split are the rows instead of the items: ``collate_fn`` gets a list of rows, each a list of items, and
    ``next()`` returns the items of those rows.

    An empty part (the short last micro-batch of an epoch, on a high rank) gives a placeholder batch that
    must run, because every rank takes part in each all-reduce, but counts for nothing:
    ``collate_fn(units[:1], pad_id, counted=False)``; ``next()`` returns no items with it.
    """

    def __init__(self, items: list[Any], micro_batch_size: int, seed: int, pad_id: int, ctx: DistContext = SINGLE,
                 collate_fn: Callable[..., dict[str, torch.Tensor]] = collate,
                 rows: list[list[int]] | None = None) -> None:
        self.items = items
        self.rows = rows
        self.global_batch = micro_batch_size * ctx.world_size  # micro_batch_size is per rank
        self.seed = seed
        self.pad_id = pad_id
        self.ctx = ctx
        self.collate_fn = collate_fn
        self.epoch = 0
        self.index = 0
        self._perm: list[int] | None = None

    @property
    def units(self) -> int:
        """What an epoch draws from: the items, or the packed rows."""
        return len(self.rows) if self.rows is not None else len(self.items)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.units / self.global_batch)

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.index / self.batches_per_epoch

    def _order(self) -> list[int]:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = torch.randperm(self.units, generator=g).tolist()
        return self._perm

    def next(self) -> tuple[dict[str, torch.Tensor], list[Any]]:
        """This rank's part of the next global micro-batch (collated) and its items."""
        start = self.index * self.global_batch
        if self.rows is None:
            drawn = [self.items[i] for i in self._order()[start:start + self.global_batch]]
        else:
            drawn = [[self.items[i] for i in self.rows[r]] for r in self._order()[start:start + self.global_batch]]
        self.index += 1
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._perm = self.epoch + 1, 0, None
        mine = shard(drawn, self.ctx)
        if not mine:
            return self.collate_fn(drawn[:1], self.pad_id, counted=False), []
        items = mine if self.rows is None else [item for row in mine for item in row]
        return self.collate_fn(mine, self.pad_id), items

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._perm = int(state["epoch"]), int(state["index"]), None
