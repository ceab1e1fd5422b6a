"""The demo's synthetic world: two made-up languages, a tokenizer and a tiny Llama that knows them.

*Lumo* and *Zil* are word-for-word translations of each other: the same small grammar
(``[adj] noun verb [adj] noun [adv] .``) over two vocabularies of invented words, joined by a fixed
bijection. The base model is pretrained on raw text in both languages and on parallel text
(``<lumo sentence> = <zil sentence>`` or one sentence a line, both directions), so it "knows" both
languages and how they map. It has never seen an instruction. The demo's fine-tune then teaches it
to follow alpaca-style instructions ("Translate into Zil.") on sentences it has never seen.

Everything is seeded and built in code: the shipped data files and the checkpoint under ``data/tiny_llama``
(``qlora_kernels/demo/data``) are regenerated with ``python -m qlora_kernels.demo.synthetic [OUT_DIR [STEPS]]``
(the model goes to OUT_DIR, default ``data/tiny_llama``; about 4 minutes on one core), or with
``qlora-kernels demo --rebuild-base``.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_kernels.train.data import write_jsonl
from qlora_kernels.train.loss import causal_lm_loss
from qlora_kernels.train.templates import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

DATA_DIR = Path(__file__).resolve().parent / "data"
BASE_MODEL_DIR = DATA_DIR / "tiny_llama"
TRAIN_FILE = DATA_DIR / "sft_translate_train.jsonl"
EVAL_FILE = DATA_DIR / "sft_translate_eval.jsonl"

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INSTRUCTIONS = {"zil": "Translate into Zil.", "lumo": "Translate into Lumo."}

_ONSETS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u".split()
_CLASSES = {"noun": 16, "verb": 10, "adj": 8, "adv": 6}


@dataclass(frozen=True)
class Languages:
    """Lumo and Zil vocabularies per word class and the Lumo -> Zil word map."""

    lumo: dict[str, list[str]]
    zil: dict[str, list[str]]
    to_zil: dict[str, str]

    @property
    def to_lumo(self) -> dict[str, str]:
        return {z: lu for lu, z in self.to_zil.items()}


def word_maker(rng: random.Random, syllables: list[str]) -> Callable[[int], str]:
    """``word(n)``: a new invented word of ``n`` syllables drawn by ``rng`` (never one it made before)."""
    used: set[str] = set()

    def word(n_syll: int) -> str:
        while True:
            w = "".join(rng.choice(syllables) for _ in range(n_syll))
            if w not in used:
                used.add(w)
                return w

    return word


def make_languages(seed: int = 1234) -> Languages:
    """Invent the two vocabularies (Lumo words have 2 syllables, Zil words 1 or 3) and their bijection."""
    rng = random.Random(seed)
    word = word_maker(rng, [o + v for o in _ONSETS for v in _VOWELS])
    lumo = {c: [word(2) for _ in range(n)] for c, n in _CLASSES.items()}
    zil = {c: [word(rng.choice((1, 3))) for _ in range(n)] for c, n in _CLASSES.items()}
    to_zil = {lw: zw for c in _CLASSES for lw, zw in zip(lumo[c], zil[c])}
    return Languages(lumo, zil, to_zil)


def sentence(langs: Languages, rng: random.Random) -> str:
    """One Lumo sentence from the grammar ``[adj] noun verb [adj] noun [adv] .``."""
    words = []
    if rng.random() < 0.5:
        words.append(rng.choice(langs.lumo["adj"]))
    words += [rng.choice(langs.lumo["noun"]), rng.choice(langs.lumo["verb"])]
    if rng.random() < 0.5:
        words.append(rng.choice(langs.lumo["adj"]))
    words.append(rng.choice(langs.lumo["noun"]))
    if rng.random() < 0.5:
        words.append(rng.choice(langs.lumo["adv"]))
    return " ".join(words) + " ."


def translate(langs: Languages, text: str, to: str) -> str:
    """Word-for-word translation of a sentence into ``to`` ('zil' or 'lumo')."""
    table = langs.to_zil if to == "zil" else langs.to_lumo
    return " ".join(table.get(w, w) for w in text.split())


def pretraining_lines(langs: Languages, n: int, seed: int, exclude: set[str]) -> list[str]:
    """Raw text the base model learns from: monolingual sentences and parallel text, both directions."""
    rng = random.Random(seed)
    lines = []
    while len(lines) < n:
        lu = sentence(langs, rng)
        if lu in exclude:
            continue
        zi = translate(langs, lu, "zil")
        kind = rng.random()
        src, dst = (lu, zi) if rng.random() < 0.5 else (zi, lu)
        if kind < 0.2:
            lines.append(src)
        elif kind < 0.6:
            lines.append(f"{src} = {dst}")
        else:  # bitext, one sentence a line: a translation's first word also starts a line
            lines.append(f"{src}\n{dst}")
    return lines


def instruction_rows(langs: Languages, n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """Alpaca rows {instruction, input, output}: translate a fresh sentence into the other language."""
    rng = random.Random(seed)
    rows: list[dict] = []
    seen = set(exclude)
    while len(rows) < n:
        lu = sentence(langs, rng)
        if lu in seen:
            continue
        seen.add(lu)
        zi = translate(langs, lu, "zil")
        if rng.random() < 0.5:
            rows.append({"instruction": INSTRUCTIONS["zil"], "input": lu, "output": zi})
        else:
            rows.append({"instruction": INSTRUCTIONS["lumo"], "input": zi, "output": lu})
    return rows


def sft_splits(seed: int = 7, n_train: int = 2000, n_eval: int = 200) -> tuple[list[dict], list[dict]]:
    """The demo's held-out eval rows and its training rows; no Lumo sentence appears in both."""
    langs = make_languages()
    eval_rows = instruction_rows(langs, n_eval, seed + 1)
    held = {r["input"] if r["instruction"] == INSTRUCTIONS["zil"] else r["output"] for r in eval_rows}
    train_rows = instruction_rows(langs, n_train, seed, exclude=held)
    return train_rows, eval_rows


def held_out_sentences(eval_rows: list[dict]) -> set[str]:
    """Lumo sentences of the eval rows (kept out of the pretraining text too)."""
    return {r["input"] if r["instruction"] == INSTRUCTIONS["zil"] else r["output"] for r in eval_rows}


def build_tokenizer(langs: Languages, vocab_size: int = 640):
    """A byte-level BPE tokenizer trained on the two languages and the prompt templates' words."""
    words = [w for d in (langs.lumo, langs.zil) for ws in d.values() for w in ws]
    return bpe_tokenizer(words, vocab_size)


def bpe_tokenizer(words: list[str], vocab_size: int, add_prefix_space: bool = False):
    """A byte-level BPE tokenizer of ``words`` (each repeated so that it merges into few tokens), the alpaca prompt
    templates' words and the instructions, with the special tokens and the ChatML template (BOS prepended).
    ``add_prefix_space``: a text's first word is tokenized as after a space (so a word at the start of a line and
    the same word mid-sentence are one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    templates = [ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, *INSTRUCTIONS.values(), "user assistant system", "= ."]
    corpus = [" ".join(words), "\n".join(words)] * 20 + templates * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END], chat_template=CHATML_TEMPLATE,
    )


def base_config(vocab_size: int):
    """The tiny Llama's shape: 4 layers, width 128, GQA 4/2 heads, about 0.9 M parameters."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=320, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def save_random_model(out_dir: str | Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised Llama of the demo's vocabulary, with its tokenizer (for tests and smoke runs)."""
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer(make_languages())
    cfg = base_config(len(tokenizer))
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = hidden_size, 2 * hidden_size, num_layers
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def pretrain_base_model(out_dir: str | Path, steps: int = 3000, batch_size: int = 48, lr: float = 3e-3,
                        seed: int = 0, log_every: int = 100) -> Path:
    """Build the tokenizer and pretrain the tiny Llama from scratch on the synthetic languages.

    Full-parameter next-token training in fp32 on raw lines ``BOS line EOS``; saves an HF
    directory (safetensors, fp16 weights) with the tokenizer. Deterministic for a given seed.
    """
    torch.manual_seed(seed)
    langs = make_languages()
    tokenizer = build_tokenizer(langs)
    _, eval_rows = sft_splits()
    lines = pretraining_lines(langs, steps * batch_size, seed + 1, exclude=held_out_sentences(eval_rows))
    return pretrain(out_dir, tokenizer, base_config(len(tokenizer)), lines, batch_size, lr, seed, log_every)


def pretrain(out_dir: str | Path, tokenizer, config, lines: list[str], batch_size: int, lr: float, seed: int = 0,
             log_every: int = 100, weight_decay: float = 0.01, save_dtype: torch.dtype = torch.float16) -> Path:
    """Pretrain a Llama of ``config`` from scratch on ``lines`` (``BOS line EOS``, ``batch_size`` a step, one pass
    in order; AdamW at ``lr``, 5% warm-up then cosine) and save it with ``tokenizer`` to ``out_dir``."""
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    torch.manual_seed(seed)
    steps = len(lines) // batch_size
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = lines[step * batch_size:(step + 1) * batch_size]
        enc = tokenizer([BOS + x + EOS for x in batch], padding=True, return_tensors="pt", add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        hidden = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        loss_sum, n = causal_lm_loss(hidden, model.lm_head.weight, labels)
        loss = loss_sum / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"pretrain step {step:5d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.to(save_dtype).save_pretrained(out, safe_serialization=True)
    return out


def write_sft_files(train_path: str | Path = TRAIN_FILE, eval_path: str | Path = EVAL_FILE) -> None:
    """Write the demo's instruction data as JSONL (what ``examples/sft_tiny.yaml`` trains on)."""
    train_rows, eval_rows = sft_splits()
    write_jsonl(train_rows, train_path)
    write_jsonl(eval_rows, eval_path)


if __name__ == "__main__":  # regenerate the shipped files: python -m qlora_kernels.demo.synthetic [OUT_DIR [STEPS]]
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else BASE_MODEL_DIR
    steps_arg = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    write_sft_files()
    pretrain_base_model(target, steps=steps_arg)
