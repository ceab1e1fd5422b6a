"""benchmarks/bench_fidelity.py --quick: QLoRA (ours and bitsandbytes') against 16-bit LoRA, the same loop for all
three, on the demo's task and on the knowledge task (answers only the pretrained base knows). The gap in eval loss
must lie within the run-to-run spread the same run measures over its seeds (the LoRA initialisation draws differ
between libraries, so a seed is not the same run in each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quick(tmp_path: Path, task: str) -> tuple[dict, dict, str]:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fidelity.py"), "--quick", "--task", task,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = "fidelity" if task == "demo" else "fidelity_knowledge"
    res = json.loads((tmp_path / f"{stem}.json").read_text())
    rows = {r["provider"]: r for r in res["rows"]}
    assert res["complete"] and res["task"] == task and {"qlora", "lora16"} <= set(rows)
    assert len(res["runs"]) == len(rows) * 2  # 2 seeds each
    assert (tmp_path / f"{stem}.png").stat().st_size > 0 or "matplotlib" in proc.stderr
    assert "gap %" in proc.stdout
    return res, rows, proc.stdout


def _gaps_within_spread(rows: dict) -> None:
    ref = rows["lora16"]
    for name in ("qlora", "bnb"):
        if name not in rows:
            continue
        r = rows[name]
        # two means of 2 seeds each: their difference is within the two runs' spreads (and 1% of the loss)
        tol = r["eval_loss_spread"] + ref["eval_loss_spread"] + 0.01 * ref["eval_loss"]
        assert abs(r["eval_loss"] - ref["eval_loss"]) <= tol, (name, r, ref)
        assert abs(r["exact_match"] - ref["exact_match"]) <= r["exact_match_spread"] + ref["exact_match_spread"] \
            + 0.05, (name, r, ref)


@pytest.mark.slow
def test_quick_fidelity_gap_is_within_the_spread_over_seeds(tmp_path):
    pytest.importorskip("peft")
    _, rows, _ = _quick(tmp_path, "demo")
    ref = rows["lora16"]
    assert ref["eval_loss"] < 1.5 and ref["exact_match"] > 0.3  # it learnt the task (from ~16% exact match)
    _gaps_within_spread(rows)


@pytest.mark.slow
def test_quick_knowledge_task_needs_the_base_and_the_gap_is_within_the_spread(tmp_path):
    pytest.importorskip("peft")
    res, rows, _ = _quick(tmp_path, "knowledge")
    recall = res["base_recall"]
    # the base knows the held-out people's facts before any fine-tune, and NF4 keeps most of it
    assert recall["dense"]["accuracy"] > 0.8 and recall["nf4"]["accuracy"] > 0.7, recall
    ref = rows["lora16"]
    # the fine-tune answers held-out people from the base (chance: 1/24 towns, 1/16 trades)
    assert ref["exact_match"] > 0.5, ref
    _gaps_within_spread(rows)
    bases = list((tmp_path / "bases").iterdir())
    assert len(bases) == 1 and (bases[0] / "world.json").exists() and not bases[0].name.endswith(".partial")
