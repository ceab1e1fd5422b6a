"""What the trainer does with what a user's disk and history leave behind: a re-used output_dir (one run per
directory, overwrite or resume), torn metrics.jsonl lines, leftovers of killed saves, damaged checkpoints and
checkpoints of another lora_r (issue 11, items 11 and 12)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kernels.demo.synthetic import instruction_rows, make_languages, save_random_model
from qlora_kernels.train import ConfigError, TrainingError, load_config, train
from qlora_kernels.train.checkpoint import CheckpointError, clean_stale_saves, prune_checkpoints, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("robust")
    model = save_random_model(d / "model", hidden_size=32, num_layers=1)
    with open(d / "train.jsonl", "w") as f:
        for r in instruction_rows(make_languages(), 16, 1):
            f.write(json.dumps(r) + "\n")
    return {"model": model, "train": d / "train.jsonl"}


def config(assets, out: Path, **kw):
    raw = {"base_model": str(assets["model"]), "output_dir": str(out),
           "datasets": [{"path": str(assets["train"]), "type": "alpaca"}], "lora_r": 4, "lora_alpha": 8,
           "sequence_len": 64, "micro_batch_size": 4, "max_steps": 3, "learning_rate": 5e-3, "warmup_steps": 0,
           "optimizer": "adamw_torch", "save_steps": 1, "seed": 0, "progress_bar": False}
    raw.update(kw)
    return load_config(raw=raw)


def train_losses(history):
    return [(r["step"], r["loss"]) for r in history if "loss" in r]


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------- one run per output_dir (item 11)


def test_a_finished_runs_output_dir_is_refused_and_left_as_it_was(assets, tmp_path):
    out = tmp_path / "run"
    later = config(assets, out)  # validated while the directory was empty
    train(config(assets, out), quiet=True)
    before = snapshot(out)
    with pytest.raises(ConfigError) as e:
        config(assets, out, max_steps=2)
    msg = str(e.value)
    assert f"output_dir: {str(out)!r} holds the results of another run" in msg and "adapter_model.safetensors" in msg
    assert "overwrite_output_dir: true" in msg and f"resume_from_checkpoint: {str(out / 'checkpoint-3')!r}" in msg
    with pytest.raises(ConfigError, match="holds the results of another run"):
        train(later, quiet=True)  # train() checks again
    assert snapshot(out) == before


def test_overwrite_output_dir_replaces_the_old_run_and_pruning_keeps_the_new_runs_checkpoints(assets, tmp_path):
    out = tmp_path / "run"
    train(config(assets, out, max_steps=4), quiet=True)
    (out / "notes.txt").write_text("mine")
    res = train(config(assets, out, max_steps=2, save_total_limit=1, overwrite_output_dir=True), quiet=True)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # the old run's 1..4 are gone
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert res.global_step == 2
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is deleted


def test_prune_considers_only_this_runs_checkpoints_newest_saved_last(tmp_path):
    def fake(step: int, run_id: str | None, saved_at: int) -> None:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "trainer_state.json").write_text(json.dumps({"run_id": run_id, "saved_at_ns": saved_at}))

    fake(30, "other", 1)  # another run's, with higher steps
    fake(40, None, 2)  # written before checkpoints carried a run id
    fake(2, "mine", 10)
    fake(3, "mine", 11)
    fake(5, "mine", 5)  # a later step saved earlier: the branch a resume from checkpoint-2 left behind
    assert sorted(prune_checkpoints(tmp_path, 1, "mine")) == ["checkpoint-2", "checkpoint-5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-30", "checkpoint-40"]


def test_auto_resume_from_checkpoints_continues_the_run_in_output_dir(assets, tmp_path):
    full = train(config(assets, tmp_path / "full"), quiet=True)
    out = tmp_path / "cut"

    def interrupt(step, rec):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(assets, out), on_step_end=interrupt, quiet=True)
    cfg = config(assets, out, auto_resume_from_checkpoints=True)
    assert cfg.resume_from_checkpoint == str(out / "checkpoint-2")
    res = train(cfg, quiet=True)
    assert train_losses(res.history) == train_losses(full.history)
    with pytest.raises(ConfigError, match="set at most one of them"):
        config(assets, tmp_path / "x", auto_resume_from_checkpoints=True, overwrite_output_dir=True)
    with pytest.raises(ConfigError, match="would delete"):
        config(assets, out, resume_from_checkpoint=str(out / "checkpoint-2"), overwrite_output_dir=True)


# --------------------------------------------------------------------------- torn files and killed saves (item 12)


def test_a_torn_last_metrics_line_does_not_block_resuming(assets, tmp_path):
    out = tmp_path / "run"
    full = train(config(assets, out), quiet=True)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # a crash mid-write
    (out / "adapter_model.safetensors").unlink()
    res = train(config(assets, out, resume_from_checkpoint=str(out / "checkpoint-1")), quiet=True)
    assert train_losses(res.history) == train_losses(full.history)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_leftovers_of_killed_saves_are_cleaned_up_only_ours(tmp_path):
    dead, alive = dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        def d(name: str, complete: bool = True) -> Path:
            p = tmp_path / name
            p.mkdir()
            if complete:
                (p / "trainer_state.json").write_text("{}")
            return p

        d("checkpoint-1")
        d(f".old-checkpoint-1-{dead}")  # killed while deleting the replaced copy
        d(f".tmp-checkpoint-3-{dead}", complete=False)  # killed or disk full while writing
        d(f".old-checkpoint-2-{dead}")  # killed between the two renames: checkpoint-2 is missing
        (d(f".tmp-checkpoint-2-{dead}") / "new").write_text("x")
        d(f".tmp-checkpoint-4-{alive.pid}", complete=False)  # another process's save under way
        d(".tmp-something-else")
        done = clean_stale_saves(tmp_path)
        assert "checkpoint-2 (restored)" in done
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["checkpoint-1", "checkpoint-2", f".tmp-checkpoint-4-{alive.pid}", ".tmp-something-else"])
        assert (tmp_path / "checkpoint-2" / "new").is_file()  # the complete new copy
    finally:
        alive.kill()
        alive.wait()


def test_a_failed_save_removes_its_temp_directory(tmp_path, monkeypatch):
    import qlora_kernels.train.checkpoint as ck

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_state", full_disk)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*No space left"):
        save_checkpoint(tmp_path / "checkpoint-1", model, opt, {}, {})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    train(config(assets, out, max_steps=1), quiet=True)
    return out / "checkpoint-1"


def resume_fails_untouched(assets, tmp_path, ckpt: Path, **kw) -> str:
    from qlora_kernels.train.components import build_model

    cfg = config(assets, tmp_path / "resumed", resume_from_checkpoint=str(ckpt), **kw)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingError) as e:
        train(cfg, model=model, quiet=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a parameter changed before the error"
    return str(e.value)


@pytest.mark.parametrize("name, damage, needle", [
    ("optimizer.safetensors", "truncate", "optimizer.safetensors is damaged"),
    ("trainable.safetensors", "flip", "trainable.safetensors is damaged"),
    ("rng.json", "delete", "rng.json is missing"),
    ("trainer_state.json", "truncate", "trainer_state.json cannot be read"),
])
def test_a_damaged_checkpoint_fails_before_changing_any_parameter_naming_the_file(assets, tmp_path, finished, name,
                                                                                 damage, needle):
    import shutil

    ckpt = tmp_path / "checkpoint-1"
    shutil.copytree(finished, ckpt)
    f = ckpt / name
    if damage == "delete":
        f.unlink()
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        data = bytearray(f.read_bytes())
        data[-3] ^= 0xFF
        f.write_bytes(bytes(data))
    msg = resume_fails_untouched(assets, tmp_path, ckpt)
    assert str(ckpt) in msg and needle in msg


def test_resuming_with_another_lora_r_names_the_tensor_and_both_ranks(assets, tmp_path, finished):
    msg = resume_fails_untouched(assets, tmp_path, finished, lora_r=8)
    assert "trainable.safetensors: tensor '" in msg and ("lora_A.weight" in msg or "lora_B.weight" in msg)
    assert "written with lora_r 4, this run has lora_r 8" in msg
    sd = load_file(str(finished / "trainable.safetensors"))
    assert any(v.shape[0] == 4 for k, v in sd.items() if "lora_A" in k)
