"""benchmarks/bench_grpo.py --quick runs end to end: every provider's steps per second, tokens per second and peak
memory, JSON and PNG. (Its timings decide nothing here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_writes_every_provider(tmp_path):
    pytest.importorskip("trl")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_grpo.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "grpo.json").read_text())
    assert res["complete"] and res["quick"]
    want = {"ours", "trl+ours"} | ({"trl+bnb"} if "bnb_skipped" not in res else set())
    assert {r["provider"] for r in res["rows"]} == want
    for r in res["rows"]:
        assert r["steps_per_s"] > 0 and r["tok_s"] > 0 and r["peak_rss_mib"] > r["added_rss_mib"] > 0, r
    assert [r for r in res["rows"] if r["provider"] == "ours"][0]["rollout_tok_s"] > 0
    assert (tmp_path / "grpo.png").stat().st_size > 0 or "matplotlib missing" in proc.stderr
    assert "steps/s" in proc.stdout and "trl+ours" in proc.stdout
