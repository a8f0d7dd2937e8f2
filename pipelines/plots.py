"""Figures a run logs: training curves, detection timelines, memory vs mAP of fidelity levels.

Pure matplotlib, no MLflow: each function returns a `matplotlib.figure.Figure` built without
pyplot, so no GUI backend or global figure list is involved (saving renders with Agg) and a
figure is freed as soon as the caller drops it. Log one with `Tracker.log_figure(fig, name)`.
"""

from __future__ import annotations

import math
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

_GIB = 1024**3


def _label_colors(labels: Sequence[str]) -> dict[str, tuple]:
    """The same colour for a label in ground truth and predictions (tab10; tab20 for more, cycled)."""
    import matplotlib

    names = sorted(set(labels))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(names)}


def _empty(message: str) -> Figure:
    fig = Figure(figsize=(6, 2))
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.set_axis_off()
    return fig


def training_curves(history: dict[str, list[float | None]]) -> Figure:
    """One panel per metric (loss terms, learning rate, throughput, memory, mAP) against epoch.

    Values may be None or NaN where a metric was not measured (e.g. mAP on non-eval epochs);
    those epochs are left out of its line. Learning rates are drawn on a log scale.
    """
    series = {key: values for key, values in history.items() if values}
    if not series:
        return _empty("no metrics recorded")
    ncols = min(3, len(series))
    nrows = math.ceil(len(series) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 2.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (key, values) in zip(axes, series.items()):
        points = [(epoch, float(v)) for epoch, v in enumerate(values, start=1) if v is not None and not math.isnan(float(v))]
        if points:
            epochs, ys = zip(*points)
            ax.plot(epochs, ys, marker="o" if len(points) <= 30 else None, markersize=3)
        if ("lr" in key.lower().split("/")[-1] or "learning_rate" in key) and points and min(ys) > 0:
            ax.set_yscale("log")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(series):]:
        ax.set_axis_off()
    return fig


def detection_timeline(video_id: str, duration_sec: float, gt_segments: Sequence[tuple[float, float, str]],
                       predictions: Sequence[tuple[float, float, str, float]], top_k: int = 10) -> Figure:
    """Ground truth (top row) above the `top_k` highest-scoring predictions, one row each.

    Segments are (start_sec, end_sec, label[, score]); bars share a colour per label and a
    prediction's opacity grows with its score. Rows are labelled "#rank score".
    """
    top = sorted(predictions, key=lambda p: p[3], reverse=True)[:top_k]
    colors = _label_colors([g[2] for g in gt_segments] + [p[2] for p in top])
    rows = 1 + len(top)
    fig = Figure(figsize=(10, 1.2 + 0.32 * rows), layout="constrained")
    ax = fig.add_subplot()

    def bar(row: int, start: float, end: float, label: str, alpha: float) -> None:
        start, end = max(0.0, start), min(duration_sec, end)
        ax.broken_barh([(start, max(end - start, 1e-3))], (rows - 1 - row - 0.4, 0.8), color=colors[label], alpha=alpha)

    for start, end, label in gt_segments:
        bar(0, start, end, label, 1.0)
    for rank, (start, end, label, score) in enumerate(top, start=1):
        bar(rank, start, end, label, 0.25 + 0.75 * min(max(score, 0.0), 1.0))
    ax.set_yticks(range(rows), [f"#{r} {p[3]:.2f}" for r, p in reversed(list(enumerate(top, start=1)))] + ["ground truth"])
    ax.set_xlim(0, duration_sec)
    ax.set_ylim(-0.6, rows - 0.4)
    ax.set_xlabel("time (s)")
    ax.set_title(f"{video_id}: ground truth vs top {len(top)} of {len(predictions)} predictions", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=c, label=label) for label, c in list(colors.items())[:10]]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return fig


def memory_vs_map(points: Sequence[tuple[str, float, float]]) -> Figure:
    """Peak training memory (GiB) against average mAP, one labelled point per fidelity level."""
    if not points:
        return _empty("no fidelity levels run")
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for name, memory_bytes, average_map in points:
        x = memory_bytes / _GIB
        ax.scatter([x], [average_map], s=40)
        ax.annotate(name, (x, average_map), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.set_xlabel("peak memory (GiB)")
    ax.set_ylabel("average mAP")
    ax.set_title("memory vs accuracy of the fidelity levels", fontsize=10)
    ax.margins(0.15)  # room for the point labels
    ax.grid(alpha=0.3)
    return fig
