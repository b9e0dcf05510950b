"""Run metrics: one JSON object per line in ``metrics.jsonl`` (the record of the run), the
same values as live TensorBoard curves (``tensorboard/``), and PNG plots made from the JSONL.

TensorBoard is a mirror: every numeric field of a record becomes a scalar, tagged by the
record's kind, phase or model and client, at the record's step (or round). A resumed run
writes with ``purge_step`` at its first step, so TensorBoard drops the curves' points that the
run is about to redo, as the JSONL is cut back to its checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
from absl import logging

from ffrag_jax.errors import UserError


class MetricsLog:
    """Appends records to a JSONL file, each flushed and ``fsync``-ed as it is written, so a
    kill or a power loss keeps every record before it.

    Opening a log whose last line was torn by a kill mid-write drops that line with a warning
    (``repair=True``); a damaged line elsewhere is an error naming the file and the line.
    """

    def __init__(self, path: str | Path, repair: bool = True,
                 tensorboard: str | Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if repair and self.path.exists():
            self._drop_torn_last_line()
        self.tensorboard = None if tensorboard is None else TensorBoardMirror(tensorboard)

    def write(self, **record) -> dict:
        record = {k: _plain(v) for k, v in record.items()}
        record.setdefault("time", round(time.time(), 3))
        line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
        with self.path.open("ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        return record

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def offset(self) -> int:
        """The log's length in bytes: where the next record starts."""
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, offset: int) -> None:
        """Cuts the log back to its first ``offset`` bytes (a record boundary recorded by
        :meth:`offset`): the records of work that a resumed run redoes."""
        size = self.offset()
        if offset > size:
            logging.warning("%s holds %d bytes, less than the %d its checkpoint recorded; "
                            "keeping it as it is", self.path, size, offset)
            return
        if offset < size:
            with self.path.open("r+b") as f:
                f.truncate(offset)
                f.flush()
                os.fsync(f.fileno())
            logging.info("%s: dropped %d bytes of records after the last checkpoint",
                         self.path.name, size - offset)

    def _drop_torn_last_line(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            logging.warning("%s: dropping a torn last line (%d bytes, %r...): the previous run "
                            "was stopped while writing it", self.path, len(data) - end,
                            data[end:end + 40])
            self.truncate(end)


def open_log(workdir: Path) -> MetricsLog:
    """A job's log: ``workdir/metrics.jsonl``, mirrored to ``workdir/tensorboard``."""
    return MetricsLog(Path(workdir) / "metrics.jsonl", tensorboard=Path(workdir) / "tensorboard")


_ILLEGAL_TAG = re.compile(r"[^-/\w.]")  # tensorboardX's summary-name rule

# Fields that say what a record is about, not values to plot.
_LABELS = ("kind", "phase", "model", "client", "name", "step", "round", "time", "metric",
           "selected", "questions", "count", "accepted")


class TensorBoardMirror:
    """Writes records' numeric fields as TensorBoard scalars (tensorboardX: no TensorFlow),
    one event folder per kind or phase, so that each can be purged on resume alone."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._writers: dict = {}
        try:
            import tensorboardX  # noqa: F401
        except ImportError:  # the JSONL and the PNGs still have everything
            logging.warning("tensorboardX is not installed: no TensorBoard curves (pip install "
                            "tensorboardX)")
            self.folder = None

    def write(self, record: dict) -> None:
        if self.folder is None:
            return
        step = record.get("step", record.get("round"))
        if not isinstance(step, int):
            return
        group = str(record.get("phase") or record.get("kind", "metrics"))
        writer = self._writers.get(group)
        if writer is None:
            from tensorboardX import SummaryWriter

            # purge_step: a resumed run's first step; TensorBoard drops the later points of
            # the interrupted run (the JSONL was cut back the same way).
            writer = self._writers[group] = SummaryWriter(
                str(self.folder / group), purge_step=step, flush_secs=10)
        where = "/".join(str(record[k]) for k in ("model", "name", "client", "metric")
                         if k in record and not (k == "client" and "name" in record))
        for key, value in record.items():
            if key in _LABELS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            tag = f"{record.get('kind', 'metrics')}/{where + '/' if where else ''}{key}"
            # TensorBoard's legal characters, replaced as tensorboardX would (it otherwise
            # logs a warning per name: a wall of them in every evaluation's output)
            writer.add_scalar(_ILLEGAL_TAG.sub("_", tag), value, step)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _plain(value):
    """JSON-safe Python scalars from numpy/JAX scalars."""
    if hasattr(value, "item") and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file; a damaged line is a UserError naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except (ValueError, UnicodeDecodeError) as e:
                raise UserError(f"{path} line {number} is damaged ({e}); move the file away "
                                "to start its records afresh") from None
    return records


def plot_training_loss(records: list[dict], path: str | Path, title: str = "") -> None:
    """One panel per training phase: loss against step. A federated phase (records with a
    ``client`` and a ``round``) gets one line per client against the client's own step count
    across rounds (``(round - 1) * steps per round + step``), with a dotted line at each round
    boundary, instead of one line zig-zagging through every client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = sorted({r["phase"] for r in records if "loss" in r and r.get("kind") == "train"},
                    key=lambda p: min(r["time"] for r in records if r.get("phase") == p))
    fig, axes = plt.subplots(1, max(len(phases), 1), figsize=(5 * max(len(phases), 1), 3.6),
                             squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=False):
        rows = [r for r in records if r.get("phase") == phase and r.get("kind") == "train"]
        if all("client" in r and "round" in r for r in rows):
            # Clients' steps count on across rounds; a dotted line marks each round's end.
            for client in sorted({r["client"] for r in rows}):
                mine = sorted((r for r in rows if r["client"] == client),
                              key=lambda r: r["step"])
                ax.plot([r["step"] for r in mine], [r["loss"] for r in mine], marker=".",
                        markersize=3, label=str(mine[0].get("name", client)))
            for rnd in sorted({r["round"] for r in rows})[:-1]:
                ax.axvline(max(r["step"] for r in rows if r["round"] == rnd), color="grey",
                           linestyle=":", linewidth=0.8)
            ax.set_xlabel("client step (dotted: end of a round)")
            ax.legend(fontsize=7)
        else:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
            ax.set_xlabel("step")
        ax.set_title(phase)
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
                    # "nan" (a client without questions of a kind) plots as a gap
                    ax.plot([r["round"] for r in mine],
                            [r[field] if isinstance(r[field], float | int) else float("nan")
                             for r in mine], style,
                            marker=".", color=colors[i % len(colors)],
                            label=f"{mine[-1].get('name', client)} ({model})")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    # One legend for all panels, below them: inside a panel it hides curves (ten clients and
    # two models make twenty entries).
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = min(len(labels), 4 * len(panels)) or 1  # ~1.75 inches of width per column
    if handles:  # clients without held-out data draw nothing
        fig.legend(handles, labels, loc="lower center", fontsize=7, ncol=columns,
                   frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    legend_in = (0.2 * -(-len(labels) // columns) + 0.1) if handles else 0.0  # inches below
    fig.set_figheight(4.2 + legend_in)
    fig.tight_layout(rect=(0, legend_in / (4.2 + legend_in), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
