"""Generation (qlora_kernels.generation) and the ``generate`` / ``chat`` commands, on the shipped tiny Llama (a
ChatML template, 256 positions) and a tokenizer without a template (tests/hf_tiny.py, 64 positions)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import cli
from qlora_kernels.demo import synthetic
from qlora_kernels.generation import (
    Chat,
    TextStream,
    context_length,
    generate,
    load_model,
    prompt_of_row,
    read_prompt_rows,
    render_prompt,
)
from qlora_kernels.nn import NF4Linear, QLoraLinear
from qlora_kernels.train.templates import alpaca_prompt

from .hf_tiny import randomize_lora_b, write_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = synthetic.BASE_MODEL_DIR


@pytest.fixture(scope="module")
def tiny32():
    """The shipped tiny Llama, 4-bit, fp32 compute."""
    return load_model(TINY, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    rows = [json.loads(line) for line in open(synthetic.EVAL_FILE)][:6]
    return [alpaca_prompt(r["instruction"], r.get("input") or "") for r in rows]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A live (non-zero B) r=4 adapter on every linear layer of the tiny Llama, saved in PEFT's format."""
    model = qk.load_4bit_model(TINY, dtype=torch.float32)
    qk.apply_qlora(model, r=4, lora_alpha=8, target_modules="all-linear")
    randomize_lora_b(model, std=0.2)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    qk.save_adapter(model, out, base_model_name_or_path=str(TINY))
    return out


def _direct(model, tokenizer, prompts: list[str], new: int) -> list[list[int]]:
    """transformers' generate() by hand: left padding, greedy, the tokenizer's eos."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    rows = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        cut = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        rows.append(row[:cut])
    return rows


def test_greedy_equals_transformers_generate(tiny32, prompts):
    model, tok = tiny32
    res = generate(model, tok, prompts, max_new_tokens=20, batch_size=len(prompts), chat_template=False)
    assert [c.token_ids for c in res.completions] == _direct(model, tok, prompts, 20)
    for c in res.completions:
        assert c.finish_reason == ("stop" if c.token_ids[-1] == tok.eos_token_id else "length")
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert len(c.token_ids) <= 20
    st = res.stats
    assert st.prompts == len(prompts) and st.batches == 1
    assert st.new_tokens == sum(len(c.token_ids) for c in res.completions)
    assert st.prompt_tokens == sum(len(tok(p)["input_ids"]) for p in prompts)
    assert st.prefill_s > 0 and st.decode_s > 0 and "tok/s" in st.summary()


def test_batches_keep_the_order_and_the_model_mode(tiny32, prompts):
    model, tok = tiny32
    whole = generate(model, tok, prompts, max_new_tokens=8, batch_size=len(prompts), chat_template=False)
    model.train()
    try:
        split = generate(model, tok, prompts, max_new_tokens=8, batch_size=4, chat_template=False)
        assert model.training  # the caller's mode comes back
    finally:
        model.eval()
    assert split.stats.batches == 2 and len(split.completions) == len(prompts)
    # fp32: padding another batch's way moves a logit by rounding only; the greedy tokens agree on this model
    assert [c.token_ids for c in split.completions] == [c.token_ids for c in whole.completions]


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tiny32, prompts):
    model, tok = tiny32
    kw = dict(max_new_tokens=16, temperature=1.5, top_p=0.95, top_k=50, chat_template=False)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = generate(model, tok, prompts, seed=7, **kw).texts
    assert torch.equal(torch.random.get_rng_state(), state)
    b = generate(model, tok, prompts, seed=7, **kw).texts
    c = generate(model, tok, prompts, seed=8, **kw).texts
    greedy = generate(model, tok, prompts, max_new_tokens=16, chat_template=False).texts
    assert a == b
    assert a != c and a != greedy  # at temperature 1.5 over six prompts, a draw that changes nothing is no draw


def test_static_cache_compiled_gives_the_dynamic_caches_tokens(tiny32, prompts):
    """cache="static": transformers' static cache with the decode step compiled (inductor, on the CPU too): the
    same greedy tokens as the dynamic cache on the 4-bit model (fp32), and the compiled step is reused by a second
    call of the same shape."""
    import torch._dynamo.utils as dynamo_utils

    model, tok = tiny32
    kw = dict(max_new_tokens=12, batch_size=3, chat_template=False)
    dynamic = generate(model, tok, prompts[:3], **kw)
    torch._dynamo.reset()
    static = generate(model, tok, prompts[:3], cache="static", **kw)
    assert [c.token_ids for c in static.completions] == [c.token_ids for c in dynamic.completions]
    compiled = dynamo_utils.counters["stats"]["unique_graphs"]
    assert compiled > 0  # it did compile
    again = generate(model, tok, prompts[:3], cache="static", **kw)
    assert [c.token_ids for c in again.completions] == [c.token_ids for c in dynamic.completions]
    assert dynamo_utils.counters["stats"]["unique_graphs"] == compiled  # and reused it
    with pytest.raises(ValueError, match="cache must be one of dynamic, static; got 'paged'"):
        generate(model, tok, prompts[:1], cache="paged")


def test_checkpoint_sampling_defaults_are_not_applied(tiny32, prompts):
    model, tok = tiny32
    gc = model.generation_config
    saved = copy.deepcopy(gc)
    gc.do_sample, gc.temperature, gc.top_k = True, 5.0, 10
    try:
        got = generate(model, tok, prompts[:2], max_new_tokens=12, chat_template=False)
    finally:
        model.generation_config = saved
    assert [c.token_ids for c in got.completions] == _direct(model, tok, prompts[:2], 12)


def test_chat_template_and_conversations(tiny32):
    model, tok = tiny32
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sona mabi"}]
    text = render_prompt(msgs, tok)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nsona mabi<|im_end|>\n" \
                   "<|im_start|>assistant\n"
    assert render_prompt("sona mabi", tok) == render_prompt([{"role": "user", "content": "sona mabi"}], tok)
    assert render_prompt("sona mabi", tok, chat_template=False) == "sona mabi"
    a = generate(model, tok, ["sona mabi"], max_new_tokens=10)
    b = generate(model, tok, [[{"role": "user", "content": "sona mabi"}]], max_new_tokens=10)
    assert a.texts == b.texts
    # a templated answer ends at the template's end-of-turn marker, not only at the tokenizer's eos
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for c in a.completions + b.completions:
        assert im_end not in c.token_ids[:-1] and tok.eos_token_id not in c.token_ids[:-1]


def test_bad_prompts_and_settings_are_named(tiny32):
    model, tok = tiny32
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, tok, ["hi", "  "])
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(model, tok, [])
    with pytest.raises(ValueError, match="list of prompts"):
        generate(model, tok, "hi")
    with pytest.raises(ValueError, match=r"prompt 0, message 0: role must be one of"):
        generate(model, tok, [[{"role": "robot", "content": "hi"}]])
    with pytest.raises(ValueError, match="is a conversation, which needs the chat template"):
        generate(model, tok, [[{"role": "user", "content": "hi"}]], chat_template=False)
    long = "sona " * 300
    with pytest.raises(ValueError, match=r"prompt 0 is \d+ tokens; with max_new_tokens=8 that is more than the "
                                         r"model's context of 256 positions"):
        generate(model, tok, [long], max_new_tokens=8, chat_template=False)
    n = len(tok("sona mabi")["input_ids"])
    with pytest.raises(ValueError, match="context of 256"):
        generate(model, tok, ["sona mabi"], max_new_tokens=257 - n, chat_template=False)
    generate(model, tok, ["sona mabi"], max_new_tokens=256 - n, chat_template=False)  # exactly fits
    for kw, msg in [(dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
                    (dict(temperature=-1.0), "temperature must be"), (dict(temperature=float("nan")), "temperature"),
                    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_k=-1), "top_k must be"),
                    (dict(seed=-3), "seed must be"), (dict(batch_size=0), "batch_size must be")]:
        with pytest.raises(ValueError, match=msg):
            generate(model, tok, ["hi"], **kw)


def test_no_chat_template(tmp_path):
    write_tiny(tmp_path / "m")
    model, tok = load_model(tmp_path / "m", dtype=torch.float32)
    assert context_length(model, tok) == 64
    assert generate(model, tok, ["abc"], max_new_tokens=4).completions[0].prompt_tokens == 3  # as it is
    with pytest.raises(ValueError, match="no chat_template"):
        generate(model, tok, [[{"role": "user", "content": "abc"}]])
    with pytest.raises(ValueError, match="chat needs a tokenizer with a chat_template"):
        Chat(model, tok)


def test_adapters_live_equal_their_merge(adapter_dir, prompts):
    model, tok = load_model(TINY, adapter=adapter_dir, dtype=torch.float32)
    assert sum(isinstance(m, QLoraLinear) for m in model.modules()) == 28
    assert not any(p.requires_grad for p in model.parameters())
    base, _ = load_model(TINY, dtype=torch.float32)
    merged = qk.merge_and_unload(copy.deepcopy(model))
    kw = dict(max_new_tokens=20, chat_template=False)
    live = [c.token_ids for c in generate(model, tok, prompts, **kw).completions]
    assert live == [c.token_ids for c in generate(merged, tok, prompts, **kw).completions]
    assert live != [c.token_ids for c in generate(base, tok, prompts, **kw).completions]  # the adapter is live


def test_dense_model_with_an_adapter_equals_peft(adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = load_model(TINY, four_bit=False, adapter=adapter_dir, dtype=torch.float32)
    assert not any(isinstance(m, (NF4Linear, QLoraLinear)) for m in model.modules())  # nothing quantized
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32),
                                    adapter_dir).eval()
    x = tok(["sona mabi tozi"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)


def test_an_adapter_naming_another_base_warns(tmp_path, adapter_dir):
    """An adapter whose shapes fit but whose adapter_config.json names another base model loads with a warning
    naming both; one naming this model (its directory, or a hub id with the same last component) loads quietly."""
    import shutil
    import warnings

    from qlora_kernels.hf.adapters import OtherBaseModelWarning

    def with_base(name: str, base: str) -> Path:
        d = tmp_path / name
        shutil.copytree(adapter_dir, d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        return d

    with pytest.warns(OtherBaseModelWarning, match=r"was trained on 'someone/other-llama' .* loaded into '.*"
                                                   + Path(TINY).name):
        load_model(TINY, adapter=with_base("other", "someone/other-llama"), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OtherBaseModelWarning)
        load_model(TINY, adapter=adapter_dir, dtype=torch.float32)  # saved with this model's directory
        load_model(TINY, adapter=with_base("hub", f"org/{Path(TINY).name}"), dtype=torch.float32)


def test_load_model_errors(tmp_path, adapter_dir):
    with pytest.raises(FileNotFoundError, match="'/nowhere' does not exist"):
        load_model("/nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        load_model(TINY, adapter=tmp_path)
    other = tmp_path / "other"
    m = qk.load_4bit_model(write_tiny(other) and other, dtype=torch.float32)
    qk.apply_qlora(m, r=4, target_modules="all-linear")
    qk.save_adapter(m, tmp_path / "other_adapter")
    with pytest.raises(ValueError, match=r"does not fit LlamaForCausalLM \(an adapter for another base model or "
                                         r"size\?\): model.layers.0.*got \[4, 128\] and \[64, 4\]"):
        load_model(TINY, adapter=tmp_path / "other_adapter")


def test_prompt_rows(tmp_path):
    conv = [{"role": "user", "content": "hi"}]
    assert prompt_of_row({"prompt": "hi"}, "r") == ("hi", None)
    assert prompt_of_row({"prompt": conv}, "r") == (conv, None)
    assert prompt_of_row({"messages": conv + [{"role": "assistant", "content": "ref"}]}, "r") == (conv, None)
    assert prompt_of_row({"instruction": "Do.", "input": "x"}, "r") == (alpaca_prompt("Do.", "x"), False)
    with pytest.raises(ValueError, match="r: no prompt column: expected 'prompt', 'messages' or 'instruction'"):
        prompt_of_row({"text": "hi"}, "r")
    with pytest.raises(ValueError, match="only assistant turns"):
        prompt_of_row({"messages": [{"role": "assistant", "content": "a"}]}, "r")
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(ValueError, match=r"p.jsonl:3: not a JSON line"):
        read_prompt_rows(f)
    f.write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts in the file"):
        read_prompt_rows(f)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompt_rows(tmp_path / "none.jsonl")


def test_text_stream_holds_back_partial_characters():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)

    class Bytes:  # a byte-level stand-in: token i is byte i
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    s = TextStream(Bytes(), stop_ids=[0])
    euro = list("€".encode())
    assert s.push([ord("a")]) == "a"
    assert s.push(euro[:1]) == "" and s.push(euro[1:2]) == ""
    assert s.push(euro[2:]) == "€"
    assert s.push([0, ord("z")]) == ""  # stopped at the stop id: nothing after it
    t = TextStream(tok, stop_ids=[tok.eos_token_id])
    ids = tok("sona mabi", add_special_tokens=False)["input_ids"]
    assert "".join(t.push([i]) for i in ids) == tok.decode(ids)


def test_chat_keeps_the_conversation_and_drops_the_oldest_to_fit(tiny32):
    model, tok = tiny32
    chat = Chat(model, tok, system="Be brief.", max_new_tokens=8)
    pieces: list[str] = []
    first = chat.reply("sona mabi", on_text=pieces.append)
    assert "".join(pieces) == first
    assert [m["role"] for m in chat.messages()] == ["system", "user", "assistant"]
    chat.reply("zada varo")
    assert len(chat.turns) == 4 and chat.dropped == 0
    # the same conversation through generate() gives the same second answer
    want = generate(model, tok, [chat.messages()[:-1]], max_new_tokens=8).texts[0]
    assert chat.turns[-1]["content"] == want
    chat.reset()
    assert chat.messages() == [{"role": "system", "content": "Be brief."}]
    small = Chat(model, tok, max_new_tokens=200)
    for _ in range(6):
        small.reply("sona mabi tozi bufa vopo")
    assert small.dropped > 0 and len(small.turns) < 12
    with pytest.raises(ValueError, match="more than the model's context of 256"):
        small.reply("sona " * 200)
    with pytest.raises(ValueError, match="the message is empty"):
        small.reply(" ")


# ---------------------------------------------------------------------------------------------
# the commands


def test_generate_command_text_and_jsonl(tmp_path, capsys, adapter_dir):
    assert cli.main(["generate", str(TINY), "sona mabi", "zada", "--max-new-tokens", "6", "--dtype", "fp32"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("--- 0\n") and "--- 1\n" in out.out
    assert "2 prompt(s)" in out.err and "tok/s" in out.err
    rows = [{"id": 1, "instruction": "Translate into Zil.", "input": "sona mabi"},
            {"id": 2, "prompt": [{"role": "user", "content": "zada"}]}, {"id": 3, "prompt": "varo"}]
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    o = tmp_path / "out.jsonl"
    assert cli.main(["generate", str(TINY), "--prompts", str(f), "--format", "jsonl", "-o", str(o),
                     "--max-new-tokens", "6", "--adapter", str(adapter_dir), "--temperature", "0.8", "--seed",
                     "3"]) == 0
    got = [json.loads(line) for line in o.read_text().splitlines()]
    assert [g["id"] for g in got] == [1, 2, 3]
    for g in got:
        assert set(g) >= {"completion", "prompt_tokens", "completion_tokens", "finish_reason"}
        assert g["finish_reason"] in ("stop", "length") and 1 <= g["completion_tokens"] <= 6
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    # the alpaca row is its raw prompt (not wrapped in the chat template); the others are templated
    assert got[0]["prompt_tokens"] == len(tok(alpaca_prompt("Translate into Zil.", "sona mabi"))["input_ids"])
    assert got[2]["prompt_tokens"] == len(tok(render_prompt("varo", tok), add_special_tokens=False)["input_ids"])


def test_generate_command_takes_prompts_after_the_options(capsys, adapter_dir):
    """`generate MODEL --adapter DIR "a prompt"` (the line the demo prints): prompts may follow the options, before
    and after them alike; an unknown option is still argparse's error."""
    assert cli.main(["generate", str(TINY), "sona mabi", "--adapter", str(adapter_dir), "zada", "--max-new-tokens",
                     "4", "--dtype", "fp32"]) == 0
    assert "2 prompt(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", str(TINY), "--max-new-tokens", "4", "hi", "--no-such-option"])
    assert exc.value.code == 2 and "--no-such-option" in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["generate", "/nowhere", "hi"], "'/nowhere' does not exist"),
    (["generate", str(TINY)], "give the prompts as arguments or as --prompts"),
    (["generate", str(TINY), "hi", "  "], "prompt 1 is empty"),
    (["generate", str(TINY), "sona " * 300], "more than the model's context of 256"),
    (["generate", str(TINY), "hi", "--adapter", "/nowhere"], "adapter must be a PEFT adapter directory"),
    (["generate", str(TINY), "hi", "--top-p", "2"], "top_p must be in"),
    (["generate", str(TINY), "hi", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["chat", "/nowhere"], "'/nowhere' does not exist"),
])
def test_commands_name_bad_input(argv, msg, capsys):
    assert cli.main(argv) == 2
    assert msg in capsys.readouterr().err


def test_generate_command_adapter_for_another_base(tmp_path, capsys):
    other = tmp_path / "other"
    write_tiny(other)
    m = qk.load_4bit_model(other, dtype=torch.float32)
    qk.apply_qlora(m, r=4, target_modules="all-linear")
    qk.save_adapter(m, tmp_path / "a")
    assert cli.main(["generate", str(TINY), "hi", "--adapter", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "an adapter for another base model or size?" in err and "got [4, 128] and [64, 4]" in err


def _chat_process(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "qlora_kernels", "chat", str(TINY), "--max-new-tokens", "6", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_chat_command_streams_resets_and_exits():
    p = _chat_process("--verbose")
    out, err = p.communicate("sona mabi\n\n/reset\nzada varo\n/help\n/exit\nnever read\n", timeout=120)
    assert p.returncode == 0, err
    assert out.strip() and out.endswith("\n")
    assert "(a new conversation)" in err and "/reset" in err and err.count("prompt(s)") == 2  # two answers
    p = _chat_process()
    out, err = p.communicate("sona mabi\n", timeout=120)  # end of input: leaves cleanly
    assert p.returncode == 0 and out.strip() and "Traceback" not in err, err


def test_chat_command_ctrl_c_at_the_prompt_leaves_cleanly():
    p = _chat_process()
    deadline = time.monotonic() + 120
    err = ""
    while "chatting with" not in err and time.monotonic() < deadline:  # loaded, waiting for a line
        err += os.read(p.stderr.fileno(), 4096).decode()
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    rest_out, rest_err = p.communicate(timeout=60)
    assert p.returncode == 0, err + rest_err
    assert "Traceback" not in err + rest_err
