"""What a run leaves to read: ``metrics.jsonl`` (one JSON record per logged step and per eval) and ``loss.png``.

A step record holds ``step``, ``epoch``, ``loss``, ``lr``, ``grad_norm``, the step's normalization count
(``target_tokens`` for SFT, ``pairs`` for DPO), ``tokens_per_s`` and the objective's metrics (DPO: the
rewards and log-probs); an eval record holds ``step``, ``epoch``, ``eval_loss`` and the objective's metrics
with an ``eval_`` prefix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """metrics.jsonl writer; on resume keeps only the records up to the resumed step.

    A line that is not a JSON object (the torn last line of a crash or a full disk mid-write) is
    dropped, and counted in ``dropped``.
    """

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True) -> None:
        self.path = path if enabled else None  # only rank 0 writes (distributed runs)
        self.history: list[dict[str, Any]] = []
        self.dropped = 0
        if self.path is None:
            return
        if resume_step is not None and path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    rec = None
                if not isinstance(rec, dict):
                    self.dropped += bool(line.strip())
                    continue
                if rec.get("step", 0) <= resume_step:
                    self.history.append(rec)
        with open(path, "w") as f:
            for rec in self.history:
                f.write(json.dumps(rec) + "\n")

    def write(self, rec: dict[str, Any]) -> None:
        """Keep ``rec`` in ``history`` and append it to the file."""
        self.history.append(rec)
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def plot_losses(history: list[dict[str, Any]], path: Path) -> bool:
    """Train and eval loss against the step, as a PNG. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("token cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
