"""The prepared GPU check, tested where it can be without a GPU: the script parses and fits the device's
limits, and the summary judges each target from the benchmarks' JSON (never from a quick CPU run)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_summary  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
DEVICE_COMMAND_LIMIT_S = 600


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_script_parses_and_fits_the_device_limits():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    text = SCRIPT.read_text()
    budget = int(re.search(r'BUDGET="\$\{GPU_CHECK_BUDGET_S:-(\d+)\}"', text).group(1))
    assert budget <= 420 < DEVICE_COMMAND_LIMIT_S  # 7 minutes on the GPU, build included
    limits = [int(v) for v in re.findall(r"^\s*(?:if !? ?)?step \w+ (\d+) ", text, re.M)]
    assert len(limits) >= 7 and all(v <= budget for v in limits)
    assert "-m gpu" in text and "--maxfail" in text and " -x " not in text
    assert "QLORA_KERNELS_REQUIRE_GPU=1" in text and "QLORA_KERNELS_REQUIRE_CUDA_BUILD=1" in text


def _write(work: Path, name: str, data) -> None:
    (work / name).write_text(json.dumps(data))


def test_summary_judges_each_target(tmp_path):
    matmul = []
    for _label, n, k, m, target, _, _ in gpu_summary.MATMUL_TARGETS:
        matmul.append({"n": n, "k": k, "m": m, "ours_us": target * (0.9 if m == 1 else 1.5), "bf16_us": 1.0})
    for (n, k), _ in gpu_summary.BNB_LARGE_M_US.items():
        matmul.append({"n": n, "k": k, "m": 8192, "ours_us": 102.0, "bf16_us": 100.0})
    _write(tmp_path, "nf4.json", {"quick": False, "dequantize": [{"n": 8192, "k": 8192, "ours_us": 50.0}],
                                  "matmul": matmul})
    _write(tmp_path, "adamw.json", {"meta": {"quick": False}, "rows": [
        {"set": "lora_8B_r16", "provider": "ours", "step_ms": 3.9}]})
    _write(tmp_path, "e2e.json", {"env": {"quick": False}, "rows": [
        {"shape": "1b", "provider": "qlora_kernels", "tokens_per_s": 40000, "peak_gib": 8.0},
        {"shape": "1b", "provider": "hf_peft_bnb", "tokens_per_s": 26000, "peak_gib": 14.0}]})
    _write(tmp_path, "e2e_ragged.json", {"env": {"quick": False}, "rows": [
        {"shape": "1b", "provider": "qlora_kernels", "tokens_per_s": 30000, "peak_gib": 11.0},
        {"shape": "1b", "provider": "hf_peft_bnb", "tokens_per_s": 20000, "peak_gib": 14.0}]})
    (tmp_path / "tests.log").write_text("...F.\n= 3 failed, 380 passed, 12 skipped, 500 deselected in 61.2s =\n")
    (tmp_path / "steps.tsv").write_text("build\t0\t88\t240\ntests\t1\t61\t120\nbench_nf4\t124\t90\t90\n")
    rows = {r["what"]: r for r in gpu_summary.targets(tmp_path)}
    assert rows["dequantize 8192x8192"]["met"] is False
    assert rows["nf4_linear M=1 4096x4096"]["met"] is True
    assert rows["nf4_linear M=8 4096x4096"]["met"] is False
    assert rows["nf4_linear M=8192 4096x4096"]["met"] is True  # 102 <= 100 * 1.03
    assert rows["PagedAdamW, LoRA set of 8B r=16"]["met"] is True
    assert rows["e2e 1b tokens/s vs HF+PEFT+bnb"]["met"] is True
    assert rows["e2e 1b peak memory vs HF+PEFT+bnb"]["met"] is True
    assert rows["e2e 8b tokens/s vs HF+PEFT+bnb"]["met"] is None  # not run: never guessed
    assert rows["e2e ragged 1b real tokens/s vs HF+PEFT+bnb padded"]["met"] is True  # 1.5x
    assert rows["e2e ragged 1b peak memory vs HF+PEFT+bnb padded"]["met"] is False  # 0.79x
    assert "e2e ragged 8b real tokens/s vs HF+PEFT+bnb padded" not in rows  # not part of the check
    assert all(r["met"] is None for w, r in rows.items() if w.startswith("layer fwd+bwd"))  # no lora.json
    assert gpu_summary.test_counts(tmp_path) == {"passed": 380, "failed": 3, "errors": 0, "skipped": 12,
                                                 "deselected": 500}
    text, merged = gpu_summary.report(tmp_path)
    assert "bench_nf4        rc=124" in text and "380 passed, 3 failed, 12 skipped" in text
    assert merged["tests"]["failed"] == 3 and len(merged["steps"]) == 3


def test_summary_never_holds_a_quick_run_against_the_targets(tmp_path):
    _write(tmp_path, "nf4.json", {"quick": True, "dequantize": [{"n": 8192, "k": 8192, "ours_us": 1.0}],
                                  "matmul": [{"n": 4096, "k": 4096, "m": 1, "ours_us": 1.0, "bf16_us": 1.0}]})
    assert all(r["met"] is None for r in gpu_summary.targets(tmp_path))
    text, _ = gpu_summary.report(tmp_path)
    assert "0 of 0 measured targets met" in text
