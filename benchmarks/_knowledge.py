"""A synthetic task that needs a base model's pretrained knowledge, for bench_fidelity.py's second task.

The world: ``n_people`` invented names, each with a home town (of ``N_TOWNS``) and a trade (of ``N_TRADES``), drawn
at random, so a fact can only be known by having memorised it. The base model (a Llama pretrained here from scratch)
reads every person's facts many times, in several phrasings ("kabimo lives in torvel ." / "kabimo works as a
fenor ." / "kabimo , a fenor from torvel ."), and plain questions and answers about half the people ("Q : where
does kabimo live ? A : torvel ."). The fine-tune asks alpaca questions ("Where does kabimo live?") about that half;
the held-out questions are about the other half, whose facts the model read only as statements. So the held-out
answers come from the base weights, and what quantizing them loses shows in the eval loss: the demo's translation
task, by contrast, is rules a LoRA could learn on its own.

Deterministic for given arguments; the base is built once into a cache folder (about 5 minutes on two cores for
2000 people).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

N_TOWNS, N_TRADES = 24, 16
QUESTIONS = {"town": "Where does {} live?", "trade": "What is the trade of {}?"}
_SYLLABLES = [o + v for o in "b d f g h k l m n p r s t v w z".split() for v in "a e i o u".split()]


@dataclass(frozen=True)
class World:
    """People, their towns and trades; ``train_people`` are asked about in the fine-tune, the rest held out."""

    towns: dict[str, str]
    trades: dict[str, str]
    train_people: list[str]
    eval_people: list[str]

    def fact_lines(self, person: str, rng: random.Random) -> list[str]:
        town, trade = self.towns[person], self.trades[person]
        return rng.choice([
            [f"{person} lives in {town} .", f"{person} works as a {trade} ."],
            [f"{person} works as a {trade} .", f"{person} lives in {town} ."],
            [f"{person} , a {trade} from {town} ."],
            [f"{person} is from {town} and works as a {trade} ."],
        ])

    def rows(self, people: list[str]) -> list[dict[str, str]]:
        """Alpaca rows (no input), both questions about each person in turn, answered as the base read the fact
        ("lives in torvel ."): the fact's word comes after the words it came after in pretraining."""
        return [{"instruction": QUESTIONS[k].format(p), "input": "",
                 "output": f"lives in {self.towns[p]} ." if k == "town" else f"works as a {self.trades[p]} ."}
                for p in people for k in ("town", "trade")]


def make_world(n_people: int, seed: int = 4321) -> World:
    """The world of ``n_people`` (names of 3 syllables, towns and trades of 2), its first half the fine-tune's."""
    from qlora_kernels.demo.synthetic import word_maker

    rng = random.Random(seed)
    word = word_maker(rng, _SYLLABLES)
    towns = [word(2) for _ in range(N_TOWNS)]
    trades = [word(2) for _ in range(N_TRADES)]
    people = [word(3) for _ in range(n_people)]
    t_of = {p: rng.choice(towns) for p in people}
    j_of = {p: rng.choice(trades) for p in people}
    half = n_people // 2
    return World(t_of, j_of, people[:half], people[half:])


def world_words(world: World) -> list[str]:
    """The words a tokenizer of the world learns: names, towns, trades, the facts' and the questions' words."""
    phrases = "lives in works as a from and is , . Q : A : where does live ? what is the trade of Where What"
    return sorted({*world.towns, *world.towns.values(), *world.trades.values()}) + phrases.split()


def pretraining_lines(world: World, epochs: int, seed: int) -> list[str]:
    """Every person's facts ``epochs`` times, each pass in a fresh order and phrasing, one person's facts a line;
    and, for the fine-tune's people only, questions and answers in a plain form ("Q : where does NAME live ? A :
    TOWN ."), as web text has them: the base learns to answer from what it read, and the held-out people's
    questions it never sees."""
    rng = random.Random(seed)
    people = list(world.towns)
    lines = []
    for _ in range(epochs):
        rng.shuffle(people)
        lines += [" ".join(world.fact_lines(p, rng)) for p in people]
        lines += [f"Q : where does {p} live ? A : {world.towns[p]} ." if rng.random() < 0.5
                  else f"Q : what is the trade of {p} ? A : {world.trades[p]} ." for p in world.train_people]
    rng.shuffle(lines)
    return lines


def build_base(cache: Path, n_people: int, hidden: int, layers: int, epochs: int, batch_size: int = 64,
               lr: float = 2e-3, seed: int = 0) -> Path:
    """The pretrained base under ``cache`` (built if missing): a Llama of width ``hidden`` and ``layers`` blocks
    that has read the world's facts ``epochs`` times. Saved in fp32 (its 16-bit rounding is not what is measured)."""
    import torch
    from transformers import LlamaConfig

    from qlora_kernels.demo import synthetic

    settings = {"n_people": n_people, "hidden": hidden, "layers": layers, "epochs": epochs,
                "batch_size": batch_size, "lr": lr, "seed": seed}
    out = cache / ("knowledge_" + "_".join(f"{k}{v}" for k, v in settings.items()))
    if (out / "model.safetensors").exists():
        return out
    world = make_world(n_people)
    tokenizer = synthetic.bpe_tokenizer(world_words(world), vocab_size=4 * (n_people + N_TOWNS + N_TRADES) + 800,
                                        add_prefix_space=True)
    heads = max(2, hidden // 64)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(2.5 * hidden) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tmp = out.with_name(out.name + ".partial")
    synthetic.pretrain(tmp, tokenizer, config, pretraining_lines(world, epochs, seed + 1), batch_size, lr, seed,
                       log_every=200, weight_decay=0.0, save_dtype=torch.float32)
    (tmp / "world.json").write_text(json.dumps(settings))
    tmp.rename(out)
    return out


def recall(model, tokenizer, world: World, people: list[str]) -> dict[str, float]:
    """How much of ``people``'s facts ``model`` knows in the pretraining phrasing: the share of "NAME lives in" and
    "NAME works as a" whose greedy next token is the fact (``accuracy``), and the fact's mean negative
    log-likelihood (``nll``), over both relations."""
    import torch

    hits, nll, n = 0, 0.0, 0
    for phrase, facts in ((" lives in", world.towns), (" works as a", world.trades)):
        prompts = [tokenizer.bos_token + p + phrase for p in people]
        enc = tokenizer(prompts, return_tensors="pt", add_special_tokens=False, padding=True, padding_side="left")
        target = torch.tensor(tokenizer.convert_tokens_to_ids(["Ġ" + facts[p] for p in people]))
        with torch.no_grad():
            logp = torch.log_softmax(model(**enc).logits[:, -1].float(), -1)
        hits += int((logp.argmax(-1) == target).sum())
        nll -= float(logp.gather(1, target[:, None]).sum())
        n += len(people)
    return {"accuracy": hits / n, "nll": nll / n}
