"""The training recipe, the same for every objective: setup -> loop -> finish.

:func:`train` takes the config's objective (:class:`.sft.SFTObjective`, or :class:`.dpo.DPOObjective` with
``rl: dpo``; the interface is :class:`.objective.Objective`) and runs a :class:`Recipe`:

1. :meth:`Recipe.setup`: output_dir (one run per directory), seeds, tokenizer, the objective's items, the
   QLoRA model (:func:`.components.build_model`, made ready by :func:`.components.prepare_model`: fused MLPs,
   checkpointing, activation offloading), the objective's one-time setup, optimizer, micro-batch stream
   (:class:`.data.MicroBatchStream`; with ``sample_packing`` over rows packed once, :mod:`.packing`, after
   checking that the model keeps packed examples apart), learning-rate schedule and, when resuming, the
   checkpoint;
2. :meth:`Recipe.fit`: optimizer steps (:meth:`Recipe.step`), each followed by an eval every ``eval_steps``
   (and early stopping), a checkpoint every ``save_steps``, ``on_step_end`` and the Ctrl-C check;
3. :meth:`Recipe.finish`: an eval if the last step had none, the adapter (PEFT format), ``loss.png``.

One optimizer step consumes ``gradient_accumulation_steps`` micro-batches. Their normalization count
(target tokens for SFT, pairs for DPO: :meth:`.objective.Objective.count`) is added up over the step and
over all ranks first, and each micro-batch contributes ``its loss sum / the step's count``, so the step's
gradient is the gradient of the mean loss of the accumulated global batch, whatever its split into
micro-batches and ranks (the loss formulas: docs/FORMATS.md, "SFT loss" and "DPO").

What a checkpoint restores (see :mod:`.checkpoint`) is everything the next step depends on:
trainable parameters, optimizer, scheduler, data position and every RNG, so a resumed run on a
CPU reproduces the uninterrupted loss curve bit for bit. Ctrl-C finishes the current step, writes
a checkpoint and raises ``KeyboardInterrupt``; a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import distributed as dp
from . import fsdp
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
    prepare_model,
    resolve_device,
    total_steps,
)
from .config import ConfigError, TrainConfig, check_output_dir, dump_config
from .data import DataStats, MicroBatchStream
from .metrics import MetricsLog, plot_losses
from .objectives import objective_class
from .objectives.base import Objective
from .packing import check_packed_attention, pack_bins, packing_stats


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


def train(cfg: TrainConfig, model: nn.Module | None = None, tokenizer: Any = None,
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
            good checkpoint), a checkpoint that is damaged (naming the file) or does not fit this run
            (checked before any parameter changes), or a checkpoint that cannot be written.
        DataError: a malformed row (unless ``skip_bad_rows``).
        KeyboardInterrupt: after Ctrl-C, once the checkpoint is written.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the run is data-parallel (:mod:`.distributed`): each rank
    trains on its share of every global micro-batch, and only rank 0 writes files and prints. With ``fsdp: true``
    the model is sharded across the ranks instead of replicated (:mod:`.fsdp`).
    """
    problems = check_output_dir(cfg)  # every rank, before any rank can write (init_distributed meets first)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    device = resolve_device(cfg)
    ctx = dp.init_distributed(device.type, one_process_group=cfg.fsdp and cfg.fsdp_config.shard_one_process)
    try:
        recipe = Recipe(cfg, objective_class(cfg.objective).from_config(cfg), ctx, dp.rank_device(device, ctx),
                        quiet or not ctx.is_main)
        recipe.setup(model, tokenizer)
        recipe.fit(on_step_end)
        return recipe.finish()
    finally:
        dp.teardown(ctx)


class Recipe:
    """One run of :func:`train`: :meth:`setup`, then :meth:`fit`, then :meth:`finish`, for any :class:`Objective`."""

    def __init__(self, cfg: TrainConfig, objective: Objective, ctx: dp.DistContext, device: torch.device,
                 quiet: bool) -> None:
        self.cfg, self.objective, self.ctx, self.device, self.quiet = cfg, objective, ctx, device, quiet
        self.out = Path(cfg.output_dir)
        # What a checkpoint keeps of the loop ("loop" in trainer_state.json).
        self.state: dict[str, Any] = {"global_step": 0, "best_eval_loss": None, "evals_without_improvement": 0,
                                      "last_checkpoint": None, "tokens_seen": 0}
        self.run_id = uuid.uuid4().hex  # names this run's checkpoints (pruning never touches another run's)
        self.last_loss: float | None = None
        self.last_eval: float | None = None
        self.stopped_early = False
        self.in_update = False  # between the first parameter change of a step and its end
        self.latch = _SigintLatch()  # Ctrl-C handling; installed by fit
        self.sharded = cfg.fsdp and ctx.enabled  # FSDP2 over the ranks (one process: a no-op, unless shard_one_process)

    def say(self, msg: str) -> None:
        if not self.quiet:
            tqdm.write(msg)

    # ----------------------------------------------------------------------- setup

    def setup(self, model: nn.Module | None = None, tokenizer: Any = None) -> None:
        """Everything the first step needs, in this order (the RNG draws depend on it)."""
        cfg, objective, ctx, device = self.cfg, self.objective, self.ctx, self.device
        if ctx.enabled and cfg.ddp is False and not cfg.fsdp:
            raise ConfigError(f"ddp: false, but torchrun started {ctx.world_size} processes: set fsdp: true to shard "
                              "the model across them, leave ddp unset (or true) for data parallelism, or run one "
                              "process")
        self.out.mkdir(parents=True, exist_ok=True)
        if ctx.is_main:
            self._prepare_output_dir()
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.amp = autocast_dtype(cfg, device)

        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.train_items, self.eval_items, self.stats = objective.load_data(cfg, tok)
        self.say(f"data: {self.stats.summary()}; eval {objective.item_noun}: {len(self.eval_items)}")
        for msg in self.stats.bad_row_messages:
            self.say(f"  skipped: {msg}")

        self.model = self._prepare_model(model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("the model has no trainable parameters (did apply_qlora match any module?)")
        parallel = (f"; {'fully sharded (FSDP2)' if self.sharded else 'data-parallel'} over {ctx.world_size} processes "
                    f"({ctx.backend})" if ctx.enabled else "")
        self.say(f"model: {sum(p.numel() for p in self.params):,} trainable parameters in {len(self.params)} "
                 f"tensors; device {device}, autocast {self.amp or 'off (fp32)'}{parallel}")
        # call as runner(fn, *args): DDP sees the forward (FSDP2 hooks the model's own units)
        self.runner = dp.wrap_model(self.model, ctx, device, fsdp=self.sharded)
        self.eval_batch_size = cfg.eval_batch_size or cfg.micro_batch_size
        if self.sharded:
            fsdp.check_setup_forwards(objective, len(self.train_items), len(self.eval_items), self.eval_batch_size, ctx)
        note = objective.setup(self.model, self.train_items, self.eval_items, self.eval_batch_size, self.pad_id,
                               device, self.amp, ctx)
        if note:
            self.say(note)

        self.optimizer = build_optimizer(cfg, self.params)
        rows = self._pack() if cfg.sample_packing else None
        self.stream = MicroBatchStream(self.train_items, objective.stream_batch_size(cfg), cfg.seed, self.pad_id, ctx,
                                       collate_fn=objective.collate_packed if rows is not None else objective.collate,
                                       rows=rows)
        self.steps = total_steps(cfg, self.stream.batches_per_epoch * objective.micro_batches_per_stream_batch())
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp is torch.float16 else None
        self.save_adapter = adapter_saver(self.model)
        if cfg.fsdp:  # gathered from the shards: every rank calls it, rank 0 writes
            self.save_adapter = fsdp.adapter_saver(ctx, self.save_adapter)
        # What a checkpoint must share with the run resuming it, for the data position to mean the same.
        self.run_key = {"train_examples": len(self.train_items), "micro_batch_size": cfg.micro_batch_size,
                        "seed": cfg.seed, "gradient_accumulation_steps": cfg.gradient_accumulation_steps}
        if ctx.enabled:
            self.run_key["world_size"] = ctx.world_size
        if cfg.fsdp:
            self.run_key["fsdp"] = True
        if rows is not None:
            self.run_key["packed_rows"] = len(rows)

        resume_step = self._resume() if cfg.resume_from_checkpoint else None
        self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step if resume_step is not None else -1,
                                  ctx.is_main)
        if self.metrics.dropped:
            self.say(f"metrics.jsonl: dropped {self.metrics.dropped} unreadable line(s) (a write cut short by a "
                     "crash?)")
        self.step_rng, self.step_data = rng_state(), self.stream.state_dict()  # the step boundary
        self.step_objective = objective.state_dict()

    def _prepare_output_dir(self) -> None:
        """Rank 0: replace a previous run's results if asked, clean up killed saves, write config.yaml."""
        cfg = self.cfg
        if cfg.overwrite_output_dir:
            gone = remove_run_outputs(self.out)
            if gone:
                self.say(f"overwrite_output_dir: deleted the previous run's {', '.join(gone)} in {self.out}")
        for name in clean_stale_saves(self.out):
            self.say(f"cleaned up {name}, left by a save that did not finish")
        dump_config(cfg, self.out / "config.yaml")
        for alias, key in cfg.aliases.items():
            self.say(f"config: read {alias} as {key}")

    def _prepare_model(self, model: nn.Module | None) -> nn.Module:
        if self.cfg.fsdp:  # sharded as it loads (or as given); one process: built as without fsdp
            model, _, notes = fsdp.build_model(self.cfg, self.device, self.ctx, model)
            for note in notes:
                self.say(note)
        model = model if model is not None else build_model(self.cfg, self.device)
        model, self.offloader, notes = prepare_model(self.cfg, model, self.device, sharded=self.sharded)
        for note in notes:
            self.say(note)
        return model

    def _pack(self) -> list[list[int]] | None:
        """sample_packing: check that the model keeps packed items apart (its layout goes to the objective), then
        pack the train items into rows once; reports the packing efficiency."""
        cfg, objective = self.cfg, self.objective
        if objective.online:  # it packs the micro-batches it generates: only the attention check here
            try:
                with autocast(self.device, self.amp):
                    objective.packed_layout = check_packed_attention(self.model)
            except RuntimeError as e:
                raise TrainingError(f"sample_packing: {e}; set sample_packing: false for this model") from None
            self.say(f"sample_packing: each micro-batch's sequences packed into rows of {cfg.sequence_len} tokens; "
                     f"attention kept apart ({objective.packed_layout} layout)")
            return None
        try:
            capacity = objective.pack_capacity(cfg.sequence_len)
            lengths = [objective.pack_length(item) for item in self.train_items]
        except NotImplementedError as e:
            raise ConfigError(f"sample_packing: {e}") from None
        try:
            with autocast(self.device, self.amp):
                objective.packed_layout = check_packed_attention(self.model)
        except RuntimeError as e:
            raise TrainingError(f"sample_packing: {e}; set sample_packing: false for this model") from None
        rows = pack_bins(lengths, capacity, cfg.seed)
        self.packing = packing_stats(lengths, rows, capacity, cfg.micro_batch_size * self.ctx.world_size, cfg.seed)
        self.say(f"{self.packing.summary(objective.item_noun)}; attention kept apart by "
                 + {"rows": "position ids", "flat": "position ids (rows flattened into one for flash attention)",
                    "mask": "an explicit block-diagonal mask"}[objective.packed_layout])
        return rows

    def _resume(self) -> int:
        """Load ``resume_from_checkpoint`` (checked to fit this run before anything changes); its step."""
        path = self.cfg.resume_from_checkpoint

        def fits(saved: dict[str, Any]) -> None:
            missing = [k for k in ("loop", "scheduler", "data") if k not in saved]
            if missing:
                raise CheckpointError(f"checkpoint {path}: trainer_state.json lacks {', '.join(missing)}")
            if self.cfg.fsdp:  # another world size may resume it (resharded), with the same global micro-batch
                problem = fsdp.run_key_problem(saved.get("run_key"), self.run_key)
                if problem:
                    raise CheckpointError(f"resume_from_checkpoint {path!r}: {problem}")
            elif saved.get("run_key") != self.run_key:
                raise CheckpointError(f"resume_from_checkpoint {path!r} was written by a run with "
                                      f"{saved.get('run_key')}; this run has {self.run_key}: the data position "
                                      "would not match")

        try:
            if self.cfg.fsdp:
                saved, rng = fsdp.load_checkpoint(path, self.model, self.optimizer, self.ctx, check=fits)
            elif fsdp.is_sharded_checkpoint(path):
                raise CheckpointError(f"checkpoint {path} was written with fsdp: true (sharded); resume it with "
                                      "fsdp: true (any world size)")
            else:
                saved, rng = load_checkpoint(path, self.model, self.optimizer, check=fits)
        except CheckpointError as e:
            raise TrainingError(str(e)) from None
        self.run_id = saved.get("run_id") or self.run_id
        self.scheduler.load_state_dict(saved["scheduler"])
        self.stream.load_state_dict(saved["data"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.state.update(saved["loop"])
        self.objective.load_state_dict(saved.get("objective"))
        set_rng_state(rng)
        self.say(f"resumed from {path} at step {self.state['global_step']}")
        return self.state["global_step"]

    # ----------------------------------------------------------------------- the loop

    def fit(self, on_step_end: Callable[[int, dict[str, Any]], None] | None = None) -> None:
        """Optimizer steps until ``max_steps`` (or the epochs) are done, early stopping, or Ctrl-C."""
        cfg = self.cfg
        self.bar = tqdm(total=self.steps, initial=self.state["global_step"], disable=self.quiet or not cfg.progress_bar,
                        desc=self.objective.name, unit="step", dynamic_ncols=True)
        self.model.train()
        latch = self.latch
        with latch:
            try:
                while self.state["global_step"] < self.steps:
                    rec = self.step()
                    step = self.state["global_step"]
                    if latch.stop:  # a second Ctrl-C came during the update: no eval, save and stop
                        raise KeyboardInterrupt
                    if self.eval_items and cfg.eval_steps and (step % cfg.eval_steps == 0 or step == self.steps):
                        self.last_eval = self.evaluate()
                        self._track_eval(self.last_eval)
                    if cfg.save_steps and step % cfg.save_steps == 0:
                        with latch.critical():
                            self.checkpoint()
                    if on_step_end is not None:
                        on_step_end(step, rec)
                    if dp.any_rank(latch.requested, self.ctx, self.device):
                        saved_now = self.state["last_checkpoint"] == str(self.out / f"checkpoint-{step}")
                        with latch.critical(reraise=False):
                            path = Path(self.state["last_checkpoint"]) if saved_now else self.checkpoint()
                        tqdm.write(f"interrupted at step {step}; checkpoint saved to {path} "
                                   f"(resume with resume_from_checkpoint={path})")
                        raise KeyboardInterrupt
                    if self.stopped_early:
                        break
            except KeyboardInterrupt:
                self.bar.close()
                if not self.in_update and self.state["last_checkpoint"] != str(self.out / f"checkpoint-{self.step_no}"):
                    # Interrupted while accumulating, evaluating or between steps: model and optimizer are at
                    # the last step boundary, whose RNG and data position were kept for this. A further
                    # Ctrl-C waits for the checkpoint.
                    with latch.critical(reraise=False):
                        path = self.checkpoint()
                    print(f"interrupted; checkpoint of step {self.step_no} saved to {path}", file=sys.stderr)
                elif self.in_update:  # outside the main thread nothing holds Ctrl-C back
                    print("interrupted inside the optimizer update: no checkpoint written (last good one: "
                          f"{self.state['last_checkpoint'] or 'none'})", file=sys.stderr)
                raise
        self.bar.close()

    @property
    def step_no(self) -> int:
        """Optimizer steps done."""
        return self.state["global_step"]

    def step(self) -> dict[str, Any]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; logs it and returns its record."""
        cfg, objective, ctx, device = self.cfg, self.objective, self.ctx, self.device
        G = cfg.gradient_accumulation_steps
        t0 = time.perf_counter()
        micro = objective.next_micro_batches(G, self.stream.next, self.model)  # an online objective generates here
        # The step's loss is normalized by the count (target tokens, pairs) of the global accumulated batch.
        n_here = sum(objective.count(b) for b, _ in micro)
        n_tok_here = sum(int(b["attention_mask"].sum()) for b, _ in micro)
        slots_here = sum(b["input_ids"].numel() for b, _ in micro)
        n, n_tok, slots = (int(v) for v in dp.all_reduce_sum([n_here, n_tok_here, slots_here], ctx, device).tolist())
        offloaded_before = self.offloader.bytes if self.offloader is not None else 0
        loss_sum, sums = 0.0, dict.fromkeys(objective.metric_keys, 0.0)
        for i, (batch, items) in enumerate(micro):
            batch = {k: v.to(device) for k, v in batch.items()}
            with dp.no_sync(self.runner, sync=i == G - 1):  # DDP all-reduces in the last micro-batch's backward
                with autocast(device, self.amp):
                    s, metric_sums = objective.loss(self.model, batch, self.runner)
                value = float(s.detach())  # the one host sync of the micro-batch's loss
                if not math.isfinite(value):
                    raise TrainingError(
                        f"non-finite loss ({value}) at step {self.step_no + 1}, micro-batch {i + 1}/{G} "
                        f"(examples {', '.join(e.source for e in items[:4])}{', ...' if len(items) > 4 else ''}); "
                        f"last good checkpoint: {self.state['last_checkpoint'] or 'none (set save_steps)'}")
                scaled = s / max(1, n) * ctx.world_size  # DDP averages over ranks: undo it
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += value
            for k, v in metric_sums.items():
                sums[k] += v
        totals = dp.all_reduce_sum([loss_sum, *sums.values()], ctx, device).tolist()
        loss_sum, sums = totals[0], dict(zip(sums, totals[1:]))

        # A second Ctrl-C waits for the update (never half a step); fit then saves this step and stops.
        with self.latch.critical(reraise=False):
            self.in_update = True
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = dp.clip_grad_norm_(self.params, cfg.max_grad_norm or float("inf"))  # over all shards
            if not math.isfinite(grad_norm) and self.scaler is None:
                raise TrainingError(f"non-finite gradient norm at step {self.step_no + 1} (loss was finite); last good "
                                    f"checkpoint: {self.state['last_checkpoint'] or 'none (set save_steps)'}")
            lr = self.optimizer.param_groups[0]["lr"]
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.in_update = False
            self.step_rng, self.step_data = rng_state(), self.stream.state_dict()  # the new step boundary
            self.step_objective = objective.state_dict()
            self.state["global_step"] += 1
            self.state["tokens_seen"] += n_tok

        step, dt = self.step_no, time.perf_counter() - t0
        self.last_loss = loss_sum / max(1, n)
        rec = {"step": step, "epoch": round(self.stream.epoch_progress, 4), "loss": self.last_loss, "lr": lr,
               "grad_norm": grad_norm, objective.count_key: n, "tokens_per_s": round(n_tok / dt, 1),
               **objective.metrics(sums), **objective.step_metrics()}
        if cfg.sample_packing:  # real tokens / token slots of the step's micro-batches (all ranks)
            rec["packing_efficiency"] = round(n_tok / max(1, slots), 4)
        if self.offloader is not None:  # this rank's bytes moved to host memory in the step's forwards
            rec["offloaded_mib"] = round((self.offloader.bytes - offloaded_before) / 2**20, 3)
        if step % cfg.logging_steps == 0 or step == self.steps:
            self.metrics.write(rec)
        self.bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tok / dt:.0f}", refresh=False)
        self.bar.update(1)
        return rec

    def evaluate(self) -> float:
        """The objective's loss and metrics over the eval items (each rank its share, sums all-reduced); logs
        them and returns the eval loss."""
        mine = dp.shard(self.eval_items, self.ctx)
        loss_sum, count, sums = self.objective.evaluate(self.model, mine, self.eval_batch_size, self.pad_id,
                                                        self.device, self.amp)
        if self.sharded:  # every forward of a sharded model is a collective: each rank runs as many
            self.objective.evaluate_placeholders(
                fsdp.eval_placeholders(len(self.eval_items), self.eval_batch_size, self.ctx), self.model,
                self.eval_items[0], self.eval_batch_size, self.pad_id, self.device, self.amp)
        totals = dp.all_reduce_sum([loss_sum, count, *sums.values()], self.ctx, self.device).tolist()
        loss = totals[0] / max(1, totals[1])
        means = self.objective.eval_metrics(dict(zip(sums, totals[2:])), totals[1])
        rec = {"step": self.step_no, "epoch": round(self.stream.epoch_progress, 4), "eval_loss": loss,
               **{f"eval_{k}": v for k, v in means.items()}}
        self.metrics.write(rec)
        self.say(f"step {self.step_no}: eval loss {loss:.4f}{self.objective.eval_note(rec)}")
        return loss

    def _track_eval(self, loss: float) -> None:
        """Best eval loss so far, and early stopping after ``early_stopping_patience`` evals without a better one."""
        best = self.state["best_eval_loss"]
        if best is None or loss < best:
            self.state["best_eval_loss"], self.state["evals_without_improvement"] = loss, 0
        else:
            self.state["evals_without_improvement"] += 1
        patience = self.cfg.early_stopping_patience
        if patience is not None and self.state["evals_without_improvement"] >= patience:
            self.stopped_early = True
            self.say(f"early stopping at step {self.step_no}: no better eval loss in {patience} evaluations "
                     f"(best {self.state['best_eval_loss']:.4f})")

    def checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` of the last step boundary (rank 0; the others only note it); prune old ones."""
        path = self.out / f"checkpoint-{self.step_no}"
        trainer_state = {"loop": {**self.state, "last_checkpoint": str(path)}, "scheduler": self.scheduler.state_dict(),
                         "data": self.step_data, "run_key": self.run_key,
                         "scaler": self.scaler.state_dict() if self.scaler is not None else None, "run_id": self.run_id,
                         "objective": self.step_objective}
        try:
            if self.cfg.fsdp:  # every rank writes its shards
                fsdp.save_checkpoint(path, self.model, self.optimizer, trainer_state, self.step_rng, self.ctx,
                                     self.save_adapter)
            elif self.ctx.is_main:
                save_checkpoint(path, self.model, self.optimizer, trainer_state, self.step_rng, self.save_adapter)
        except CheckpointError as e:
            raise TrainingError(str(e)) from e
        if self.ctx.is_main:
            prune_checkpoints(self.out, self.cfg.save_total_limit, self.run_id)
        self.state["last_checkpoint"] = str(path)
        return path

    # ----------------------------------------------------------------------- finish

    def finish(self) -> TrainResult:
        """An eval if the last step had none, then the adapter and loss.png (rank 0); every rank returns together."""
        if self.eval_items and self.last_eval is None:
            self.last_eval = self.evaluate()
        if self.cfg.fsdp:  # gathered: every rank takes part, rank 0 writes
            self.save_adapter(self.model, self.out)
        if self.ctx.is_main:
            if not self.cfg.fsdp:
                self.save_adapter(self.model, self.out)
            plot_losses(self.metrics.history, self.out / "loss.png")
        dp.barrier(self.ctx)  # every rank leaves together, once rank 0 has written
        self.say(f"done: {self.step_no} steps; adapter saved to {self.out}")
        return TrainResult(self.out, self.step_no, self.last_loss, self.last_eval, self.state["best_eval_loss"],
                           self.stopped_early, self.stats, self.metrics.history)


class _SigintLatch:
    """Ctrl-C during :meth:`Recipe.fit`. The first sets :attr:`requested` (the loop finishes the step, saves a
    checkpoint and stops); the second stops at once, except inside a :meth:`critical` section (the optimizer
    update, a checkpoint being written), where it is held until the section ends, so that a step is never left
    half applied nor a checkpoint half written. Outside the main thread it installs nothing."""

    def __init__(self) -> None:
        self.requested = False
        self.stop = False  # a second Ctrl-C arrived inside a critical section
        self._depth = 0
        self._previous: Any = None

    def __enter__(self) -> _SigintLatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            self.requested = True
            print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        elif self._depth:
            if not self.stop:
                print("\nCtrl-C: stopping as soon as this update or checkpoint is complete", file=sys.stderr,
                      flush=True)
            self.stop = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self, reraise: bool = True) -> Iterator[None]:
        """Hold a second Ctrl-C until the block ends; then (``reraise``) stop with KeyboardInterrupt."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if reraise and self.stop and not self._depth:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
