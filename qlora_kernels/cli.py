"""The ``qlora-kernels`` command line: ``train``, ``generate``, ``chat``, ``demo``, ``bench``, ``backends``.

Exit codes: 0 success, 1 the run failed (data, non-finite loss, ...), 2 bad usage or config,
130 interrupted (after the checkpoint is written).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path


def _benchmarks_dir() -> Path:
    """``benchmarks/`` of the source tree this package was imported from (it is not installed)."""
    return Path(__file__).resolve().parent.parent / "benchmarks"


def _bench_scripts(bench: Path) -> dict[str, Path]:
    """The runnable scripts of ``benchmarks/`` by name: its ``*.py`` files but helpers (``_*.py``) and pytest
    files (``test_*.py``, run them with pytest)."""
    if not bench.is_dir():
        return {}
    return {p.stem: p for p in sorted(bench.glob("*.py")) if not p.name.startswith(("_", "test_"))}


def _ignore_sigint() -> None:
    """After a run stopped by Ctrl-C (its checkpoint written): ignore further Ctrl-C while the process exits."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import ConfigError, DataError, TrainingError, load_config, train

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except ConfigError as e:  # output_dir taken since the config was read
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # The run has stopped and its checkpoint is written: a further Ctrl-C while the process exits would
        # only turn exit status 130 into death by the signal.
        _ignore_sigint()
        return 130
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    ev = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    print(f"trained {result.global_step} steps: train loss {result.train_loss:.4f}{ev}; adapter in {result.output_dir}")
    return 0


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, cache=args.cache)


def _load_for_generation(args: argparse.Namespace):
    import torch

    from .generation import load_model

    return load_model(args.model, four_bit=not args.no_4bit, adapter=args.adapter,
                      dtype=getattr(torch, _DTYPES[args.dtype]), device=args.device)


def _setup(step):
    """A command's checks and loading: ``(step's result, None)``, or ``(None, exit code)`` after one line on stderr
    (bad input: 2; Ctrl-C: 130)."""
    try:
        return step(), None
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None, 2
    except KeyboardInterrupt:
        _ignore_sigint()
        return None, 130


def _cmd_generate(args: argparse.Namespace) -> int:
    import json

    from .generation import check_sampling, generate, prompt_of_row, read_prompt_rows

    def run():
        check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed, args.batch_size,
                       args.cache)
        if bool(args.prompt) == bool(args.prompts):
            raise ValueError("give the prompts as arguments or as --prompts FILE.jsonl (one of the two)")
        rows = [{"prompt": p} for p in args.prompt] if args.prompt else read_prompt_rows(args.prompts)
        where = "prompt" if args.prompt else str(args.prompts)
        prompts, templates = zip(*(prompt_of_row(r, f"{where} {i}") for i, r in enumerate(rows)))
        for i, p in enumerate(prompts):  # before the model is loaded: an empty prompt fails at once
            if isinstance(p, str) and not p.strip():
                raise ValueError(f"prompt {i} is empty")
        if args.no_chat_template:
            templates = [False] * len(prompts)
        model, tokenizer = _load_for_generation(args)
        return rows, generate(model, tokenizer, list(prompts), batch_size=args.batch_size,
                              chat_template=list(templates), **_sampling(args))

    done, code = _setup(run)
    if code is not None:
        return code
    rows, result = done
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for i, (row, c) in enumerate(zip(rows, result.completions)):
            if args.format == "jsonl":
                rec = {**row, "completion": c.text, "prompt_tokens": c.prompt_tokens,
                       "completion_tokens": len(c.token_ids), "finish_reason": c.finish_reason}
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            else:
                if len(rows) > 1:
                    out.write(f"--- {i}\n")
                out.write(c.text + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(result.stats.summary(), file=sys.stderr)
    return 0


_CHAT_HELP = "commands: /reset (a new conversation), /exit (or Ctrl-D; Ctrl-C stops a reply, or leaves at the prompt)"


def _cmd_chat(args: argparse.Namespace) -> int:
    from .generation import Chat, check_sampling

    def run():
        check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed, 1, args.cache)
        model, tokenizer = _load_for_generation(args)
        return Chat(model, tokenizer, system=args.system, **_sampling(args))

    chat, code = _setup(run)
    if code is not None:
        return code
    print(f"chatting with {args.model}" + (f" + {args.adapter}" if args.adapter else "") + f"; {_CHAT_HELP}",
          file=sys.stderr)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave
            print(file=sys.stderr)
            return 0
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            return 0
        if message == "/reset":
            chat.reset()
            print("(a new conversation)", file=sys.stderr)
            continue
        if message in ("/help", "/?"):
            print(_CHAT_HELP, file=sys.stderr)
            continue
        dropped = chat.dropped
        try:
            chat.reply(message, on_text=show)
        except KeyboardInterrupt:
            print("\n(stopped; that exchange is not kept)", file=sys.stderr)
            continue
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        show("\n")
        if chat.dropped > dropped:
            print(f"(the conversation outgrew the context: {chat.dropped - dropped} oldest exchange(s) dropped)",
                  file=sys.stderr)
        if args.verbose and chat.last_stats is not None:
            print(f"({chat.last_stats.summary()})", file=sys.stderr)


def _add_model_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("model", help="a local transformers model directory (float or bitsandbytes 4-bit safetensors)")
    g.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter directory, loaded live (not merged)")
    g.add_argument("--no-4bit", action="store_true",
                   help="load the model dense instead of quantizing its linear layers to NF4 at load")
    g.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="compute dtype (default bf16)")
    g.add_argument("--device", default=None, help="torch device (default cpu)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="most new tokens per answer")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 (the default): greedy decoding; above 0: sampling at this temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling cut (1: off)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling cut (0: off)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampling draws")
    g.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                   help="KV cache: dynamic (the default) or static with the decode step compiled by torch.compile "
                        "(the first call of a batch shape compiles; faster decoding after)")


def _cmd_export(args: argparse.Namespace) -> int:
    import json

    from .export import export_model

    done, code = _setup(lambda: export_model(
        args.base, args.adapter, args.output, format=args.format, dtype=args.dtype, eval_data=args.eval_data,
        max_loss_increase=args.max_loss_increase, allow_other_base=args.allow_other_base, gguf_type=args.gguf_type))
    if code is not None:
        return code
    print(json.dumps(done.to_dict()) if args.json else done.summary())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    try:
        return run.main(args)
    except KeyboardInterrupt:
        _ignore_sigint()
        return 130


def _cmd_bench(args: argparse.Namespace) -> int:
    bench = _benchmarks_dir()
    by_name = _bench_scripts(bench)
    if not by_name:
        print(f"error: no benchmark scripts found in {bench}; the benchmarks live in the source repository's "
              "benchmarks/ folder (run from a clone of the repository)", file=sys.stderr)
        return 2
    rest = list(args.args)
    if not rest or rest[0].removesuffix(".py") not in by_name:
        print("error: name a benchmark script: " + ", ".join(by_name), file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(by_name[rest.pop(0).removesuffix(".py")]), *rest])


def _cmd_backends(args: argparse.Namespace) -> int:
    from .backends import backends_report

    print(backends_report())
    return 0


def _config_keys_help() -> str:
    import dataclasses

    from .train.config import ALIAS_NOTES, ALIASES, KEY_GROUPS

    lines = []
    for heading, group in KEY_GROUPS:
        lines.append(f"{heading}:")
        for f in dataclasses.fields(group):
            default = f.default if f.default is not dataclasses.MISSING else (
                "required" if f.default_factory is dataclasses.MISSING else f.default_factory())
            if dataclasses.is_dataclass(default):
                default = dataclasses.asdict(default)
            choices = f.metadata.get("choices")
            allowed = f" [{' | '.join(map(str, choices))}]" if choices and len(choices) > 1 else ""
            rng = f.metadata.get("range")
            ranged = f"; allowed: {str(rng).removeprefix('in ')}" if rng else ""
            lines.append(f"  {f.name} ({default}): {f.metadata.get('help', '')}{allowed}{ranged}")
    lines.append("aliases (TRL / transformers / PEFT / Axolotl names, read as ours; not together with ours):")
    lines += [f"  {a} -> {k}" + (f" ({ALIAS_NOTES[a]})" if a in ALIAS_NOTES else "") for a, k in ALIASES.items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from .demo import run as demo

    p = argparse.ArgumentParser(prog="qlora-kernels", description="QLoRA kernels: fine-tune, demo, benchmark.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="SFT or DPO fine-tuning from one YAML config (data-parallel under torchrun)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_keys_help(),
                       description="Fine-tune with QLoRA from one YAML file (Axolotl-like keys). Overrides are "
                                   "key=value with dotted keys,\nvalues parsed as YAML, e.g. max_steps=100 "
                                   "quantization.blocksize=128 datasets.0.path=data.jsonl\nData-parallel: "
                                   "torchrun --nproc_per_node=N -m qlora_kernels.train CONFIG.yaml [key=value ...]")
    t.add_argument("config", help="YAML config file (see examples/sft_tiny.yaml)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="complete prompts with a model (4-bit or not, optionally an adapter)",
                       description="Complete prompts, from the arguments or a JSONL file (rows with 'prompt': text "
                                   "or a conversation, 'messages', or alpaca's 'instruction'/'input'), in "
                                   "left-padded batches. Text prompts get the tokenizer's chat template when it has "
                                   "one (--no-chat-template: as they are); alpaca rows never. Greedy unless "
                                   "--temperature > 0. Completions go to stdout (or --output), the token counts "
                                   "and tok/s to stderr.")
    _add_model_arguments(g)
    g.add_argument("prompt", nargs="*", help="prompts (or --prompts FILE.jsonl)")
    g.add_argument("--prompts", metavar="FILE.jsonl", help="a JSONL file of prompt rows")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    g.add_argument("--no-chat-template", action="store_true", help="feed text prompts as they are")
    g.add_argument("--format", choices=("text", "jsonl"), default="text",
                   help="text: each completion (headed '--- i' when several); jsonl: each input row with "
                        "completion, prompt_tokens, completion_tokens, finish_reason")
    g.add_argument("--output", "-o", metavar="FILE", help="write the completions here instead of stdout")
    g.set_defaults(func=_cmd_generate, max_new_tokens_default=128)

    c = sub.add_parser("chat", help="chat with a model in the terminal (streamed; /reset, /exit)",
                       description="An interactive conversation through the tokenizer's chat template, streamed. "
                                   + _CHAT_HELP + ".")
    _add_model_arguments(c)
    c.add_argument("--system", help="a system message at the start of every conversation")
    c.add_argument("--verbose", "-v", action="store_true", help="print the tok/s of each answer")
    c.set_defaults(func=_cmd_chat, max_new_tokens_default=512)

    e = sub.add_parser("export", help="merge an adapter into its base model and write it (merged16, bnb4, gguf)",
                       description="Merge a LoRA adapter into the base it was trained on (loaded in NF4, as in "
                                   "training) and write a transformers directory: merged16, dense weights in "
                                   "--dtype; bnb4, the merge quantized again to NF4 in bitsandbytes' format; or "
                                   "gguf, one model.gguf for llama.cpp / Ollama (--gguf-type). "
                                   "Prints the |logit change| against the unmerged adapter model (and with "
                                   "--eval-data the eval loss of both). Writes to a temporary directory renamed at "
                                   "the end; an existing --output is refused.")
    e.add_argument("base", help="the base model directory the adapter was trained on")
    e.add_argument("--adapter", required=True, help="the PEFT LoRA adapter directory")
    e.add_argument("--output", "-o", required=True, help="the directory to write (must not exist)")
    e.add_argument("--format", choices=("merged16", "bnb4", "gguf"), default="merged16", help="default merged16")
    e.add_argument("--gguf-type", choices=("f16", "bf16", "q8_0"), default="q8_0",
                   help="gguf: the matrices' type (norms stay f32); default q8_0")
    e.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="the written weights' dtype (bnb4: of its dense layers and compute); default bf16")
    e.add_argument("--eval-data", metavar="FILE.jsonl",
                   help="rows ('text', 'prompt'+'completion', or alpaca's) to measure the eval loss on")
    e.add_argument("--max-loss-increase", type=float, metavar="X",
                   help="with --eval-data: refuse (write nothing) when the export's eval loss is higher by more")
    e.add_argument("--allow-other-base", action="store_true",
                   help="export an adapter whose adapter_config.json names another base model (shapes fitting)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.set_defaults(func=_cmd_export)

    d = sub.add_parser("demo", help="fine-tune a tiny model on a synthetic task on this CPU (a few minutes)",
                       description="QLoRA fine-tune of a shipped tiny Llama on a synthetic instruction task; "
                                   "prints held-out exact-match accuracy before and after; nothing is downloaded.")
    demo.add_arguments(d)
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="micro-benchmarks against bitsandbytes (scripts in benchmarks/)",
                       description="Run a script from the repository's benchmarks/ folder: bench SCRIPT [ARGS...]")
    b.add_argument("args", nargs="*", metavar="ARG", help="SCRIPT and its arguments, passed on unchanged")
    b.set_defaults(func=_cmd_bench)

    k = sub.add_parser("backends", help="which kernel backends are live here, and why others are not")
    k.set_defaults(func=_cmd_backends)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qlora-kernels`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and argv[1:2] not in (["-h"], ["--help"]):
        # Everything after "bench" belongs to the benchmark script, options included.
        return _cmd_bench(argparse.Namespace(args=argv[1:]))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "generate" and not any(e.startswith("-") for e in extra):
        # prompts after the options (`generate MODEL --adapter DIR "a prompt"`): argparse takes the positionals of
        # one run only
        args.prompt = [*args.prompt, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "max_new_tokens_default", None) is not None and args.max_new_tokens is None:
        args.max_new_tokens = args.max_new_tokens_default
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
