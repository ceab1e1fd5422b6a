"""Atomic, pickle-free training checkpoints.

A checkpoint directory ``checkpoint-<step>`` holds:

* ``trainable.safetensors``: every trainable parameter by name, bit-exact;
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's ``state_dict`` (tensors in the
  first file, the structure and plain values in the second);
* ``rng.safetensors``: torch CPU and CUDA generator states;
* ``trainer_state.json``: step, scheduler, data position, Python ``random`` state, early-stopping
  state and the last metrics;
* ``adapter/``: the adapter in PEFT format, for use without this trainer.

It is written into a temporary sibling directory and renamed into place, so a crash or Ctrl-C
never leaves a half-written ``checkpoint-<step>``. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TRAINER_STATE = "trainer_state.json"
_T, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """JSON-able copy of a nested state (dicts, lists, tuples, numbers, strings, tensors).

    Tensors move into ``tensors`` (cloned, contiguous) and are replaced by ``{"__tensor__": key}``;
    tuples and dicts with non-string keys are tagged so that :func:`unflatten_state` rebuilds them.
    """
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {_T: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten_state(v, tensors, prefix) for k, v in obj.items()}
        return {_DICT: [[flatten_state(k, tensors, prefix), flatten_state(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [flatten_state(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint state")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(obj, dict):
        if _T in obj:
            return tensors[obj[_T]]
        if _TUPLE in obj:
            return tuple(unflatten_state(v, tensors) for v in obj[_TUPLE])
        if _DICT in obj:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in obj[_DICT]}
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def save_state(obj: Any, json_path: Path, tensor_path: Path) -> None:
    """Write a nested state as JSON plus a safetensors file of its tensors."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(obj, tensors)
    save_file(tensors, str(tensor_path))
    json_path.write_text(json.dumps(skeleton))


def load_state(json_path: Path, tensor_path: Path) -> Any:
    return unflatten_state(json.loads(json_path.read_text()), load_file(str(tensor_path)))


def rng_state() -> dict[str, Any]:
    """Torch (CPU and every CUDA device) and Python ``random`` generator states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that requires grad, by name (what a checkpoint must restore)."""
    return {n: p.detach().cpu().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], rng: dict[str, Any],
                    save_adapter_fn: Callable[[torch.nn.Module, Path], None] | None = None) -> Path:
    """Write a checkpoint atomically (temp directory, then rename) and return its path."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    save_state(optimizer.state_dict(), tmp / "optimizer.json", tmp / "optimizer.safetensors")
    save_state(rng, tmp / "rng.json", tmp / "rng.safetensors")
    if save_adapter_fn is not None:
        save_adapter_fn(model, tmp / "adapter")
    (tmp / TRAINER_STATE).write_text(json.dumps(flatten_state(trainer_state, {}), indent=1))
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[
        dict[str, Any], dict[str, Any]]:
    """Restore trainable parameters and optimizer state in place; return (trainer_state, rng state)."""
    ckpt = Path(path)
    saved = load_file(str(ckpt / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or extra:
        raise ValueError(f"checkpoint {ckpt} does not match the model's trainable parameters: missing "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    optimizer.load_state_dict(load_state(ckpt / "optimizer.json", ckpt / "optimizer.safetensors"))
    trainer_state = unflatten_state(json.loads((ckpt / TRAINER_STATE).read_text()), {})
    return trainer_state, load_state(ckpt / "rng.json", ckpt / "rng.safetensors")


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` ``checkpoint-<step>`` directories."""
    if keep is None:
        return
    ckpts = sorted((p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    for p in ckpts[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
