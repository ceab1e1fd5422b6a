"""The ``qlora-kernels`` command line: ``train``, ``demo``, ``bench``, ``backends``.

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
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
