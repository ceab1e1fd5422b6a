"""Atomic, pickle-free training checkpoints.

A checkpoint directory ``checkpoint-<step>`` holds:

* ``trainable.safetensors``: every trainable parameter by name, bit-exact;
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's ``state_dict`` (tensors in the
  first file, the structure and plain values in the second);
* ``rng.safetensors``: torch CPU and CUDA generator states;
* ``trainer_state.json``: step, scheduler, data position, early-stopping state, the run's id, the
  time of the save, and the size and SHA-256 of every other file (written last);
* ``adapter/``: the adapter in PEFT format, for use without this trainer.

It is written into a temporary sibling directory ``.tmp-checkpoint-<step>-<pid>`` and renamed into
place (a checkpoint it replaces is moved to ``.old-checkpoint-<step>-<pid>`` for that moment), so a
crash or Ctrl-C never leaves a half-written ``checkpoint-<step>``. What a killed or failed save
leaves behind is cleaned up by the next save and at the start of a run
(:func:`clean_stale_saves`). Loading reads and checks every file before it changes anything, and
names the file or tensor that does not fit. Nothing is unpickled on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TRAINER_STATE = "trainer_state.json"
RESUME_FILES = ("trainable.safetensors", "optimizer.json", "optimizer.safetensors", "rng.json", "rng.safetensors")
FINAL_FILES = ("adapter_model.safetensors", "adapter_config.json")  # the adapter a finished run leaves
METRICS = "metrics.jsonl"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_STALE_RE = re.compile(r"^\.(tmp|old)-(checkpoint-\d+)-(\d+)$")
_T, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is damaged, or does not fit the model; names the file or tensor."""


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


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of one file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_manifest(d: Path) -> dict[str, dict[str, Any]]:
    """Every file under d but the trainer state: its size and SHA-256, by path relative to d."""
    return {str(f.relative_to(d)): {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(d.rglob("*")) if f.is_file() and f.name != TRAINER_STATE}


def _pid_alive(pid: int) -> bool:
    """True if another live process on this machine has this id (its save may be under way)."""
    if pid == os.getpid():
        return False  # our own leftover: this process saves one checkpoint at a time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def clean_stale_saves(output_dir: str | Path) -> list[str]:
    """Remove what killed or failed saves left in ``output_dir``; returns the names removed or restored.

    Only this module's temporary directories are touched (``.tmp-checkpoint-<step>-<pid>`` and
    ``.old-checkpoint-<step>-<pid>``), and only those of a process that is no longer running (or of
    this one). A save killed between its two renames left ``checkpoint-<step>`` missing: the
    complete new copy (``.tmp-``, fully written before the first rename) is moved into place,
    else the previous one (``.old-``) is moved back.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return []
    stale = []
    for d in out.iterdir():
        m = _STALE_RE.match(d.name)
        if m and d.is_dir() and not _pid_alive(int(m.group(3))):
            stale.append((m.group(1), m.group(2), m.group(3), d))
    done = []
    for kind, name, pid, d in sorted(stale, key=lambda x: x[0] != "old"):  # the .old- ones first
        final = out / name
        if kind == "old" and not final.exists():
            tmp = out / f".tmp-{name}-{pid}"
            os.replace(tmp if (tmp / TRAINER_STATE).is_file() else d, final)
            done.append(f"{name} (restored)")
        for leftover in (d, out / f".tmp-{name}-{pid}") if kind == "old" else (d,):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
                done.append(leftover.name)
    return done


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], rng: dict[str, Any],
                    save_adapter_fn: Callable[[torch.nn.Module, Path], None] | None = None) -> Path:
    """Write a checkpoint atomically (temp directory, then rename) and return its path.

    ``trainer_state`` is stored with ``saved_at_ns`` and the manifest of the other files added.
    Leftovers of earlier killed saves in the same directory are cleaned up first (:func:`clean_stale_saves`);
    a failed write (e.g. a full disk) removes its temporary directory and raises :class:`CheckpointError`.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_saves(final.parent)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        save_state(optimizer.state_dict(), tmp / "optimizer.json", tmp / "optimizer.safetensors")
        write_rng(tmp, rng)
        if save_adapter_fn is not None:
            save_adapter_fn(model, tmp / "adapter")
        write_trainer_state(tmp, trainer_state)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write checkpoint {final}: {e}") from e
        raise
    replace_dir(tmp, final)
    return final


def write_rng(d: Path, rng: dict[str, Any]) -> None:
    """The RNG state (:func:`rng_state`) as ``rng.json`` + ``rng.safetensors`` in the checkpoint folder d."""
    save_state(rng, d / "rng.json", d / "rng.safetensors")


def write_trainer_state(d: Path, trainer_state: dict[str, Any]) -> None:
    """``trainer_state.json`` in the checkpoint folder d, last: ``trainer_state`` with ``saved_at_ns`` and the
    manifest of every other file (:func:`file_manifest`) added."""
    state = {**trainer_state, "saved_at_ns": time.time_ns(), "files": file_manifest(d)}
    (d / TRAINER_STATE).write_text(json.dumps(flatten_state(state, {}), indent=1))


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder tmp at final, replacing what was there; final is never half-written."""
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def verify_files(ckpt: Path, names: Iterable[str], manifest: dict[str, Any]) -> None:
    """Each named file of the checkpoint exists and has the size and SHA-256 its manifest recorded."""
    for name in names:
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: {name} is missing")
        want = manifest.get(name)
        if want is not None and (f.stat().st_size != want["bytes"] or file_sha256(f) != want["sha256"]):
            raise CheckpointError(f"checkpoint {ckpt}: {name} is damaged ({f.stat().st_size} bytes; its size or "
                                  f"SHA-256 differs from what was written, {want['bytes']} bytes)")


def read_part(ckpt: Path, name: str, reader: Callable[[], Any]) -> Any:
    """reader(), with a missing or unreadable file reported as a CheckpointError naming it."""
    try:
        return reader()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt}: {name} is missing") from None
    except Exception as e:  # noqa: BLE001 - any parse error of a damaged file
        raise CheckpointError(f"checkpoint {ckpt}: {name} cannot be read ({type(e).__name__}: {e})") from None


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json``; missing, unreadable or not a JSON object: a CheckpointError."""
    state = read_part(ckpt, TRAINER_STATE, lambda: unflatten_state(json.loads((ckpt / TRAINER_STATE).read_text()), {}))
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {ckpt}: {TRAINER_STATE} is not a JSON object")
    return state


def read_rng(ckpt: Path) -> dict[str, Any]:
    """The RNG state :func:`write_rng` wrote; a missing or unreadable file is a CheckpointError naming it."""
    return read_part(ckpt, "rng.json / rng.safetensors",
                     lambda: load_state(ckpt / "rng.json", ckpt / "rng.safetensors"))


def lora_rank_of(name: str, shape: torch.Size) -> int | None:
    """The LoRA rank a lora_A / lora_B tensor of this shape has (None for other tensors)."""
    if "lora_A" in name and len(shape) == 2:
        return shape[0]
    if "lora_B" in name and len(shape) == 2:
        return shape[1]
    return None


def check_trainables(ckpt: Path, where: str, params: dict[str, torch.Tensor], saved: dict[str, torch.Size]) -> None:
    """The checkpoint's tensors (``saved``: name -> shape, read from ``where``) are the model's trainable
    parameters by name and shape; else a CheckpointError names the tensor (and both lora_r when the rank differs)."""
    missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or extra:
        raise CheckpointError(f"checkpoint {ckpt} does not match the model's trainable parameters: missing "
                              f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]} (was it "
                              "written with other lora_target_modules?)")
    for n, p in params.items():
        shape = saved[n]
        if shape != p.shape:
            r_ck, r_model = lora_rank_of(n, shape), lora_rank_of(n, p.shape)
            why = (f": the checkpoint was written with lora_r {r_ck}, this run has lora_r {r_model}"
                   if r_ck is not None and r_ck != r_model else "")
            raise CheckpointError(f"checkpoint {ckpt}: {where}: tensor {n!r} is {list(shape)} but {list(p.shape)} in "
                                  f"this model{why}; resume with the settings it was written with")


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    check: Callable[[dict[str, Any]], None] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore trainable parameters and optimizer state in place; return (trainer_state, rng state).

    Every file is read and checked first (its size and SHA-256 against the manifest written with it,
    then its contents), then ``check(trainer_state)`` runs (it may raise), then every tensor's name and
    shape is compared with the model's; only then are the optimizer and the parameters changed.

    Raises:
        CheckpointError: a missing or damaged file (named), a tensor that does not fit the model (named,
            with the ``lora_r`` of checkpoint and model when the rank differs), or an optimizer state that
            does not fit the optimizer.
    """
    ckpt = Path(path)
    trainer_state = read_trainer_state(ckpt)
    manifest = trainer_state.get("files") or {}
    verify_files(ckpt, RESUME_FILES, manifest)
    saved = read_part(ckpt, "trainable.safetensors", lambda: load_file(str(ckpt / "trainable.safetensors")))
    opt_state = read_part(ckpt, "optimizer.json / optimizer.safetensors",
                          lambda: load_state(ckpt / "optimizer.json", ckpt / "optimizer.safetensors"))
    rng = read_rng(ckpt)
    if check is not None:
        check(trainer_state)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_trainables(ckpt, "trainable.safetensors", params, {n: t.shape for n, t in saved.items()})
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: optimizer.json / optimizer.safetensors do not fit this "
                              f"optimizer ({e}); resume with the optimizer it was written with") from None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    return trainer_state, rng


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-<step>`` directory in ``output_dir``, by step."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint (with its trainer_state.json) of the highest step in ``output_dir``, or None."""
    done = [p for _, p in checkpoints(output_dir) if (p / TRAINER_STATE).is_file()]
    return done[-1] if done else None


def run_outputs(output_dir: str | Path) -> list[str]:
    """Names of the results of a run in ``output_dir``: the final adapter, a non-empty metrics.jsonl and
    the checkpoints (a config.yaml or an empty metrics.jsonl alone is not a result)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [n for n in FINAL_FILES if (out / n).is_file()]
    if (out / METRICS).is_file() and (out / METRICS).stat().st_size > 0:
        found.append(METRICS)
    return found + [p.name for _, p in checkpoints(out)]


def remove_run_outputs(output_dir: str | Path) -> list[str]:
    """Delete what a run writes into ``output_dir`` (adapter, metrics.jsonl, loss.png, config.yaml,
    checkpoints); other files stay. Returns the names deleted."""
    out = Path(output_dir)
    gone = []
    for n in (*FINAL_FILES, METRICS, "loss.png", "config.yaml"):
        if (out / n).is_file():
            (out / n).unlink()
            gone.append(n)
    for _, p in checkpoints(out):
        shutil.rmtree(p)
        gone.append(p.name)
    return gone


def prune_checkpoints(output_dir: str | Path, keep: int | None, run_id: str | None) -> list[str]:
    """Delete all but the ``keep`` newest checkpoints of run ``run_id`` in ``output_dir``; returns their names.

    Only checkpoints whose trainer_state.json names this ``run_id`` are considered (never another run's,
    nor one without an id); the newest are the last saved (``saved_at_ns``), then the highest step.
    """
    if keep is None or run_id is None:
        return []
    mine = []
    for step, p in checkpoints(output_dir):
        try:
            state = json.loads((p / TRAINER_STATE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("run_id") == run_id:
            mine.append((state.get("saved_at_ns") or 0, step, p))
    gone = []
    for _, _, p in sorted(mine)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p.name)
    return gone
