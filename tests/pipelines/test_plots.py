"""pipelines.plots: the figures a run logs, checked by what they show (no MLflow involved)."""

from __future__ import annotations

from pipelines import plots


def test_plots_show_top_k_predictions_and_render():
    gt = [(10.0, 20.0, "jump"), (50.0, 70.0, "run")]
    predictions = [(11.0, 19.0, "jump", 0.9), (0.0, 5.0, "run", 0.1), (40.0, 72.0, "run", 0.6), (80.0, 90.0, "jump", 0.3)]
    fig = plots.detection_timeline("v_1", 100.0, gt, predictions, top_k=2)
    rows = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert rows == ["#2 0.60", "#1 0.90", "ground truth"]  # bottom to top: highest score just under the truth
    curves = plots.training_curves({"loss": [1.0, 0.5], "lr": [1e-3, 1e-4], "val/mAP": [None, 0.3]})
    assert [ax.get_title() for ax in curves.axes if ax.get_title()] == ["loss", "lr", "val/mAP"]
    assert curves.axes[1].get_yscale() == "log"
    memory = plots.memory_vs_map([("full", 12 * 1024**3, 0.35), ("st_lofi", 3 * 1024**3, 0.31)])
    assert [tuple(o.get_offsets()[0]) for o in memory.axes[0].collections] == [(12.0, 0.35), (3.0, 0.31)]

