"""SFT data: row types, templates, completion-only masking, truncation, bad rows, batching, and the loss
pieces that do not need a model (chunked cross-entropy, accumulation normalization)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qlora_kernels.demo.synthetic import BASE_MODEL_DIR, EOS
from qlora_kernels.train.config import load_config
from qlora_kernels.train.data import (
    DataError,
    Example,
    MicroBatchStream,
    check_row,
    collate,
    load_examples,
    tokenize_segments,
)
from qlora_kernels.train.loss import IGNORE_INDEX, causal_lm_loss, chunked_cross_entropy
from qlora_kernels.train.templates import alpaca_prompt, chatml_segments, tokenizer_template_segments

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BASE_MODEL_DIR)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    return d


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_cfg(model_dir: Path, data: Path, type_: str, **kw):
    return load_config(raw={"base_model": str(model_dir), "datasets": [{"path": str(data), "type": type_}],
                            "output_dir": str(model_dir.parent / "out"), **kw})


def trained_text(tok, ex: Example) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX])


def prompt_text(tok, ex: Example) -> str:
    return tok.decode([t for t, y in zip(ex.input_ids, ex.labels) if y == IGNORE_INDEX], skip_special_tokens=True)


# --------------------------------------------------------------------------- row types and templates


def test_alpaca_masks_the_prompt(tok, model_dir, tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate into Zil.", "input": "dofe nove .",
                                               "output": "su re ."},
                                              {"instruction": "Translate into Zil.", "output": "su ."}])
    train, evals, stats = load_examples(make_cfg(model_dir, data, "alpaca"), tok)
    assert len(train) == 2 and evals == [] and stats.examples == 2
    a, b = train
    assert a.input_ids[0] == tok.bos_token_id
    assert trained_text(tok, a) == "su re ." + EOS
    assert prompt_text(tok, a) == alpaca_prompt("Translate into Zil.", "dofe nove .")
    assert "### Input:" not in prompt_text(tok, b) and trained_text(tok, b) == "su ." + EOS
    # targets are exactly the tail of the sequence: the answer and the EOS
    k = a.num_targets
    assert all(y == IGNORE_INDEX for y in a.labels[:-k]) and a.labels[-k:] == a.input_ids[-k:]


def test_alpaca_under_chatml(tok, model_dir, tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "hi", "input": "x", "output": "su re ."}])
    (ex,), _, _ = load_examples(make_cfg(model_dir, data, "alpaca", prompt_template="chatml"), tok)
    assert trained_text(tok, ex) == "su re .<|im_end|>"
    assert tok.decode(ex.input_ids).endswith("<|im_start|>assistant\nsu re .<|im_end|>\n")


def test_completion_and_text(tok, model_dir, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "dofe nove =", "completion": " su re ."}])
    (ex,), _, _ = load_examples(make_cfg(model_dir, data, "completion"), tok)
    assert trained_text(tok, ex) == " su re ." + EOS and prompt_text(tok, ex) == "dofe nove ="
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "dofe nove ."}])
    (ex,), _, _ = load_examples(make_cfg(model_dir, data, "text"), tok)
    assert trained_text(tok, ex) == "dofe nove ." + EOS
    assert ex.input_ids[0] == tok.bos_token_id and ex.labels[0] == IGNORE_INDEX
    assert ex.num_targets == len(ex.input_ids) - 1


def test_chat_trains_every_assistant_turn(tok, model_dir, tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "dofe"},
            {"role": "assistant", "content": "su"}, {"role": "user", "content": "nove"},
            {"role": "assistant", "content": "re ."}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    (ex,), _, _ = load_examples(make_cfg(model_dir, data, "chat"), tok)
    assert trained_text(tok, ex) == "su<|im_end|>re .<|im_end|>"
    assert "be brief" in tok.decode(ex.input_ids)


def test_tokenizer_chat_template_matches_chatml(tok, model_dir, tmp_path):
    msgs = [{"role": "user", "content": "dofe"}, {"role": "assistant", "content": "su"},
            {"role": "user", "content": "nove"}, {"role": "assistant", "content": "re ."}]
    a = tokenize_segments(tokenizer_template_segments(msgs, tok), tok, add_eos=False)
    b = tokenize_segments(chatml_segments(msgs), tok, add_eos=False)
    assert a == b
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    (ex,), _, _ = load_examples(make_cfg(model_dir, data, "chat", prompt_template="tokenizer_default"), tok)
    assert (ex.input_ids, ex.labels) == b


def test_tokenizer_template_needs_a_template(tok):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        tokenizer_template_segments([{"role": "assistant", "content": "x"}], NoTemplate())


def test_train_on_inputs(tok, model_dir, tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "hi", "output": "su ."}])
    (ex,), _, _ = load_examples(make_cfg(model_dir, data, "alpaca", train_on_inputs=True), tok)
    assert ex.labels[1:] == ex.input_ids[1:]


# --------------------------------------------------------------------------- truncation and bad rows


def test_truncation_is_counted_and_empty_targets_dropped(tok, model_dir, tmp_path):
    long_prompt = " ".join(["dofe"] * 50)
    data = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "completion": " " + " ".join(["su"] * 40)},
                                              {"prompt": long_prompt, "completion": " su"}])
    train, _, stats = load_examples(make_cfg(model_dir, data, "completion", sequence_len=20), tok)
    assert stats.truncated == 2 and stats.dropped_no_target == 1 and len(train) == 1
    assert len(train[0].input_ids) == 20


@pytest.mark.parametrize("row, needle", [
    ({"instruction": "x"}, "alpaca row needs a string 'output' (got missing)"),
    ({"instruction": "x", "output": 3}, "alpaca row needs a string 'output' (got int 3)"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_alpaca_row_names_file_and_line(tok, model_dir, tmp_path, row, needle):
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}, "", row])
    with pytest.raises(DataError) as e:
        load_examples(make_cfg(model_dir, data, "alpaca"), tok)
    assert f"{data}:3: " in str(e.value) and needle in str(e.value) and "skip_bad_rows" in str(e.value)


def test_invalid_json_line_and_skip_bad_rows(tok, model_dir, tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}, "{not json", {"output": "y"},
                                              {"instruction": "x", "output": "z"}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: not valid JSON"):
        load_examples(make_cfg(model_dir, data, "alpaca"), tok)
    train, _, stats = load_examples(make_cfg(model_dir, data, "alpaca", skip_bad_rows=True), tok)
    assert len(train) == 2 and stats.skipped_bad_rows == 2 and stats.rows == 4
    assert any(":3:" in m for m in stats.bad_row_messages)


@pytest.mark.parametrize("row_type, row, needle", [
    ("chat", {"messages": []}, "non-empty list 'messages'"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ("chat", {"messages": [{"role": "bot", "content": "x"}]}, "messages[0] must be"),
    ("completion", {"prompt": "x"}, "'completion'"),
    ("text", {"body": "x"}, "'text'"),
])
def test_check_row(row_type, row, needle):
    assert needle in check_row(row, row_type)


def test_json_list_file(tok, model_dir, tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "su ."}, {"text": 5}]))
    with pytest.raises(DataError, match=r"d\.json:row 1: text row needs a string 'text'"):
        load_examples(make_cfg(model_dir, p, "text"), tok)


def test_parquet(tok, model_dir, tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet support needs pyarrow, which is not installed here")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "su ."}, {"text": "re ."}]), p)
    train, _, _ = load_examples(make_cfg(model_dir, p, "text"), tok)
    assert len(train) == 2
    bad = tmp_path / "bad.parquet"  # parquet's magic bytes, then garbage: pyarrow raises ArrowInvalid
    bad.write_bytes(b"PAR1" + b"not a parquet file" * 8 + b"PAR1")
    with pytest.raises(DataError) as e:
        load_examples(make_cfg(model_dir, bad, "text"), tok)
    assert f"{bad}: not a readable parquet file (ArrowInvalid" in str(e.value)


def test_eval_split_and_val_set_size(tok, model_dir, tmp_path):
    rows = [{"text": f"su {'re ' * i}."} for i in range(10)]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    train, evals, _ = load_examples(make_cfg(model_dir, data, "text", val_set_size=0.3), tok)
    assert len(train) == 7 and len(evals) == 3
    assert not {e.source for e in train} & {e.source for e in evals}
    ev = write_jsonl(tmp_path / "e.jsonl", rows[:2])
    cfg = load_config(raw={"base_model": str(model_dir), "output_dir": str(tmp_path / "o"),
                           "datasets": [{"path": str(data), "type": "text"},
                                        {"path": str(ev), "type": "text", "split": "validation"}]})
    train, evals, _ = load_examples(cfg, tok)
    assert len(train) == 10 and len(evals) == 2


# --------------------------------------------------------------------------- batching


def test_collate_right_pads():
    exs = [Example([1, 5, 6], [IGNORE_INDEX, 5, 6], "a"), Example([1, 7], [IGNORE_INDEX, 7], "b")]
    b = collate(exs, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]


def test_stream_epochs_and_resume():
    exs = [Example([1, i], [IGNORE_INDEX, i], str(i)) for i in range(7)]
    s = MicroBatchStream(exs, 3, seed=1, pad_id=0)
    assert s.batches_per_epoch == 3
    seen = [[e.source for e in s.next()[1]] for _ in range(3)]
    assert sorted(sum(seen, [])) == sorted(str(i) for i in range(7)) and [len(x) for x in seen] == [3, 3, 1]
    assert s.state_dict() == {"epoch": 1, "index": 0}
    s.next()
    state = s.state_dict()
    rest = [[e.source for e in s.next()[1]] for _ in range(4)]
    t = MicroBatchStream(exs, 3, seed=1, pad_id=0)
    t.load_state_dict(state)
    assert [[e.source for e in t.next()[1]] for _ in range(4)] == rest
    u = MicroBatchStream(exs, 3, seed=1, pad_id=0)
    epoch1 = [[e.source for e in u.next()[1]] for _ in range(6)][3:]
    assert epoch1 != seen  # a new order each epoch


# --------------------------------------------------------------------------- loss


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-5), (torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_ce_matches_full_logits(dtype, atol, chunk):
    torch.manual_seed(0)
    n, h, v = 37, 24, 101
    x = torch.randn(n, h, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, h) * 0.3).to(dtype).requires_grad_()
    b = torch.randn(v, dtype=dtype, requires_grad=True)
    y = torch.randint(0, v, (n,))
    got = chunked_cross_entropy(x, w, y, bias=b, chunk_size=chunk)
    ref = F.cross_entropy((x.float() @ w.float().t() + b.float()), y, reduction="sum")
    torch.testing.assert_close(got, ref, atol=atol * n, rtol=1e-3)
    g = torch.autograd.grad(got * 0.7, [x, w, b])
    r = torch.autograd.grad(ref * 0.7, [x, w, b])
    for a, c in zip(g, r):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), c.float(), atol=atol * 5, rtol=1e-2)


def test_chunked_ce_runs_its_gemm_in_the_autocast_dtype():
    # Under autocast the head's GEMMs take bf16 operands (as F.linear would; no fp32 copy of the
    # vocabulary matrix), accumulate in fp32, and the log-sum-exp and the result stay fp32.
    torch.manual_seed(0)
    x, w = torch.randn(64, 32, requires_grad=True), torch.randn(500, 32)
    y = torch.randint(0, 500, (64,))
    xb = x.detach().bfloat16().float().requires_grad_(True)
    ref_bf16 = F.cross_entropy(xb @ w.bfloat16().float().t(), y, reduction="sum")
    ref_fp32 = F.cross_entropy(x.detach() @ w.t(), y, reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_cross_entropy(x, w, y, chunk_size=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref_bf16, rtol=1e-5, atol=1e-4)
    assert abs(float(got - ref_fp32)) > 1e-3  # really bf16 operands, not an fp32 GEMM
    got.backward()
    ref_bf16.backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, xb.grad, atol=2e-2, rtol=2e-2)  # dlogits are rounded to bf16 too


def test_chunked_ce_is_minus_the_summed_token_log_probs():
    from qlora_kernels.train.loss import token_log_probs

    torch.manual_seed(0)
    x, w, b = torch.randn(21, 16), torch.randn(77, 16), torch.randn(77)
    y = torch.randint(0, 77, (21,))
    torch.testing.assert_close(chunked_cross_entropy(x, w, y, bias=b, chunk_size=5),
                               -token_log_probs(x, w, y, bias=b, chunk_size=3).sum())


def test_chunked_ce_frozen_weight_keeps_no_weight_grad():
    x = torch.randn(9, 8, requires_grad=True)
    w = torch.randn(30, 8)
    loss = chunked_cross_entropy(x, w, torch.randint(0, 30, (9,)), chunk_size=4)
    (gx,) = torch.autograd.grad(loss, [x])
    assert gx.shape == x.shape and w.grad is None
    with torch.no_grad():
        assert not chunked_cross_entropy(x, w, torch.randint(0, 30, (9,))).requires_grad


def test_causal_lm_loss_shifts_and_masks():
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    w = torch.randn(20, 8)
    labels = torch.randint(0, 20, (2, 6))
    labels[0, :3] = IGNORE_INDEX
    labels[1, 5] = IGNORE_INDEX
    s, n = causal_lm_loss(hidden, w, labels, chunk_size=3)
    logits = hidden[:, :-1] @ w.t()
    ref = F.cross_entropy(logits.reshape(-1, 20), labels[:, 1:].reshape(-1), reduction="sum", ignore_index=-100)
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum()) == 7
    torch.testing.assert_close(s, ref)
    lin = torch.nn.Linear(8, 20, bias=False)
    lin.weight.data.copy_(w)
    s2, n2 = causal_lm_loss(hidden, lin, labels, chunk_size=3)  # module path (checkpointed chunks)
    torch.testing.assert_close(s2, ref)
    assert n2 == n


def test_accumulation_normalizes_by_the_whole_batch():
    """Two micro-batches with 1 and 9 target tokens: the accumulated gradient equals the big batch's mean-token
    gradient, and differs from averaging the per-micro-batch means."""
    torch.manual_seed(0)
    w = torch.randn(16, 8, requires_grad=True)
    h1, h2 = torch.randn(1, 3, 8), torch.randn(1, 11, 8)
    l1 = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3]])
    l2 = torch.randint(0, 16, (1, 11))
    l2[0, :2] = IGNORE_INDEX
    n_total = sum(int((lab[:, 1:] != IGNORE_INDEX).sum()) for lab in (l1, l2))
    assert n_total == 10
    for h, lab in ((h1, l1), (h2, l2)):
        s, _ = causal_lm_loss(h, w, lab)
        (s / n_total).backward()
    accumulated = w.grad.clone()
    w.grad = None
    pad = torch.zeros(1, 8, 8)
    big_h = torch.cat([torch.cat([h1, pad], 1), h2], 0)
    big_l = torch.cat([torch.cat([l1, torch.full((1, 8), IGNORE_INDEX)], 1), l2], 0)
    s, n = causal_lm_loss(big_h, w, big_l)
    (s / n).backward()
    torch.testing.assert_close(accumulated, w.grad)
    w.grad = None
    for h, lab in ((h1, l1), (h2, l2)):
        s, n = causal_lm_loss(h, w, lab)
        (s / n / 2).backward()
    assert not torch.allclose(accumulated, w.grad, atol=1e-3)


# --------------------------------------------------------------------------- bytes that are not text (issue 11: 14)


def test_non_utf8_byte_and_lone_surrogate_name_file_and_line_or_are_skipped(tok, model_dir, tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_bytes(b'{"instruction": "x", "output": "y"}\n'
                     b'{"instruction": "caf\xe9", "output": "y"}\n'  # Latin-1, not UTF-8
                     b'{"instruction": "x", "output": "\\ud800"}\n'  # valid JSON, not valid Unicode
                     b'{"instruction": "x", "output": "z"}\n')
    with pytest.raises(DataError) as e:
        load_examples(make_cfg(model_dir, data, "alpaca"), tok)
    assert f"{data}:2: not valid UTF-8 (byte 0xe9 at byte 21 of the line)" in str(e.value)
    assert "skip_bad_rows" in str(e.value)
    train, _, stats = load_examples(make_cfg(model_dir, data, "alpaca", skip_bad_rows=True), tok)
    assert len(train) == 2 and stats.skipped_bad_rows == 2 and stats.rows == 4
    assert any(f"{data}:3: " in m and "lone surrogate" in m and "'output'" in m for m in stats.bad_row_messages)


def test_json_file_that_is_not_utf8_or_holds_a_surrogate(tok, model_dir, tmp_path):
    p = tmp_path / "d.json"
    p.write_bytes(b'[{"text": "su ."},\n {"text": "\xff"}]')
    with pytest.raises(DataError, match=r"d\.json:2: not valid UTF-8 \(byte 0xff"):
        load_examples(make_cfg(model_dir, p, "text"), tok)
    p.write_text('[{"text": "su ."}, {"text": "\\udfff re"}]')
    with pytest.raises(DataError, match=r"d\.json:row 1: .*lone surrogate"):
        load_examples(make_cfg(model_dir, p, "text"), tok)
    train, _, stats = load_examples(make_cfg(model_dir, p, "text", skip_bad_rows=True), tok)
    assert len(train) == 1 and stats.skipped_bad_rows == 1
