"""Run metrics: one JSON object per line in ``metrics.jsonl``, and PNG plots made from it."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np


class MetricsLog:
    """Appends records to a JSONL file (flushed per record, so a killed run keeps them)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> dict:
        record = {k: _plain(v) for k, v in record.items()}
        record.setdefault("time", round(time.time(), 3))
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record


    def drop_train_records_after(self, phase: str, step: int) -> None:
        """Forgets ``phase``'s training records past ``step``: a resumed run redoes those
        steps and logs them again."""
        self._keep(lambda r: not (r.get("kind") == "train" and r.get("phase") == phase
                                  and r["step"] > step))

    def drop_records_after(self, field: str, value: int) -> None:
        """Forgets every record whose ``field`` (say ``round``) is past ``value``."""
        self._keep(lambda r: not (field in r and r[field] > value))

    def _keep(self, predicate) -> None:
        kept = [r for r in read_jsonl(self.path) if predicate(r)]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)  # atomic: a kill here leaves the old or the new file, never half


def _plain(value):
    """JSON-safe Python scalars from numpy/JAX scalars."""
    if hasattr(value, "item") and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_loss(records: list[dict], path: str | Path, title: str = "") -> None:
    """One panel per training phase: loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = sorted({r["phase"] for r in records if "loss" in r and r.get("kind") == "train"},
                    key=lambda p: min(r["time"] for r in records if r.get("phase") == p))
    fig, axes = plt.subplots(1, max(len(phases), 1), figsize=(5 * max(len(phases), 1), 3.6),
                             squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=False):
        rows = [r for r in records if r.get("phase") == phase and r.get("kind") == "train"]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
        ax.set_title(phase)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_client_rounds(records: list[dict], path: str | Path, title: str = "",
                       panels: list[tuple[str, str, str]] | None = None) -> None:
    """Per client against round, one panel per ``(record kind, field, axis label)``; by
    default held-out loss, and exact match when it was evaluated (round 0 is the base model).
    Solid lines for the global model, dashed for each client's fused (personalised) model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if panels is None:
        panels = [("eval", "loss", "held-out loss (nats/token)")]
        if any(r.get("kind") == "exact_match" for r in records):
            panels.append(("exact_match", "exact_match", "held-out exact match"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (kind, field, label) in zip(axes[0], panels, strict=True):
        rows = [r for r in records if r.get("kind") == kind]
        for i, client in enumerate(sorted({r["client"] for r in rows})):
            base = [r for r in rows if r["client"] == client and r["model"] == "base"]
            for model, style in (("global", "-"), ("fused", "--")):
                mine = sorted((r for r in rows if r["client"] == client and r["model"] == model),
                              key=lambda r: r["round"])
                if mine:
                    mine = base + mine  # the global and fused curves start at the base model
                    ax.plot([r["round"] for r in mine], [r[field] for r in mine], style,
                            marker=".", color=colors[i % len(colors)],
                            label=f"{mine[-1].get('name', client)} ({model})")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
