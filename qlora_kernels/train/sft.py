"""The SFT loop: config -> data -> QLoRA model -> accumulate / clip / step -> eval -> checkpoints -> adapter.

One optimizer step consumes ``gradient_accumulation_steps`` micro-batches. Their target tokens are
counted first, and each micro-batch contributes ``sum of its token losses / target tokens of the
whole step``, so the step's gradient is the gradient of the mean token loss of the accumulated
batch, whatever the split into micro-batches (REFERENCE.md, SFT).

What a checkpoint restores (see :mod:`.checkpoint`) is everything the next step depends on:
trainable parameters, optimizer, scheduler, data position and every RNG, so a resumed run on a
CPU reproduces the uninterrupted loss curve bit for bit. Ctrl-C finishes the current step, writes
a checkpoint and raises ``KeyboardInterrupt``; a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as dp
from . import dpo as dpo_lib
from .checkpoint import (
    CheckpointError,
    clean_stale_saves,
    load_checkpoint,
    prune_checkpoints,
    remove_run_outputs,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .components import (
    TrainingError,
    adapter_saver,
    autocast,
    autocast_dtype,
    build_model,
    build_optimizer,
    build_scheduler,
    load_tokenizer,
    resolve_device,
    total_steps,
)
from .config import ConfigError, SFTConfig, check_output_dir, dump_config
from .data import DataStats, Example, MicroBatchStream, eval_batches, load_examples, load_pairs
from .loss import model_loss


@dataclass
class TrainResult:
    """What :func:`train` did."""

    output_dir: Path
    global_step: int
    train_loss: float | None
    eval_loss: float | None
    best_eval_loss: float | None
    stopped_early: bool
    data: DataStats
    history: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int, device: torch.device,
             amp: torch.dtype | None, chunk_size: int | None = None) -> float:
    """Mean token cross-entropy over the target tokens of ``examples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(examples, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, amp):
            s, n = model_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size)
        total += float(s)
        count += n
    model.train(was_training)
    return total / max(1, count)


# --------------------------------------------------------------------------- run helpers


class _Metrics:
    """metrics.jsonl writer; on resume keeps only the records up to the resumed step.

    A line that is not a JSON object (the torn last line of a crash or a full disk mid-write) is
    dropped, and counted in ``dropped``.
    """

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path = path if enabled else None  # only rank 0 writes (distributed runs)
        self.history: list[dict[str, Any]] = []
        self.dropped = 0
        if self.path is None:
            return
        if resume_step is not None and path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    rec = None
                if not isinstance(rec, dict):
                    self.dropped += bool(line.strip())
                    continue
                if rec.get("step", 0) <= resume_step:
                    self.history.append(rec)
        with open(path, "w") as f:
            for rec in self.history:
                f.write(json.dumps(rec) + "\n")

    def write(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def plot_losses(history: list[dict[str, Any]], path: Path) -> bool:
    """Train and eval loss against the step, as a PNG. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("token cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


class _SigintLatch:
    """First Ctrl-C sets a flag (the loop checkpoints at the end of the step); the second interrupts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _SigintLatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        from tqdm import tqdm

        tqdm.write(msg)


# --------------------------------------------------------------------------- the loop


def train(cfg: SFTConfig, model: nn.Module | None = None, tokenizer: Any = None,
          on_step_end: Callable[[int, dict[str, Any]], None] | None = None, quiet: bool = False) -> TrainResult:
    """Run supervised fine-tuning (or DPO with ``rl: dpo``) as configured and return a :class:`TrainResult`.

    ``model`` / ``tokenizer`` may be given (already built); by default they are loaded from
    ``cfg.base_model`` with :func:`build_model`. ``on_step_end(step, record)`` is called after
    each optimizer step (and its eval / checkpoint). Writes into ``cfg.output_dir``: the final
    adapter (PEFT format), ``metrics.jsonl``, ``loss.png``, ``config.yaml`` and
    ``checkpoint-<step>`` directories.

    One run per ``output_dir``: the results of another run there are never overwritten unless
    ``overwrite_output_dir`` (which deletes them first) or the run resumes from one of its
    checkpoints (:func:`.config.check_output_dir`); ``save_total_limit`` prunes only this run's
    checkpoints.

    Raises:
        ConfigError: ``output_dir`` holds another run's results (see above).
        TrainingError: non-finite loss or gradient (naming step, micro-batch, examples and the last
            good checkpoint), a missing optimizer, a checkpoint that is damaged (naming the file) or does
            not fit this run (checked before any parameter changes), or a checkpoint that cannot be written.
        DataError: a malformed row (unless ``skip_bad_rows``).
        KeyboardInterrupt: after Ctrl-C, once the checkpoint is written.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the run is data-parallel (:mod:`.distributed`): each rank
    trains on its share of every global micro-batch, and only rank 0 writes files and prints.
    """
    problems = check_output_dir(cfg)  # every rank, before any rank can write (init_distributed meets first)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    device = resolve_device(cfg)
    ctx = dp.init_distributed(device.type)
    try:
        return _train(cfg, model, tokenizer, on_step_end, quiet or not ctx.is_main, ctx, dp.rank_device(device, ctx))
    finally:
        dp.teardown(ctx)


def _train(cfg: SFTConfig, model: nn.Module | None, tokenizer: Any,
           on_step_end: Callable[[int, dict[str, Any]], None] | None, quiet: bool, ctx: dp.DistContext,
           device: torch.device) -> TrainResult:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        if cfg.overwrite_output_dir:
            gone = remove_run_outputs(out)
            if gone:
                _say(f"overwrite_output_dir: deleted the previous run's {', '.join(gone)} in {out}", quiet)
        for name in clean_stale_saves(out):
            _say(f"cleaned up {name}, left by a save that did not finish", quiet)
        dump_config(cfg, out / "config.yaml")
        for alias, key in cfg.aliases.items():
            _say(f"config: read {alias} as {key}", quiet)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    amp = autocast_dtype(cfg, device)
    dpo = dpo_lib.DPOSettings.from_config(cfg) if cfg.is_dpo else None

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train_ex, eval_ex, stats = (load_pairs if dpo else load_examples)(cfg, tokenizer)
    _say(f"data: {stats.summary()}; eval {'pairs' if dpo else 'examples'}: {len(eval_ex)}", quiet)
    for msg in stats.bad_row_messages:
        _say(f"  skipped: {msg}", quiet)

    model = model if model is not None else build_model(cfg, device)
    model.to(device)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters (did apply_qlora match any module?)")
    n_train = sum(p.numel() for p in params)
    _say(f"model: {n_train:,} trainable parameters in {len(params)} tensors; device {device}, "
         f"autocast {amp or 'off (fp32)'}" + (f"; data-parallel over {ctx.world_size} processes ({ctx.backend})"
                                              if ctx.enabled else ""), quiet)
    runner = dp.wrap_model(model, ctx, device)  # call as runner(fn, *args): DDP sees the forward
    eval_bs = cfg.eval_batch_size or cfg.micro_batch_size
    if dpo and cfg.precompute_ref_log_probs:
        for pairs in (train_ex, eval_ex):
            dpo_lib.precompute_reference_log_probs(model, pairs, eval_bs, pad_id, device, amp, dpo.chunk_size,
                                                   ctx, lambda t: dp.all_reduce_sum(t, ctx, device))
        _say(f"reference log-probs precomputed for {len(train_ex)} + {len(eval_ex)} pairs", quiet)

    optimizer = build_optimizer(cfg, params)
    stream = (dpo_lib.pair_stream if dpo else MicroBatchStream)(train_ex, cfg.micro_batch_size, cfg.seed, pad_id, ctx)
    steps = total_steps(cfg, stream.batches_per_epoch)
    scheduler = build_scheduler(cfg, optimizer, steps)
    scaler = torch.amp.GradScaler(device.type) if amp is torch.float16 else None
    save_adapter = adapter_saver(model)
    G = cfg.gradient_accumulation_steps
    run_key = {"train_examples": len(train_ex), "micro_batch_size": cfg.micro_batch_size, "seed": cfg.seed,
               "gradient_accumulation_steps": G}
    if ctx.enabled:
        run_key["world_size"] = ctx.world_size

    state: dict[str, Any] = {"global_step": 0, "best_eval_loss": None, "evals_without_improvement": 0,
                             "last_checkpoint": None, "tokens_seen": 0}
    resume_step = None
    run_id = uuid.uuid4().hex  # names this run's checkpoints (pruning never touches another run's)
    if cfg.resume_from_checkpoint:
        def fits(saved: dict[str, Any]) -> None:  # checked before load_checkpoint changes anything
            missing = [k for k in ("loop", "scheduler", "data") if k not in saved]
            if missing:
                raise CheckpointError(f"checkpoint {cfg.resume_from_checkpoint}: trainer_state.json lacks "
                                      f"{', '.join(missing)}")
            if saved.get("run_key") != run_key:
                raise CheckpointError(f"resume_from_checkpoint {cfg.resume_from_checkpoint!r} was written by a run "
                                      f"with {saved.get('run_key')}; this run has {run_key}: the data position would "
                                      "not match")

        try:
            saved, rng = load_checkpoint(cfg.resume_from_checkpoint, model, optimizer, check=fits)
        except CheckpointError as e:
            raise TrainingError(str(e)) from None
        run_id = saved.get("run_id") or run_id
        scheduler.load_state_dict(saved["scheduler"])
        stream.load_state_dict(saved["data"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state.update(saved["loop"])
        set_rng_state(rng)
        resume_step = state["global_step"]
        _say(f"resumed from {cfg.resume_from_checkpoint} at step {resume_step}", quiet)
    metrics = _Metrics(out / "metrics.jsonl", resume_step if resume_step is not None else -1, ctx.is_main)
    if metrics.dropped:
        _say(f"metrics.jsonl: dropped {metrics.dropped} unreadable line(s) (a write cut short by a crash?)", quiet)

    step_rng, step_data = rng_state(), stream.state_dict()

    def checkpoint(rng: dict[str, Any], data: dict[str, int]) -> Path:
        path = out / f"checkpoint-{state['global_step']}"
        loop = {**state, "last_checkpoint": str(path)}
        trainer_state = {"loop": loop, "scheduler": scheduler.state_dict(), "data": data, "run_key": run_key,
                         "scaler": scaler.state_dict() if scaler is not None else None, "run_id": run_id}
        if ctx.is_main:
            try:
                save_checkpoint(path, model, optimizer, trainer_state, rng, save_adapter)
            except CheckpointError as e:
                raise TrainingError(str(e)) from e
            prune_checkpoints(out, cfg.save_total_limit, run_id)
        state["last_checkpoint"] = str(path)
        return path

    def run_eval() -> float:
        mine = dp.shard(eval_ex, ctx)  # each rank evaluates its share; sums are all-reduced
        if dpo:
            loss_sum, sums = dpo_lib.dpo_sums(model, mine, eval_bs, pad_id, device, amp, dpo)
            tot = dp.all_reduce_sum([loss_sum, *sums.values()], ctx, device).tolist()
            extra = dpo_lib.finish_metrics(dict(zip(sums, tot[1:])), tot[0], "eval_")
        else:
            mean = evaluate(model, mine, eval_bs, pad_id, device, amp, cfg.loss_chunk_size) if mine else 0.0
            if ctx.enabled:  # each rank's mean, weighted by its target tokens
                n_mine = sum(e.num_targets for e in mine)
                tot = dp.all_reduce_sum([mean * n_mine, n_mine], ctx, device).tolist()
                mean = tot[0] / max(1.0, tot[1])
            extra = {"eval_loss": mean}
        loss = extra["eval_loss"]
        rec = {"step": state["global_step"], "epoch": round(stream.epoch_progress, 4), **extra}
        metrics.write(rec)
        shown = f", reward accuracy {extra['eval_rewards/accuracies']:.3f}" if dpo else ""
        _say(f"step {state['global_step']}: eval loss {loss:.4f}{shown}", quiet)
        return loss

    from tqdm import tqdm

    bar = tqdm(total=steps, initial=state["global_step"], disable=quiet or not cfg.progress_bar,
               desc="dpo" if dpo else "sft", unit="step", dynamic_ncols=True)
    last_loss, last_eval, stopped_early = None, None, False
    in_update = False
    model.train()
    try:
        with _SigintLatch() as latch:
            while state["global_step"] < steps:
                t0 = time.perf_counter()
                micro = [stream.next() for _ in range(G)]
                # The step's loss is normalized by the target tokens (SFT) or pairs (DPO) of the global batch.
                n_here = sum(int(b["pair_weight"].sum()) if dpo else int((b["labels"][:, 1:] != -100).sum())
                             for b, _ in micro)
                n_tok_here = sum(int(b["attention_mask"].sum()) for b, _ in micro)
                n_tgt, n_tok = (int(v) for v in dp.all_reduce_sum([n_here, n_tok_here], ctx, device).tolist())
                loss_sum, dpo_step = 0.0, {}
                for i, (batch, exs) in enumerate(micro):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with dp.no_sync(runner, sync=i == G - 1):  # DDP all-reduces in the last micro-batch's backward
                        with autocast(device, amp):
                            if dpo:
                                s, sums = dpo_lib.dpo_batch_loss(model, batch, dpo, runner)
                                dpo_step = {k: dpo_step.get(k, 0.0) + v for k, v in sums.items()}
                            else:
                                s, _ = runner(model_loss, batch["input_ids"], batch["attention_mask"],
                                              batch["labels"], cfg.loss_chunk_size)
                        if not torch.isfinite(s.detach()):
                            raise TrainingError(
                                f"non-finite loss ({float(s.detach())}) at step {state['global_step'] + 1}, "
                                f"micro-batch {i + 1}/{G} "
                                f"(examples {', '.join(e.source for e in exs[:4])}{', ...' if len(exs) > 4 else ''}"
                                f"); last good checkpoint: {state['last_checkpoint'] or 'none (set save_steps)'}")
                        scaled = s / max(1, n_tgt) * ctx.world_size  # DDP averages over ranks: undo it
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    loss_sum += float(s.detach())
                step_sums = dp.all_reduce_sum([loss_sum, *dpo_step.values()], ctx, device).tolist()
                loss_sum, dpo_step = step_sums[0], dict(zip(dpo_step, step_sums[1:]))
                in_update = True
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
                if not math.isfinite(grad_norm) and scaler is None:
                    raise TrainingError(
                        f"non-finite gradient norm at step {state['global_step'] + 1} (loss was finite); "
                        f"last good checkpoint: {state['last_checkpoint'] or 'none (set save_steps)'}")
                lr = optimizer.param_groups[0]["lr"]
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                in_update = False
                step_rng, step_data = rng_state(), stream.state_dict()  # the new step boundary
                state["global_step"] += 1
                state["tokens_seen"] += n_tok
                step = state["global_step"]
                last_loss = loss_sum / max(1, n_tgt)
                dt = time.perf_counter() - t0
                rec = {"step": step, "epoch": round(stream.epoch_progress, 4), "loss": last_loss, "lr": lr,
                       "grad_norm": grad_norm, ("pairs" if dpo else "target_tokens"): n_tgt,
                       "tokens_per_s": round(n_tok / dt, 1)}
                if dpo:
                    rec.update({k: v for k, v in dpo_lib.finish_metrics(dpo_step, loss_sum).items() if k != "loss"})
                if step % cfg.logging_steps == 0 or step == steps:
                    metrics.write(rec)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tok / dt:.0f}", refresh=False)
                bar.update(1)
                if eval_ex and cfg.eval_steps and (step % cfg.eval_steps == 0 or step == steps):
                    last_eval = run_eval()
                    best = state["best_eval_loss"]
                    if best is None or last_eval < best:
                        state["best_eval_loss"], state["evals_without_improvement"] = last_eval, 0
                    else:
                        state["evals_without_improvement"] += 1
                    if (cfg.early_stopping_patience is not None
                            and state["evals_without_improvement"] >= cfg.early_stopping_patience):
                        stopped_early = True
                        _say(f"early stopping at step {step}: no better eval loss in "
                             f"{cfg.early_stopping_patience} evaluations (best {state['best_eval_loss']:.4f})", quiet)
                if cfg.save_steps and step % cfg.save_steps == 0:
                    checkpoint(step_rng, step_data)
                if on_step_end is not None:
                    on_step_end(step, rec)
                if dp.any_rank(latch.requested, ctx, device):
                    saved_now = state["last_checkpoint"] == str(out / f"checkpoint-{step}")
                    path = Path(state["last_checkpoint"]) if saved_now else checkpoint(step_rng, step_data)
                    _say(f"interrupted at step {step}; checkpoint saved to {path} "
                         f"(resume with resume_from_checkpoint={path})")
                    raise KeyboardInterrupt
                if stopped_early:
                    break
    except KeyboardInterrupt:
        bar.close()
        if not in_update and state["last_checkpoint"] != str(out / f"checkpoint-{state['global_step']}"):
            # Interrupted while accumulating, evaluating or between steps: model and optimizer are at
            # the last step boundary, whose RNG and data position were kept for this.
            path = checkpoint(step_rng, step_data)
            print(f"interrupted; checkpoint of step {state['global_step']} saved to {path}", file=sys.stderr)
        elif in_update:
            print("interrupted inside the optimizer update: no checkpoint written (last good one: "
                  f"{state['last_checkpoint'] or 'none'})", file=sys.stderr)
        raise
    bar.close()

    if eval_ex and last_eval is None:
        last_eval = run_eval()
    if ctx.is_main:
        save_adapter(model, out)
        plot_losses(metrics.history, out / "loss.png")
    dp.barrier(ctx)  # every rank leaves together, once rank 0 has written
    _say(f"done: {state['global_step']} steps; adapter saved to {out}", quiet)
    return TrainResult(out, state["global_step"], last_loss, last_eval, state["best_eval_loss"], stopped_early,
                       stats, metrics.history)
