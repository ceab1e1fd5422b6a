"""benchmarks/bench_generate.py --quick runs end to end: every provider's prefill and decode rows, the token
comparisons, JSON and PNG. (Its timings decide nothing here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_writes_every_provider_and_the_token_comparisons(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_generate.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "generate.json").read_text())
    assert res["complete"] and res["quick"]
    providers = {r["provider"] for r in res["rows"]}
    want = {"bf16", "ours", "ours+lora"} | ({"bnb", "bnb+peft"} if "bnb_skipped" not in res else set())
    assert providers == want, providers
    for r in res["rows"]:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["batch"] in (1, 2), r
    lora = [r for r in res["rows"] if r["provider"] == "ours+lora"]
    assert lora and all(0.0 <= r["tokens_equal_merged"] <= 1.0 for r in lora)
    if "bnb_skipped" not in res:
        assert all("tokens_equal_ours" in r for r in res["rows"] if r["provider"] == "bnb")
    assert (tmp_path / "generate.png").stat().st_size > 0 or "matplotlib missing" in proc.stderr
    assert "decode" in proc.stdout and "ours+lora" in proc.stdout
