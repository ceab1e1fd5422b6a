"""Sample packing: the bin packer, packed rows, and the loss, gradients and log-probs of a packed batch equal to those
of the same examples unpacked (Llama, Qwen3, Mistral with a sliding window; every packed layout), a DPO pair's two
sequences never attending to each other, the model check, and the trainer's step with ``sample_packing: true``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels.demo.synthetic import instruction_rows, make_languages, save_random_model
from qlora_kernels.train import ConfigError, TrainingError, load_config, train
from qlora_kernels.train.data import (
    Example,
    MicroBatchStream,
    PreferencePair,
    collate,
    collate_packed,
    collate_packed_pairs,
    collate_pairs,
    write_jsonl,
)
from qlora_kernels.train.loss import model_loss, model_sequence_log_probs, packed_attention_mask
from qlora_kernels.train.packing import check_packed_attention, collate_segments, pack_bins, packing_stats

from . import bounds

pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------- the packer and the rows


def test_pack_bins_fits_every_item_once_deterministically_and_beats_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 100, (300,), generator=g).tolist()
    bins = pack_bins(lengths, 128, seed=3)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert pack_bins(lengths, 128, seed=3) == bins  # deterministic
    assert len(bins) <= 1.05 * sum(lengths) / 128 + 2  # close to the lower bound
    stats = packing_stats(lengths, bins, 128, micro_batch_size=8, seed=3)
    assert stats.efficiency > 0.95 > stats.padded_efficiency
    assert "packing efficiency" in stats.summary("examples")
    # equal lengths: the seed decides which items share a bin
    assert pack_bins([3] * 8, 7, seed=0) != pack_bins([3] * 8, 7, seed=1)
    with pytest.raises(ValueError, match="more than the row capacity"):
        pack_bins([5, 200], 128)


def test_collate_segments_restarts_positions_and_never_targets_a_first_token():
    a = Example([1, 2, 3], [1, 2, 3], "a")  # a label at position 0: never predicted, packed or not
    b = Example([4, 5, 6, 7], [-100, -100, 6, 7], "b")
    c = Example([8, 9], [8, 9], "c")
    batch = collate_segments([[a, b], [c]], pad_id=0, sequence_ids=[[0, 1], [2]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7], [8, 9, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100, 6, 7], [-100, 9] + [-100] * 5]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1] + [0] * 5]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1], [2, 2] + [-1] * 5]
    # the same count of targets as the unpacked batch
    plain = collate([a, b, c], 0)
    assert int((batch["labels"][:, 1:] != -100).sum()) == int((plain["labels"][:, 1:] != -100).sum())
    assert (collate_segments([[a, b]], 0, counted=False)["labels"] == -100).all()
    mask = packed_attention_mask(batch["position_ids"][:1], torch.float32, boolean=True)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False]  # b's 2nd token sees b only


def test_micro_batch_stream_over_rows_shuffles_rows_and_resumes():
    items = [Example([i] * (i + 1), [i] * (i + 1), f"x{i}") for i in range(10)]
    rows = pack_bins([len(e.input_ids) for e in items], 12, seed=0)
    s = MicroBatchStream(items, 2, seed=5, pad_id=0, collate_fn=collate_packed, rows=rows)
    assert s.batches_per_epoch == -(-len(rows) // 2)
    seen = []
    for _ in range(s.batches_per_epoch):
        batch, got = s.next()
        assert batch["input_ids"].shape[0] <= 2
        seen += [e.source for e in got]
    assert sorted(seen) == sorted(e.source for e in items)
    state = s.state_dict()
    after = [s.next()[0]["input_ids"] for _ in range(3)]
    s2 = MicroBatchStream(items, 2, seed=5, pad_id=0, collate_fn=collate_packed, rows=rows)
    s2.load_state_dict(state)
    assert all(torch.equal(x, s2.next()[0]["input_ids"]) for x in after)


def test_sharded_stream_of_rows_gives_each_rank_its_part_of_the_single_process_rows():
    from qlora_kernels.train.distributed import DistContext

    items = [Example([i] * (i % 7 + 1), [i] * (i % 7 + 1), f"x{i}") for i in range(15)]
    rows = pack_bins([len(e.input_ids) for e in items], 8, seed=0)
    single = MicroBatchStream(items, 4, seed=1, pad_id=0, collate_fn=collate_packed, rows=rows)
    ranks = [MicroBatchStream(items, 2, seed=1, pad_id=0, ctx=DistContext(r, 2, r, "gloo"), collate_fn=collate_packed,
                              rows=rows) for r in range(2)]
    for _ in range(2 * single.batches_per_epoch):
        _, want = single.next()
        got = [s.next() for s in ranks]
        assert [e.source for _, part in got for e in part] == [e.source for e in want]
        for batch, part in got:
            if not part:  # nothing left for this rank: a placeholder that trains nothing
                assert (batch["labels"] == -100).all()


# --------------------------------------------------------------------------- packed == unpacked, on three architectures

VOCAB = 160


def tiny_model(arch: str, attn: str = "sdpa") -> nn.Module:
    """A random tiny ``arch`` model with QLoRA adapters whose B is random too (so every LoRA gradient is non-zero)."""
    import transformers

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=256, attn_implementation=attn, tie_word_embeddings=False)
    cfg = {"llama": lambda: transformers.LlamaConfig(**kw),
           "qwen3": lambda: transformers.Qwen3Config(**kw, head_dim=8),
           "mistral": lambda: transformers.MistralConfig(**kw, sliding_window=12)}[arch]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model = qk.apply_qlora(model, r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    model.config.use_cache = False
    return model.train()


def random_examples(n: int, seed: int) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        length = int(torch.randint(2, 40, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        prompt = k % 3  # some examples train every token, the first one included
        out.append(Example(ids, [-100 if i < prompt else t for i, t in enumerate(ids)], f"ex{k}"))
    return out


def loss_and_grads(model: nn.Module, batch: dict, layout: str | None = None) -> tuple[float, int, dict]:
    model.zero_grad(set_to_none=True)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    kw = {"position_ids": batch["position_ids"], "layout": layout} if "position_ids" in batch else {}
    s, n = model_loss(model, *args, **kw)
    s.backward()
    return float(s.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch,attn,layout", [("llama", "sdpa", "rows"), ("llama", "eager", "rows"),
                                              ("llama", "sdpa", "flat"), ("llama", "sdpa", "mask"),
                                              ("llama", "eager", "mask"), ("qwen3", "sdpa", "rows"),
                                              ("qwen3", "eager", "flat"), ("mistral", "sdpa", "rows")])
def test_packed_loss_and_lora_gradients_equal_unpacked(arch, attn, layout):
    """fp32: the loss sum, the target count and every LoRA gradient of the packed batch match the unpacked batch to
    float rounding (different shapes sum in a different order); Mistral's sliding window (12) is shorter than
    some examples, so its packed path must keep the window and the segments both."""
    model = tiny_model(arch, attn)
    examples = random_examples(9, seed=1)
    assert check_packed_attention(model, layout if layout != "mask" else None) in ("rows", "flat")
    s0, n0, g0 = loss_and_grads(model, collate(examples, 0))
    rows = pack_bins([len(e.input_ids) for e in examples], 64, seed=0)
    assert len(rows) < len(examples) and any(len(r) > 2 for r in rows)
    packed = collate_packed([[examples[i] for i in r] for r in rows], 0)
    s1, n1, g1 = loss_and_grads(model, packed, layout)
    assert n1 == n0
    # 2 layers; the longest reduction: the batch's tokens (9 examples of < 40), the loss a sum of positive terms
    rho_f = bounds.training_rounding(2, 9 * 40)[0]
    bounds.assert_within("loss sum", s1, s0, rho_f * abs(s0), why=f"rho_forward {rho_f:.3g} x |loss sum|")
    assert len(g0) == 4 * 7 and all(g.abs().max() > 0 for g in g0.values())
    bounds.assert_same_gradients(g1, g0, num_layers=2, reduce_len=9 * 40)


def pairs_of(examples: list[Example]) -> list[PreferencePair]:
    return [PreferencePair(examples[i], examples[i + 1], f"pair{i}") for i in range(0, len(examples) - 1, 2)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dpo_packed_log_probs_equal_unpacked_and_a_pairs_sides_never_share_attention(arch):
    model = tiny_model(arch).eval()
    pairs = pairs_of(random_examples(8, seed=2))
    with torch.no_grad():
        plain = collate_pairs(pairs, 0)
        want = model_sequence_log_probs(model, plain["input_ids"], plain["attention_mask"], plain["labels"])
        packed = collate_packed_pairs([pairs[:3], pairs[3:]], 0)  # chosen and rejected of a pair share a row

        def packed_log_probs(batch):
            return model_sequence_log_probs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                            position_ids=batch["position_ids"], sequence_ids=batch["sequence_ids"])

        got = packed_log_probs(packed)
        # a sequence's log-prob: a sum of < 40 token terms (each a log-softmax over the vocabulary) through 2 layers
        rho = bounds.training_rounding(2, max(VOCAB, 2 * 40))[0]
        bounds.assert_within("sequence log-probs, packed vs padded", got, want, rho * want.abs(),
                             why=f"rho_forward {rho:.3g} x |log-prob| (a sum of negative terms)")
        # change every token of every rejected sequence: no chosen log-prob moves (and the other way round)
        for side in ("rejected", "chosen"):
            changed = [PreferencePair(p.chosen if side == "rejected" else Example(
                [(t + 1) % VOCAB for t in p.chosen.input_ids], p.chosen.labels, "c"),
                p.rejected if side == "chosen" else Example(
                [(t + 1) % VOCAB for t in p.rejected.input_ids], p.rejected.labels, "r"), p.source) for p in pairs]
            other = packed_log_probs(collate_packed_pairs([changed[:3], changed[3:]], 0))
            kept = slice(0, 4) if side == "rejected" else slice(4, 8)
            moved = slice(4, 8) if side == "rejected" else slice(0, 4)
            # the same sequences in rows of another content: only the summation layout may differ
            bounds.assert_within(f"{side} changed: the other side's log-probs", other[kept], got[kept],
                                 rho * got[kept].abs(), why=f"rho_forward {rho:.3g} x |log-prob|")
            has_targets = got[moved] != 0
            assert has_targets.sum() >= 3 and ((other[moved] - got[moved]).abs()[has_targets] > 1e-3).all()


class _ToyLM(nn.Module):
    """A causal LM whose attention ignores position ids and honours only a 4-D mask (``mask_ok``), or nothing at all."""

    def __init__(self, mask_ok: bool) -> None:
        super().__init__()
        self.mask_ok = mask_ok
        self.emb = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 50, bias=False)
        self.config = type("C", (), {"_attn_implementation": "eager", "use_cache": False})()

    def get_decoder(self):
        return self

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        x = self.emb(input_ids)
        scores = x @ x.transpose(1, 2)
        T = x.shape[1]
        allowed = torch.ones(T, T, dtype=torch.bool).tril()
        if self.mask_ok and attention_mask is not None and attention_mask.dim() == 4:
            scores = scores + attention_mask[:, 0]
        scores = scores.masked_fill(~allowed, float("-inf"))
        return (scores.softmax(-1) @ x,)


def test_check_packed_attention_falls_back_to_an_explicit_mask_or_refuses():
    assert check_packed_attention(_ToyLM(mask_ok=True)) == "mask"
    with pytest.raises(RuntimeError, match="not kept apart"):
        check_packed_attention(_ToyLM(mask_ok=False))


# --------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("packing")
    model = save_random_model(d / "model", hidden_size=32, num_layers=2)
    rows = instruction_rows(make_languages(), 20, 1)
    write_jsonl(rows, d / "sft.jsonl")
    write_jsonl([{"prompt": f"{r['instruction']} {r['input']} =", "chosen": f" {r['output']}",
                  "rejected": f" {r['input']}"} for r in rows[:12]], d / "pref.jsonl")
    return {"model": model, "sft": d / "sft.jsonl", "pref": d / "pref.jsonl"}


def run(assets, out: Path, dpo: bool = False, **kw):
    raw = {"base_model": str(assets["model"]), "output_dir": str(out), "lora_r": 4, "lora_alpha": 8,
           "lora_dropout": 0.0, "sequence_len": 96, "micro_batch_size": 20, "max_steps": 2, "learning_rate": 5e-3,
           "warmup_steps": 0, "lr_scheduler": "constant", "optimizer": "adamw_torch", "seed": 0,
           "progress_bar": False,
           "datasets": [{"path": str(assets["pref" if dpo else "sft"]), "type": "preference" if dpo else "alpaca"}]}
    if dpo:
        raw["rl"] = "dpo"
    raw.update(kw)
    return train(load_config(raw=raw), quiet=True)


@pytest.mark.parametrize("dpo", [False, True], ids=["sft", "dpo"])
def test_a_packed_step_equals_the_unpacked_step(assets, tmp_path, dpo):
    """Every item in one micro-batch, packed or padded: the same loss, count and gradient norm at step 1, and the same
    loss at step 2 (after the same update); the packed run logs its packing efficiency."""
    plain = run(assets, tmp_path / "plain", dpo)
    packed = run(assets, tmp_path / "packed", dpo, sample_packing=True)
    key = "pairs" if dpo else "target_tokens"
    for a, b in zip(plain.history, packed.history):
        assert a[key] == b[key]
        assert "packing_efficiency" not in a and 0.5 < b["packing_efficiency"] <= 1.0
    # 2 layers; the longest reduction: one micro-batch's tokens (20 rows of <= 96)
    dpo_scale = (lambda r: 0.1 * 2 * (abs(r["logps/chosen"]) + abs(r["logps/rejected"]))) if dpo else None
    bounds.assert_same_training(packed.history, plain.history, {}, {}, num_layers=2, reduce_len=20 * 96,
                                loss_scale=dpo_scale)
    recs = [json.loads(x) for x in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()]
    assert all("packing_efficiency" in r for r in recs)


def test_packing_logs_its_efficiency_and_reads_trls_key(assets, tmp_path, capsys):
    res = train(load_config(raw={"base_model": str(assets["model"]), "output_dir": str(tmp_path / "b"),
                                 "datasets": [{"path": str(assets["sft"]), "type": "alpaca"}], "max_steps": 1,
                                 "sample_packing": True, "sequence_len": 96, "progress_bar": False,
                                 "optimizer": "adamw_torch"}))
    out = capsys.readouterr()
    assert "sample_packing: 20 examples in" in out.out + out.err and "packing efficiency" in out.out + out.err
    assert res.history[0]["packing_efficiency"] > 0
    base = {"base_model": str(assets["model"]), "output_dir": str(tmp_path / "c"),
            "datasets": [{"path": str(assets["sft"]), "type": "alpaca"}]}
    cfg = load_config(raw={**base, "packing": True})  # TRL's name
    assert cfg.sample_packing is True and cfg.aliases == {"packing": "sample_packing"}
    with pytest.raises(ConfigError, match="padding_free: unknown key; set sample_packing: true"):
        load_config(raw={**base, "padding_free": True})


def test_a_packed_run_resumes_bit_identically_and_its_checkpoint_names_the_rows(assets, tmp_path):
    kw = dict(sample_packing=True, micro_batch_size=2, max_steps=4, save_steps=2, lora_dropout=0.1)
    full = run(assets, tmp_path / "full", **kw)
    state = json.loads((tmp_path / "full" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["run_key"]["packed_rows"] >= 2
    resumed = run(assets, tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"), **kw)
    assert [(r["loss"], r["grad_norm"]) for r in resumed.history] == [(r["loss"], r["grad_norm"])
                                                                      for r in full.history if r["step"] > 2]
    with pytest.raises(TrainingError, match="data position would not match"):  # not the same rows: refused
        run(assets, tmp_path / "other", resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"),
            **{**kw, "sample_packing": False})
