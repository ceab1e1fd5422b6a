"""benchmarks/bench_moe_load.py runs end to end on a small Mixtral-shaped model: each way in, one process each, JSON
and PNG; the NF4 experts of both of our loaders hold the same bytes, fewer than with the experts dense."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_small_run_writes_every_way(tmp_path):
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_moe_load.py"), "--hidden", "128",
                           "--layers", "1", "--experts", "4", "--vocab", "512", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "moe_load.json").read_text())
    rows = {r["way"]: r for r in res["rows"]}
    assert {"load_4bit_model", "from_pretrained", "from_pretrained, experts dense", "bf16"} <= set(rows)
    assert rows["load_4bit_model"]["experts_module"] == rows["from_pretrained"]["experts_module"] == "NF4Experts"
    assert rows["load_4bit_model"]["model_mib"] == rows["from_pretrained"]["model_mib"]
    assert rows["from_pretrained"]["model_mib"] < rows["from_pretrained, experts dense"]["model_mib"] < rows["bf16"][
        "model_mib"]
    assert (tmp_path / "moe_load.png").stat().st_size > 0 or "matplotlib missing" in proc.stderr
    assert "model MiB" in proc.stdout
