"""FSDP2 for the trainer: ``fsdp: true`` under ``torchrun`` shards the 4-bit model across the ranks.

Built on torch's own FSDP2 (``torch.distributed.fsdp.fully_shard`` over a 1-D ``DeviceMesh``; parameters become
``DTensor`` shards on dim 0) and ``torch.distributed.checkpoint``; nothing here moves tensors between ranks by
itself.

* **Units.** Each transformer block is one FSDP unit (its class: ``fsdp_config.transformer_layer_cls_to_wrap``,
  default the model's ``_no_split_modules``); the decoder (final norm, rotary buffers) is the root unit, which
  every forward of the trainer goes through (training, eval, DPO's reference pass, GRPO's rollouts). The input
  embedding and the output projection are units of their own, sharded by rows (:func:`vocabulary_units`), with
  ``reshard_after_forward`` so that each is gathered only for its own forward (FSDP2 keeps a root's parameters
  gathered from its forward to the end of its backward). The loss never gathers the output projection: it runs
  vocabulary-parallel on each rank's rows (:mod:`.loss`). Tied to the input embedding (one weight) or not an
  ``nn.Linear``, the output projection stays whole on every rank. A module the objective trains whole (a reward
  model's ``score`` head, its ``modules_to_save``) is a unit of its own beside the decoder, its gradient
  reduce-scattered like the adapters'.
* **Forwards in step.** Each forward of a unit is a collective, so every rank runs as many: a rank with fewer
  eval items runs placeholder batches (:meth:`.objectives.base.Objective.evaluate_placeholders`); GRPO's
  rollouts keep the ranks' decode steps in step (:func:`qlora_kernels.generation.generate` on a sharded model).
* **The NF4 tensors** (packed codes, absmax codes, code table, nested absmax, nested code table) of every
  ``NF4Linear`` / ``NF4Experts`` become frozen parameters (:func:`qlora_kernels.nn.nf4_storage.hold_nf4_as_parameters`),
  so ``fully_shard`` shards them with the rest of the block: each rank keeps 1/N of every tensor (dim 0, padded
  to equal shards), a unit's forward all-gathers them (one collective per unit: uint8 and float tensors of mixed
  dtypes go as bytes) and frees them after (``reshard_after_forward``), its backward gathers them again. The LoRA
  adapters are sharded the same way; their gradients are reduce-scattered (averaged over ranks: the loop's
  ``world_size / global count`` scaling then gives the global-batch mean, as under DDP), and with gradient
  accumulation only the last micro-batch communicates (``set_requires_gradient_sync``).
* **Loading** (:func:`build_model`): :func:`qlora_kernels.load_4bit_model` with a
  :class:`~qlora_kernels.hf.loading.BlockHook` reads the checkpoint block by block; as soon as a block is
  complete it gets its adapters (the same seeded draws, in the same order, as ``apply_qlora`` on the whole
  model), its fused MLPs (``fused_mlp``), its NF4 tensors as parameters, and ``fully_shard``; so each rank holds
  its shards of the blocks before plus one whole block, never the whole 4-bit model. bitsandbytes-4bit and float
  checkpoints alike (a float one is quantized layer by layer inside the block). From a float checkpoint each rank
  reads and quantizes only the rows behind its shards of the blocks' linear weights (``fsdp_config.read_in_part``,
  :mod:`.nf4_shards`: the same NF4 bytes as quantizing them whole, about 1/N of the reading); then the block it
  holds while loading is its shards of it too. So it does for a 4-bit checkpoint's packed codes and for the rows
  of the input embedding and the output projection.
* **The optimizer** runs on the shards: torch's AdamW on DTensors, :class:`qlora_kernels.PagedAdamW` on their
  local shards (fp32 or 8-bit states of 1/N of each adapter). Gradient clipping uses the norm over all shards
  (:func:`.distributed.clip_grad_norm_`).
* **Checkpoints** (:func:`save_checkpoint`, :func:`load_checkpoint`): the trainable parameters and the optimizer
  state go through ``torch.distributed.checkpoint`` with its safetensors storage (each rank writes its shards to
  ``sharded/shard-0000<r+1>-model-00001-of-00001.safetensors``, the sharding in each file's JSON header: no pickle
  anywhere); rank 0 writes the rest as :mod:`.checkpoint` does (trainer_state.json with the manifest, rng,
  optimizer.json) and the adapter, gathered, in PEFT's format. Resuming reshards: the same world size continues the
  run exactly; another one continues it as long as ``micro_batch_size x world_size`` (the global micro-batch, which
  fixes the data order) is unchanged, else the resume is refused naming both.
* **One process** (world size 1): FSDP is a no-op; the run trains as without it, and still writes (and reads) the
  sharded checkpoint format, so a run can move between world sizes. With ``fsdp_config.shard_one_process`` the
  process joins a group of one instead and shards over it (the path N ranks run, e.g. to check it on one GPU).
* **Memory** (:func:`memory_plan`): the weights and adapter state each rank holds, from a model's shapes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qlora_kernels import apply_qlora
from qlora_kernels.hf.apply import train_whole
from qlora_kernels.hf.layers import linear_modules, matches, output_embedding_names
from qlora_kernels.hf.loading import BlockHook
from qlora_kernels.nn.fused_mlp import fuse_qlora_mlps
from qlora_kernels.nn.nf4_storage import NF4TensorHolder, hold_nf4_as_parameters, resident_nf4_bytes

from . import distributed as dp
from .checkpoint import (
    CheckpointError,
    check_trainables,
    clean_stale_saves,
    flatten_state,
    read_part,
    read_rng,
    read_trainer_state,
    replace_dir,
    unflatten_state,
    verify_files,
    write_rng,
    write_trainer_state,
)
from .components import TrainingError, load_base_model, lora_kwargs
from .components import build_model as build_whole_model
from .config import ConfigError, TrainConfig
from .loss import is_plain_linear
from .nf4_shards import ShardedQuantizer
from .objectives import objective_class

SHARDED_DIR = "sharded"  # the torch.distributed.checkpoint files of a checkpoint
FSDP_REPORT = "fsdp.json"  # in output_dir: how the model was sharded, and the NF4 bytes each rank holds
_DCP = "__dcp__"  # optimizer.json: a tensor stored in the sharded files under this key


def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


# --------------------------------------------------------------------------- finding the blocks


def block_classes(model: nn.Module, requested: str | list[str] | None) -> tuple[list[str], str]:
    """The class names whose modules are the FSDP units, and where they came from (for messages)."""
    if requested:
        return ([requested] if isinstance(requested, str) else list(requested),
                "fsdp_config.transformer_layer_cls_to_wrap")
    return list(getattr(model, "_no_split_modules", None) or []), f"{type(model).__name__}._no_split_modules"


def find_blocks(model: nn.Module, requested: str | list[str] | None = None) -> list[str]:
    """The names of ``model``'s transformer blocks (modules of :func:`block_classes`, none inside another), in order.

    Raises:
        ConfigError: none found: names the classes looked for and where they came from, the model's repeated
            module classes (the likely blocks), and the key to set.
    """
    classes, source = block_classes(model, requested)
    found: list[str] = []
    for name, module in model.named_modules():
        if name and type(module).__name__ in classes and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    if found:
        return found
    repeated = Counter(type(m).__name__ for m in _list_children(model))
    likely = ", ".join(f"{c} ({n}x)" for c, n in repeated.most_common(4)) or "none"
    looked = f"{classes} ({source})" if classes else f"nothing ({source} is not set)"
    raise ConfigError(
        f"fsdp: no transformer block found in {type(model).__name__}: looked for modules of class {looked}; the "
        f"classes repeated in its module lists: {likely}. Name the block class with fsdp_config."
        "transformer_layer_cls_to_wrap (Axolotl's fsdp_transformer_layer_cls_to_wrap), e.g. "
        f"fsdp_config: {{transformer_layer_cls_to_wrap: {repeated.most_common(1)[0][0] if repeated else 'MyBlock'}}}")


def _list_children(model: nn.Module) -> Iterator[nn.Module]:
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            yield from m


def check_unit_dtypes(name: str, unit: nn.Module) -> None:
    """FSDP2 reduce-scatters the gradients of a unit in one dtype: its trainable parameters must share one.

    Raises:
        TrainingError: naming the unit, the dtypes and parameters of each, and what to do (before any step).
    """
    by_dtype: dict[torch.dtype, list[str]] = {}
    for pname, p in unit.named_parameters():
        if p.requires_grad:
            by_dtype.setdefault(p.dtype, []).append(pname)
    if len(by_dtype) > 1:
        shown = "; ".join(f"{str(d).removeprefix('torch.')}: {', '.join(n[:2])}{' ...' if len(n) > 2 else ''}"
                          for d, n in by_dtype.items())
        raise TrainingError(
            f"fsdp: the trainable parameters of {name} have {len(by_dtype)} dtypes ({shown}); FSDP2 reduce-scatters a "
            "unit's gradients in one dtype and cannot train these together. Keep every adapter in one dtype (the "
            "trainer's are fp32), or train without fsdp")


# --------------------------------------------------------------------------- building the sharded model


@dataclass
class ShardReport:
    """What :func:`build_model` sharded and what each part cost this rank (NF4 bytes)."""

    blocks: list[str] = field(default_factory=list)
    block_class: list[str] = field(default_factory=list)
    nf4_model_bytes: int = 0  # the model's NF4 tensors, whole (measured block by block before sharding)
    nf4_resident_bytes: int = 0  # this rank's, once loaded
    load_peak_nf4_bytes: int = 0  # this rank's largest NF4 bytes while loading: the shards so far + one block
    # (+ its part of one block where the block's weights were read 1/N)
    largest_block_nf4_bytes: int = 0
    fused_mlps: int = 0
    vocabulary_units: list[str] = field(default_factory=list)  # the embedding / output projection, sharded by rows
    layers_read_in_part: int = 0  # modules whose weights this rank read 1/N (nf4_shards)
    weight_bytes_read: int = 0  # checkpoint bytes of those weights this rank read
    weight_bytes_whole: int = 0  # what reading them whole would have read


class _BlockSharder:
    """The :class:`~qlora_kernels.hf.loading.BlockHook` of the trainer: adapters, fused MLPs, NF4 as parameters,
    ``fully_shard``, block by block; then the rest of the model (:meth:`finish`)."""

    def __init__(self, cfg: TrainConfig, mesh: Any, add_lora: bool, quantizer: ShardedQuantizer | None = None) -> None:
        self.cfg, self.mesh, self.add_lora, self.quantizer = cfg, mesh, add_lora, quantizer
        self.report = ShardReport()
        self.sharded_bytes = 0  # this rank's NF4 bytes of the blocks done

    def find(self, model: nn.Module) -> list[str]:
        blocks = find_blocks(model, self.cfg.fsdp_config.transformer_layer_cls_to_wrap)
        if self.quantizer is not None:  # the input embedding and output projection: units of their own, read by rows
            for name, module in vocabulary_units(model):
                self.quantizer.dense_rows.update(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))
        self.report.blocks = blocks
        self.report.block_class = sorted({type(model.get_submodule(b)).__name__ for b in blocks})
        return blocks

    def done(self, name: str, block: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        cfg = self.cfg
        if self.add_lora:
            targets = [rel for rel, _, _ in linear_modules(block)
                       if cfg.lora_target_modules == "all-linear" or matches(f"{name}.{rel}", cfg.lora_target_modules)]
            if targets:  # exactly the layers apply_qlora on the whole model would adapt, in the same order
                apply_qlora(block, target_modules=targets, **lora_kwargs(cfg))
            else:
                for p in block.parameters():
                    p.requires_grad_(False)
        if cfg.fused_mlp:
            self.report.fused_mlps += fuse_qlora_mlps(block)
        hold_nf4_as_parameters(block)
        check_unit_dtypes(name, block)
        whole = resident_nf4_bytes(block)
        # of which placeholders: layers quantized 1/N, whose whole tensors are address space, never filled
        placeholders = self.quantizer.placeholder_bytes(name, block) if self.quantizer is not None else 0
        self.report.nf4_model_bytes += whole
        self.report.largest_block_nf4_bytes = max(self.report.largest_block_nf4_bytes, whole)
        fully_shard(block, mesh=self.mesh, reshard_after_forward=cfg.fsdp_config.reshard_after_forward)
        if self.quantizer is not None:
            self.report.layers_read_in_part += self.quantizer.install(name, block)
        shard = resident_nf4_bytes(block)
        self.report.load_peak_nf4_bytes = max(self.report.load_peak_nf4_bytes,
                                              self.sharded_bytes + max(shard, whole - placeholders))
        self.sharded_bytes += shard

    def finish(self, model: nn.Module) -> None:
        """After the last block: no adapters outside the blocks, everything else frozen, the decoder the root
        unit (the output projection left whole)."""
        from torch.distributed.fsdp import fully_shard

        blocks = self.report.blocks
        inside = tuple(f"{b}." for b in blocks)
        outside = [n for n, _, _ in linear_modules(model) if n not in blocks and not n.startswith(inside)]
        spec = self.cfg.lora_target_modules
        wanted = [n for n in outside if (n not in output_embedding_names(model) if spec == "all-linear"
                                         else matches(n, spec))]
        if self.add_lora and wanted:
            raise ConfigError(f"fsdp: lora_target_modules selects layers outside the transformer blocks "
                              f"({wanted[:3]}), which fsdp does not shard or train; target layers inside the blocks")
        if self.add_lora:  # as apply_qlora on the whole model: everything but the adapters (and heads) frozen
            for n, p in model.named_parameters():
                if not n.startswith(inside):
                    p.requires_grad_(False)
            train_whole(model, objective_class(self.cfg.objective).modules_to_save or None)
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        names = {id(m): n for n, m in model.named_modules()}
        root = names.get(id(decoder)) if decoder is not None else None
        if root is None or any(not b.startswith(f"{root}.") for b in blocks):
            raise ConfigError(f"fsdp: the transformer blocks of {type(model).__name__} ({blocks[:2]}) must lie inside "
                              "its decoder (get_decoder()), which every forward of the trainer goes through")
        # modules trained whole (a reward model's score head) are units of their own, outside the decoder
        heads = list(getattr(model, "qlora_modules_to_save", ()))
        inside_decoder = [h for h in heads if h.startswith(f"{root}.")]
        if inside_decoder:
            raise ConfigError(f"fsdp: modules trained whole inside the decoder ({inside_decoder[:3]}) are not sharded; "
                              "fsdp trains adapters inside the blocks and heads outside the decoder")
        trainable = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(inside)
                     and not any(n.startswith(f"{h}.") for h in heads)]
        if trainable:
            raise TrainingError(f"fsdp: parameters outside the transformer blocks train ({trainable[:3]}); fsdp trains "
                                "adapters inside the blocks (and the objective's heads, e.g. a reward model's score) "
                                "only")
        for h in heads:
            fully_shard(model.get_submodule(h), mesh=self.mesh)
        hold_nf4_as_parameters(decoder)  # (NF4 layers outside the blocks, if any, are sharded with the root)
        self.report.nf4_model_bytes += sum(resident_nf4_bytes(m) for m in _outside(model, blocks))  # whole, still
        # the input embedding and the output projection: units of their own, gathered only for their own forward
        # (the root keeps its parameters gathered from its forward to the end of the backward); the loss never
        # gathers the output projection (vocabulary-parallel, .loss)
        units = vocabulary_units(model)
        for _, unit in units:
            fully_shard(unit, mesh=self.mesh, reshard_after_forward=True)
        self.report.vocabulary_units = [n for n, _ in units]
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        whole = set(head.parameters()) if head is not None and all(head is not u for _, u in units) else set()
        fully_shard(decoder, mesh=self.mesh, ignored_params=whole or None)  # (a head left whole: tied, quantized)
        if self.quantizer is not None:  # the input embedding and output projection read by rows
            for name, unit in units:
                if not name.startswith(f"{root}."):
                    self.report.layers_read_in_part += self.quantizer.install(name, unit)
            self.report.layers_read_in_part += self.quantizer.install(root, decoder)
        self.report.nf4_resident_bytes = resident_nf4_bytes(model)
        self.report.load_peak_nf4_bytes = max(self.report.load_peak_nf4_bytes, self.report.nf4_resident_bytes)


def vocabulary_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the input embedding (inside the decoder) and the output projection (a plain ``nn.Linear``)
    that FSDP2 shards by rows as units of their own; none when the two are tied (one weight, kept whole on every rank
    by the root unit), the output projection alone when it is another module (a quantized one stays whole)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and head is not None and getattr(head, "weight", None) is emb.weight:
        return []
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    names = {id(m): n for n, m in model.named_modules()}
    root = names.get(id(decoder)) if decoder is not None else None
    units = []
    if emb is not None and root is not None and names.get(id(emb), "").startswith(f"{root}."):
        units.append((names[id(emb)], emb))
    if head is not None and id(head) in names and is_plain_linear(head) and \
            names[id(head)] not in getattr(model, "qlora_modules_to_save", ()):
        units.append((names[id(head)], head))
    return units


def _vocabulary_note(model: nn.Module, units: list[str]) -> str:
    """The run note's words on the input embedding and the output projection (:func:`vocabulary_units`)."""
    note = f"; sharded by rows as units of their own: {', '.join(units)}" if units else ""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or any(model.get_submodule(n) is head for n in units):
        return note + (" (the loss runs vocabulary-parallel)" if head is not None else "")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    why = "tied to the input embedding" if emb is not None and getattr(head, "weight", None) is emb.weight else \
        f"a {type(head).__name__}, not an nn.Linear"
    return note + f"; the output projection stays whole on every rank ({why})"


def _outside(model: nn.Module, blocks: list[str]) -> list[nn.Module]:
    """The direct modules holding NF4 tensors outside the blocks (their bytes are not in the blocks' count)."""
    inside = tuple(f"{b}." for b in blocks)
    return [m for n, m in model.named_modules() if isinstance(m, NF4TensorHolder) and not n.startswith(inside)]


def build_model(cfg: TrainConfig, device: torch.device, ctx: dp.DistContext,
                model: nn.Module | None = None) -> tuple[nn.Module, ShardReport | None, list[str]]:
    """The QLoRA model of ``cfg`` sharded with FSDP2 over the ranks of ``ctx``: ``(model, report, notes)``.

    Without ``model``, ``base_model`` is loaded block by block and each block sharded as soon as it is complete
    (see the module docstring); a given ``model`` (adapters already on) is sharded in place. With one process
    FSDP is a no-op: the model is built as without ``fsdp`` and the report is None.
    """
    if not ctx.enabled:
        built = model if model is not None else build_whole_model(cfg, device)
        find_blocks(built, cfg.fsdp_config.transformer_layer_cls_to_wrap)  # the units it would shard on N ranks
        return built, None, ["fsdp: one process, so FSDP is a no-op (nothing to shard): the run trains as without it "
                             "and writes its checkpoints in the sharded format, which any world size resumes"]
    from torch.distributed.device_mesh import init_device_mesh

    if ctx.backend == "gloo" and device.type == "cuda":
        raise TrainingError("fsdp on CUDA devices needs the nccl backend")
    mesh = init_device_mesh(device.type, (ctx.world_size,))
    quantizer = None
    if model is None and cfg.fsdp_config.read_in_part:
        quantizer = ShardedQuantizer(ctx.rank, ctx.world_size, lambda t, sizes: dp.all_gather_cat(t, sizes, ctx))
    sharder = _BlockSharder(cfg, mesh, add_lora=model is None, quantizer=quantizer)
    if model is None:
        model = load_base_model(cfg, device, block_hook=BlockHook(sharder.find, sharder.done, quantizer=quantizer))
    else:
        for name in sharder.find(model):
            sharder.done(name, model.get_submodule(name))
    sharder.finish(model)
    r = sharder.report
    if quantizer is not None:
        quantizer.check_done()
        r.weight_bytes_read, r.weight_bytes_whole = quantizer.bytes_read, quantizer.bytes_whole
    per_rank = dp.all_reduce_sum([r.nf4_resident_bytes if i == ctx.rank else 0 for i in range(ctx.world_size)],
                                 ctx, device).tolist()
    peaks = dp.all_reduce_sum([r.load_peak_nf4_bytes if i == ctx.rank else 0 for i in range(ctx.world_size)],
                              ctx, device).tolist()
    read = dp.all_reduce_sum([r.weight_bytes_read if i == ctx.rank else 0 for i in range(ctx.world_size)],
                             ctx, device).tolist()
    mib = 2**20
    heads = list(getattr(model, "qlora_modules_to_save", ()))
    notes = [f"fsdp: {len(r.blocks)} blocks ({', '.join(r.block_class)}) sharded over {ctx.world_size} ranks as they "
             f"loaded (FSDP2, reshard_after_forward {cfg.fsdp_config.reshard_after_forward})"
             + _vocabulary_note(model, r.vocabulary_units)
             + (f"; trained whole and sharded as units of their own: {', '.join(heads)}" if heads else ""),
             f"fsdp: NF4 tensors {r.nf4_model_bytes / mib:.2f} MiB in all; per rank "
             f"{', '.join(f'{b / mib:.2f}' for b in per_rank)} MiB (peak while loading "
             f"{', '.join(f'{b / mib:.2f}' for b in peaks)} MiB: the shards so far + "
             + ("this rank's part of one block" if r.layers_read_in_part else "one block")
             + f" of at most {r.largest_block_nf4_bytes / mib:.2f} MiB)"]
    if r.layers_read_in_part:
        notes.append(f"fsdp: {r.layers_read_in_part} modules' weights read 1/N (float ones quantized from their "
                     f"parts): per rank {', '.join(f'{b / mib:.2f}' for b in read)} MiB read of their "
                     f"{r.weight_bytes_whole / mib:.2f} MiB (each rank the bytes behind its shards)")
    if cfg.fused_mlp:
        notes.append(f"fused_mlp: {r.fused_mlps} MLPs run as one fused QLoRA Function")
    if ctx.is_main:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / FSDP_REPORT).write_text(json.dumps({
            "world_size": ctx.world_size, "blocks": r.blocks, "block_class": r.block_class,
            "reshard_after_forward": cfg.fsdp_config.reshard_after_forward, "nf4_model_bytes": r.nf4_model_bytes,
            "largest_block_nf4_bytes": r.largest_block_nf4_bytes, "nf4_resident_bytes_per_rank": [int(b) for b in
                                                                                                   per_rank],
            "load_peak_nf4_bytes_per_rank": [int(b) for b in peaks], "vocabulary_units": r.vocabulary_units,
            "layers_read_in_part": r.layers_read_in_part,
            "weight_bytes_whole": r.weight_bytes_whole, "weight_bytes_read_per_rank": [int(b) for b in read]},
            indent=1) + "\n")
    return model, r, notes


# --------------------------------------------------------------------------- forwards every rank runs alike


def eval_placeholders(n_items: int, batch_size: int, ctx: dp.DistContext) -> int:
    """How many extra (empty) eval batches this rank runs so that every rank runs as many forwards as the rank with
    the most eval items (each forward of a sharded model is a collective)."""
    lo, hi = dp.shard_bounds(n_items, ctx.rank, ctx.world_size)
    most = dp.shard_bounds(n_items, 0, ctx.world_size)  # rank 0's share is the largest
    return math.ceil((most[1] - most[0]) / batch_size) - math.ceil((hi - lo) / batch_size)


def check_setup_forwards(objective: Any, n_train: int, n_eval: int, batch_size: int, ctx: dp.DistContext) -> None:
    """DPO's ``precompute_ref_log_probs`` runs each rank's share of the pairs in batches of ``batch_size``; under FSDP
    every forward is a collective, so every rank must run as many.

    Raises:
        ConfigError: the shares give unequal batch counts (naming them and what to set).
    """
    if not getattr(objective, "precompute_ref_log_probs", False):
        return
    for what, n in (("train", n_train), ("eval", n_eval)):
        shares = [hi - lo for lo, hi in (dp.shard_bounds(n, r, ctx.world_size) for r in range(ctx.world_size))]
        batches = [math.ceil(k / batch_size) for k in shares]
        if len(set(batches)) > 1:
            raise ConfigError(
                f"precompute_ref_log_probs with fsdp: the {n} {what} pairs split over {ctx.world_size} ranks as "
                f"{shares} make {batches} batches of eval_batch_size {batch_size}, and every forward of a sharded "
                "model is a collective that each rank must run as often: choose eval_batch_size (or the number of "
                "pairs) so that the counts match, or set precompute_ref_log_probs: false")


# --------------------------------------------------------------------------- memory per rank


@dataclass(frozen=True)
class MemoryPlan:
    """Weights and adapter state of a QLoRA model per rank, in bytes, counted from its shapes (:func:`memory_plan`);
    activations, the allocator's slack and the CUDA context come on top."""

    world_size: int
    nf4_bytes: int  # the 4-bit linear layers and experts, whole (NF4 with its constants)
    dense_bytes: int  # every other tensor but the output projection (embeddings, norms, routers, biases)
    head_bytes: int  # the output projection
    lora_bytes: int  # the adapters with their gradients and optimizer states
    largest_block_bytes: int  # one block's tensors, gathered whole for its forward and its backward
    head_sharded: bool = True  # the output projection sharded by rows (a unit of its own), else whole on every rank
    embedding_bytes: int = 0  # the input embedding when it is a unit of its own: gathered whole for its forward only

    @property
    def ddp_bytes(self) -> int:
        """Every rank holds everything."""
        return self.nf4_bytes + self.dense_bytes + self.head_bytes + self.lora_bytes

    @property
    def shard_bytes(self) -> int:
        """What a rank holds between units' forwards: 1/N of everything, but an output projection left whole."""
        shared = self.nf4_bytes + self.dense_bytes + self.lora_bytes + (self.head_bytes if self.head_sharded else 0)
        return -(-shared // self.world_size) + (0 if self.head_sharded else self.head_bytes)

    @property
    def fsdp_bytes(self) -> int:
        """At the activations' peak (the end of the forward, the backward): the shards plus two gathered blocks (the
        one computing and the one FSDP2 prefetches)."""
        return self.shard_bytes + 2 * self.largest_block_bytes

    @property
    def forward_start_bytes(self) -> int:
        """At the start of each forward, before any activation: the shards plus the input embedding gathered whole
        (the rest of it beyond this rank's shard) and the first block, prefetched."""
        rest = self.embedding_bytes - -(-self.embedding_bytes // self.world_size)
        return self.shard_bytes + rest + self.largest_block_bytes


def memory_plan(model: nn.Module, world_size: int, r: int = 16, blocksize: int = 64, double_quant: bool = True,
                dense_bytes_per_element: int = 2, state_bytes_per_parameter: int = 16) -> MemoryPlan:
    """What :func:`build_model` puts on each of ``world_size`` ranks for ``model`` (its shapes only: a model on the
    meta device will do), with LoRA of rank ``r`` on every linear layer but the output projection (``all-linear``).

    The rules are the trainer's: linear layers and fused experts in NF4 (:func:`qlora_kernels.nf4.nf4_nbytes` of
    ``blocksize`` / ``double_quant``), the output projection and every other tensor dense at
    ``dense_bytes_per_element`` (bf16: 2), the adapters at ``state_bytes_per_parameter`` (fp32 weight, gradient and
    AdamW's two states: 16), the blocks of :func:`find_blocks` as the FSDP units, and the input embedding and output
    projection as units of their own unless tied (:func:`vocabulary_units`). FSDP2's padding of each tensor to equal
    shards (under a kilobyte a tensor) is left out.
    """
    from qlora_kernels.hf import experts as moe
    from qlora_kernels.nf4 import nf4_nbytes

    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1; got {world_size!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    outputs = set(output_embedding_names(model))
    quantized: dict[int, int] = {}  # id of a weight in NF4 -> its NF4 bytes
    lora = 0
    for name, module, kind in linear_modules(model):
        if kind not in ("linear", "conv1d") or name in outputs:
            continue
        w = module.weight
        quantized[id(w)] = nf4_nbytes(w.numel(), blocksize, double_quant)
        lora += r * sum(w.shape) * state_bytes_per_parameter
    for _, module in moe.experts_modules(model):
        for proj in moe.PROJECTIONS:
            w = getattr(module, proj)
            quantized[id(w)] = nf4_nbytes(w.numel(), blocksize, double_quant)

    def size(module: nn.Module) -> tuple[int, int]:  # (NF4 bytes, dense bytes) of its tensors but the head's
        nf4 = dense = 0
        seen: set[int] = set()
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) in seen or id(t) in head_params:
                continue
            seen.add(id(t))
            if id(t) in quantized:
                nf4 += quantized[id(t)]
            elif t.is_floating_point():
                dense += t.numel() * dense_bytes_per_element
        return nf4, dense

    nf4, dense = size(model)
    head_bytes = sum(p.numel() for p in head.parameters()) * dense_bytes_per_element if head is not None else 0
    largest = max((sum(size(model.get_submodule(b))) for b in find_blocks(model)), default=0)
    units = [m for _, m in vocabulary_units(model)]
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_bytes = sum(size(emb)) if emb is not None and any(emb is m for m in units) else 0
    return MemoryPlan(world_size, nf4, dense, head_bytes, lora, largest,
                      head_sharded=head is not None and any(head is m for m in units), embedding_bytes=emb_bytes)


# --------------------------------------------------------------------------- the adapter, gathered


@contextlib.contextmanager
def gathered_trainables(model: nn.Module, ctx: dp.DistContext) -> Iterator[bool]:
    """Every rank gathers the whole of each trainable (sharded) parameter; on rank 0 they stand in the model for the
    block (yields True there), so that code reading plain tensors (``save_adapter``, PEFT's save) sees them."""
    reshard_roots(model)
    entries, seen = [], set()
    for module in model.modules():
        for pname, p in module._parameters.items():
            if p is not None and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                entries.append((module, pname, p))
    whole = [p.detach().full_tensor() if is_dtensor(p) else p.detach() for _, _, p in entries]  # collective
    if not ctx.is_main:
        del whole
        yield False
        return
    try:
        for (module, pname, _), w in zip(entries, whole):
            module._parameters[pname] = nn.Parameter(w, requires_grad=True)
        yield True
    finally:
        for module, pname, p in entries:
            module._parameters[pname] = p


def adapter_saver(ctx: dp.DistContext, save: Callable[[nn.Module, Path], None]) -> Callable[[nn.Module, Path], None]:
    """``save(model, dir)`` of the adapter, gathered: call it on every rank; rank 0 writes PEFT's files."""

    def save_gathered(m: nn.Module, out_dir: Path) -> None:
        with gathered_trainables(m, ctx) as writer:
            if writer:
                save(m, out_dir)
        dp.barrier(ctx)

    return save_gathered


# --------------------------------------------------------------------------- sharded checkpoints


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` was written by :func:`save_checkpoint` (it has ``sharded/``)."""
    return (Path(path) / SHARDED_DIR).is_dir()


def reshard_roots(model: nn.Module) -> None:
    """Put the sharded parameters back into every root unit. FSDP2 keeps a root's parameters unsharded after its
    forward (they are needed again at once by the backward); after a no-grad forward (an evaluation) they stay so,
    and a unit that holds trainable parameters (a reward model's score head) would then show the optimizer other
    tensors than its own."""
    for unit in dp.root_units(model):
        unit.reshard()


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name of each optimizer index (the state dict's order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    except KeyError:
        raise CheckpointError("the optimizer holds a parameter that is not the model's") from None


def _state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors by key, optimizer.json)``: the trainable parameters (``model.<name>``) and every optimizer state
    tensor (``optim.<name>.<key>``), DTensors as they are; the optimizer's structure and plain values as JSON."""
    reshard_roots(model)
    tensors = {f"model.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = _names(model, optimizer)
    sd = optimizer.state_dict()
    state = {}
    for idx, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, Tensor):
                key = f"optim.{names[idx]}.{k}"
                tensors[key] = v.detach()
                entry[k] = {_DCP: key}
            else:
                entry[k] = v
        state[str(idx)] = entry
    return tensors, {"param_names": names, "state": state, "param_groups": flatten_state(sd["param_groups"], {})}


@contextlib.contextmanager
def _dcp_quiet(ctx: dp.DistContext) -> Iterator[None]:
    """One process: torch.distributed.checkpoint warns that it assumes one process; that is the intent here."""
    with warnings.catch_warnings():
        if not ctx.enabled:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rank0_pid(ctx: dp.DistContext) -> int:
    """Rank 0's process id, on every rank (the temporary directory's name, as :mod:`.checkpoint` names it)."""
    return int(dp.all_reduce_sum([os.getpid() if ctx.is_main else 0], ctx)[0])


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], rng: dict[str, Any], ctx: dp.DistContext,
                    save_adapter_fn: Callable[[nn.Module, Path], None] | None = None) -> Path:
    """Write a sharded checkpoint atomically; every rank calls it (see the module docstring for the layout).

    As :func:`.checkpoint.save_checkpoint`: a temporary sibling directory renamed into place by rank 0 once every
    rank has written; a failed write on any rank removes it and raises :class:`CheckpointError` on every rank.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    final = Path(path)
    tmp = final.parent / f".tmp-{final.name}-{_rank0_pid(ctx)}"
    if ctx.is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_saves(final.parent)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dp.barrier(ctx)
    error: BaseException | None = None
    try:
        tensors, optim_json = _state_tensors(model, optimizer)
        with _dcp_quiet(ctx):
            dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDED_DIR), save_distributed=True),
                     no_dist=not ctx.enabled)
        if save_adapter_fn is not None:
            save_adapter_fn(model, tmp / "adapter")  # every rank (gathers); rank 0 writes
        if ctx.is_main:
            (tmp / "optimizer.json").write_text(json.dumps(optim_json))
            write_rng(tmp, rng)
            sharded = {"world_size": ctx.world_size, "format": "torch.distributed.checkpoint, safetensors storage"}
            write_trainer_state(tmp, {**trainer_state, "sharded": sharded})
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        error = e
    if dp.any_rank(error is not None, ctx):
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            raise CheckpointError(f"cannot write checkpoint {final}: {error}") from error
        if error is not None:
            raise error
        raise CheckpointError(f"cannot write checkpoint {final}: another rank failed to write its part")
    if ctx.is_main:
        replace_dir(tmp, final)
    dp.barrier(ctx)
    return final


def _check_files(ckpt: Path, manifest: dict[str, Any]) -> None:
    required = ["optimizer.json", "rng.json", "rng.safetensors"]
    verify_files(ckpt, required + [n for n in manifest if n.startswith(f"{SHARDED_DIR}/")], manifest)
    if not any(n.startswith(f"{SHARDED_DIR}/") for n in manifest):
        raise CheckpointError(f"checkpoint {ckpt}: trainer_state.json lists no {SHARDED_DIR}/ files")


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: dp.DistContext,
                    check: Callable[[dict[str, Any]], None] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore trainable parameters and optimizer state from a sharded checkpoint (any world size wrote it: each
    rank reads its shards of the tensors, resharded by ``torch.distributed.checkpoint``); every rank calls it.
    Returns ``(trainer_state, rng state)``.

    Every file is checked first (size and SHA-256 against the manifest), then ``check(trainer_state)`` runs, then
    every tensor's name and shape is compared with the model's; only then do the optimizer and the parameters change.

    Raises:
        CheckpointError: a checkpoint written without fsdp, a missing or damaged file (named), a tensor that does not
            fit the model (named, with both lora_r when the rank differs), or an optimizer state that does not fit.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    ckpt = Path(path)
    trainer_state = read_trainer_state(ckpt)
    if "sharded" not in trainer_state or not is_sharded_checkpoint(ckpt):
        raise CheckpointError(f"checkpoint {ckpt} was written without fsdp (whole tensors, by one process or DDP); "
                              "resume it with fsdp: false")
    _check_files(ckpt, trainer_state.get("files") or {})
    optim_json = read_part(ckpt, "optimizer.json", lambda: json.loads((ckpt / "optimizer.json").read_text()))
    rng = read_rng(ckpt)
    if check is not None:
        check(trainer_state)
    reader = HuggingFaceStorageReader(str(ckpt / SHARDED_DIR))
    meta = read_part(ckpt, SHARDED_DIR, reader.read_metadata).state_dict_metadata
    reshard_roots(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k.removeprefix("model."): v for k, v in meta.items() if k.startswith("model.")}
    check_trainables(ckpt, f"{SHARDED_DIR}/", params, {n: torch.Size(v.size) for n, v in saved.items()})
    names = _names(model, optimizer)
    if optim_json.get("param_names") != names:
        raise CheckpointError(f"checkpoint {ckpt}: optimizer.json holds the states of other parameters (or in another "
                              "order) than this run's optimizer; resume with the settings it was written with")
    targets: dict[str, Tensor] = {f"model.{n}": torch.zeros_like(p.detach()) for n, p in params.items()}
    for idx, entry in optim_json["state"].items():
        p = params.get(names[int(idx)])
        for v in entry.values():
            if isinstance(v, dict) and _DCP in v:
                md = meta.get(v[_DCP])
                if md is None:
                    raise CheckpointError(f"checkpoint {ckpt}: {SHARDED_DIR}/ lacks the optimizer tensor {v[_DCP]!r}")
                dtype = md.properties.dtype
                if p is not None and is_dtensor(p) and torch.Size(md.size) == p.shape:
                    targets[v[_DCP]] = torch.zeros_like(p.detach(), dtype=dtype)  # this rank's shard of it
                else:
                    targets[v[_DCP]] = torch.zeros(md.size, dtype=dtype, device=local(p).device if p is not None
                                                   else "cpu")
    try:
        with _dcp_quiet(ctx):
            dcp.load(targets, storage_reader=reader, no_dist=not ctx.enabled)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: name the checkpoint
        raise CheckpointError(f"checkpoint {ckpt}: {SHARDED_DIR}/ cannot be read ({type(e).__name__}: {e})") from None
    state = {int(idx): {k: targets[v[_DCP]] if isinstance(v, dict) and _DCP in v else v for k, v in entry.items()}
             for idx, entry in optim_json["state"].items()}
    try:
        optimizer.load_state_dict({"state": state, "param_groups": unflatten_state(optim_json["param_groups"], {})})
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: optimizer.json / {SHARDED_DIR}/ do not fit this optimizer ({e}); "
                              "resume with the optimizer it was written with") from None
    with torch.no_grad():
        for n, p in params.items():
            local(p).copy_(local(targets[f"model.{n}"]))
    return trainer_state, rng


def run_key_problem(saved: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """Why a checkpoint's run key does not fit this run (None when it fits): everything equal, except that the world
    size and ``micro_batch_size`` may change together as long as the global micro-batch (their product, which fixes
    the data order) is the same."""
    if not isinstance(saved, dict):
        return f"its trainer_state.json has no run key ({saved!r})"

    def split(key: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
        rest = {k: v for k, v in key.items() if k not in ("world_size", "micro_batch_size")}
        return rest, int(key.get("world_size", 1)), int(key.get("micro_batch_size", 0))

    (rest_s, ws_s, mbs_s), (rest_c, ws_c, mbs_c) = split(saved), split(current)
    if rest_s != rest_c:
        return f"it was written by a run with {saved}; this run has {current}: the data position would not match"
    if ws_s * mbs_s != ws_c * mbs_c:
        return (f"it was written by {ws_s} processes x micro_batch_size {mbs_s} (a global micro-batch of "
                f"{ws_s * mbs_s}); this run is {ws_c} x {mbs_c} = {ws_c * mbs_c}: the data order would not match. "
                "Another world size resumes it when micro_batch_size x world_size stays "
                f"{ws_s * mbs_s}")
    return None
