"""Plots of training runs, drawn with matplotlib's Agg canvas (no display, no global backend).

from experiments import plots
plots.plot_loss_curve(plots.read_metrics("runs/tiny/metrics.jsonl"), "runs/tiny/loss.png")
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable

from etils import epath


def read_metrics(path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (one JSON object per line)."""
    lines = epath.Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def figure(width: float = 6.4, height: float = 4.0):
    """A matplotlib ``Figure`` on its own Agg canvas (no display, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path) -> None:
    """Lay out ``fig`` and write it as a PNG to ``path`` (local or ``epath``)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    epath.Path(path).write_bytes(buffer.getvalue())


def plot_loss_curve(records: Iterable[dict], path, *, title: str | None = None) -> None:
    """Write a PNG of train and eval loss against step.

    Args:
      records: metrics records with ``step``, ``split`` ("train" or "eval") and ``loss``.
      path: the PNG file to write.
      title: the figure title.
    """
    records = list(records)
    fig = figure()
    ax = fig.add_subplot()
    for split, style in (("train", "-"), ("eval", "o-")):
        points = [(r["step"], r["loss"]) for r in records if r.get("split") == split]
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, style, label=f"{split} loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    if title:
        ax.set_title(title)
    save_png(fig, path)
