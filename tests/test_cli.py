"""The ``qlora-kernels`` command line: train, demo options, bench dispatch, backends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_kernels import cli
from qlora_kernels.demo.synthetic import instruction_rows, make_languages, save_random_model

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    model = save_random_model(d / "model", hidden_size=32, num_layers=1)
    with open(d / "train.jsonl", "w") as f:
        for r in instruction_rows(make_languages(), 16, 1):
            f.write(json.dumps(r) + "\n")
    cfg = {"base_model": str(model), "datasets": [{"path": str(d / "train.jsonl"), "type": "alpaca"}],
           "lora_r": 4, "micro_batch_size": 4, "max_steps": 2, "optimizer": "adamw_torch", "progress_bar": False,
           "output_dir": str(d / "out")}
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return {"dir": d, "config": d / "cfg.yaml"}


def test_train_with_overrides(tiny, capsys):
    out = tiny["dir"] / "out2"
    assert cli.main(["train", str(tiny["config"]), f"output_dir={out}", "max_steps=1", "lora_alpha=8"]) == 0
    assert "trained 1 steps" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["lora_alpha"] == 8.0


def test_train_refuses_a_used_output_dir_with_exit_2_naming_the_flags(tiny, capsys):
    out = tiny["dir"] / "used"
    assert cli.main(["train", str(tiny["config"]), f"output_dir={out}", "max_steps=1"]) == 0
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli.main(["train", str(tiny["config"]), f"output_dir={out}", "max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "holds the results of another run" in err and "overwrite_output_dir: true" in err
    assert (out / "metrics.jsonl").read_text() == metrics
    assert cli.main(["train", str(tiny["config"]), f"output_dir={out}", "max_steps=1",
                     "overwrite_output_dir=true"]) == 0


def test_train_bad_config_fails_before_loading_anything(tiny, capsys, monkeypatch):
    import qlora_kernels.train.loop as loop

    monkeypatch.setattr(loop, "build_model", lambda *a, **k: pytest.fail("model loaded for a bad config"))
    assert cli.main(["train", str(tiny["config"]), "optimizer=sgd", "lora_rank=8"]) == 2
    err = capsys.readouterr().err
    assert "optimizer: 'sgd' is not allowed; allowed values: 'paged_adamw'" in err
    assert "lora_rank: unknown key; did you mean 'lora_r'?" in err


def test_train_data_error_exit_code(tiny, capsys):
    bad = tiny["dir"] / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    assert cli.main(["train", str(tiny["config"]), f"datasets.0.path={bad}"]) == 1
    assert f"{bad}:1: alpaca row needs a string 'output'" in capsys.readouterr().err


def test_missing_config_file(capsys, tmp_path):
    assert cli.main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_backends(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "QLORA_KERNELS_BACKEND" in out


def test_bench_without_scripts(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_benchmarks_dir", lambda: tmp_path / "benchmarks")
    assert cli.main(["bench"]) == 2
    assert "no benchmark scripts found" in capsys.readouterr().err


def test_bench_dispatches_to_a_script(capsys, monkeypatch, tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "bench_x.py").write_text("import sys\nprint('ran', sys.argv[1:])\nsys.exit(3)\n")
    (bench / "test_bench_x.py").write_text("def test_x():\n    pass\n")  # a pytest file, not a script
    (bench / "_common.py").write_text("")
    monkeypatch.setattr(cli, "_benchmarks_dir", lambda: bench)
    assert cli.main(["bench"]) == 2  # no default entry: names the scripts
    err = capsys.readouterr().err
    assert "bench_x" in err and "test_bench_x" not in err and "_common" not in err
    assert cli.main(["bench", "bench_x", "--quick"]) == 3
    assert cli.main(["bench", "test_bench_x"]) == 2
    (bench / "bench.py").write_text("import sys\nsys.exit(0 if sys.argv[1:] == ['--m', '1'] else 5)\n")
    assert cli.main(["bench", "bench", "--m", "1"]) == 0
    assert cli.main(["bench", "--m", "1"]) == 2  # options without a script: no script is run


def test_demo_help_and_module_entry_points():
    r = subprocess.run([sys.executable, "-m", "qlora_kernels", "demo", "--help"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0 and "--steps" in r.stdout and "--rebuild-base" in r.stdout
    r = subprocess.run([sys.executable, "-m", "qlora_kernels.train", "--help"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0 and "key=value" in r.stdout
    r = subprocess.run([sys.executable, "-m", "qlora_kernels.demo", "--help"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0 and "--steps" in r.stdout and "--rebuild-base" in r.stdout


def test_usage_error():
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2


def test_config_error_raised_by_train_exits_2(tiny, capsys, monkeypatch):
    import qlora_kernels.train as qt

    def taken(cfg):
        raise qt.ConfigError("invalid config:\n  output_dir: 'x' holds the results of another run")

    monkeypatch.setattr(qt, "train", taken)  # e.g. another run filled output_dir after the config was read
    assert cli.main(["train", str(tiny["config"]), f"output_dir={tiny['dir'] / 'fresh'}"]) == 2
    assert "holds the results of another run" in capsys.readouterr().err


def test_train_help_lists_ranges_and_aliases(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "adam_beta1 (0.9): AdamW beta1; allowed: [0, 1)" in out
    assert "per_device_train_batch_size -> micro_batch_size" in out and "overwrite_output_dir" in out
