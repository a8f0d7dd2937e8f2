"""What a sweep ends with: the trial table, the Pareto plots, the best config, the MLflow review.

One row per planned trial (`results.csv`, printed sorted by the metric): trial, status
(finished, stopped_early by ASHA, error, not_run, over_budget, duplicate), the metric's final and best
epoch values, epochs run, activation memory per training step (MiB), wall seconds, the
overrides and the trial's MLflow run id. `pareto.png`: the metric against activation memory
and against wall time, the non-dominated trials joined. `best_config.yaml`: the best
trial's pipeline config with its own run name, so `lofi train --config` takes it as it is.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lofi.config import dump_yaml, replace
from pipelines.config import PipelineConfig

STOPPED = "the sweep's scheduler (ASHA) stopped the trial"  # lofi.closed_by of a stopped trial's run
COLUMNS = ("trial", "status", "metric_final", "metric_best", "epochs", "activation_memory_mib", "seconds",
           "overrides", "mlflow_run_id", "note")


def trial_rows(scfg: Any, trials: list[dict[str, Any]], grid: Any, runs: dict[str, dict[str, Any]]) -> list[dict]:
    """The table: Tune's results for launched trials, the plan's figures for the others."""
    by_name = {}
    for result in grid:
        by_name[result.config["point"]["trial"]] = result
    metric, rows = scfg.search.metric, []
    for trial in trials:
        row = {"trial": trial["trial"], "status": trial["status"], "metric_final": math.nan, "metric_best": math.nan,
               "epochs": 0, "activation_memory_mib": trial["activation_memory_bytes"] / 2**20, "seconds": math.nan,
               "overrides": "; ".join(f"{k}={v}" for k, v in trial["overrides"].items()),
               "mlflow_run_id": runs.get(f"{trial['trial']}/train", {}).get("run_id", ""), "note": trial["note"]}
        result = by_name.get(trial["trial"])
        if result is None and trial["status"] == "launched":
            row["status"], row["note"] = "not_run", "Tune holds no result of it (the sweep stopped before it ran?)"
        if result is not None:
            frame = result.metrics_dataframe
            values = [] if frame is None or metric not in frame else [v for v in frame[metric] if not math.isnan(v)]
            # epochs, not reports: a trial resumed from its checkpoint reports only the epochs it still ran
            row["epochs"] = int(frame["epoch"].max()) + 1 if values else 0
            if values:
                row["metric_final"] = values[-1]
                row["metric_best"] = max(values) if scfg.search.mode == "max" else min(values)
                row["seconds"] = float(frame["time_total_s"].iloc[-1])
            planned = trial["epochs"]
            row["status"] = ("error" if result.error is not None else
                             "finished" if row["epochs"] >= planned else "stopped_early")
            if result.error is not None:
                row["note"] = f"{type(result.error).__name__}: {str(result.error).splitlines()[0][:200]}"
            elif row["status"] == "stopped_early":
                row["note"] = f"ASHA stopped it after {row['epochs']} of {planned} epochs"
        rows.append(row)
    sign = -1 if scfg.search.mode == "max" else 1
    return sorted(rows, key=lambda r: (math.isnan(r["metric_final"]), sign * (0 if math.isnan(r["metric_final"])
                                                                               else r["metric_final"])))


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def pareto_front(points: list[tuple[float, float]], maximise: bool) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and metric, by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1] if maximise else points[i][1]))
    front, best = [], None
    for i in order:
        value = points[i][1]
        if best is None or (value > best if maximise else value < best):
            front.append(i)
            best = value
    return front


def pareto_figure(rows: list[dict[str, Any]], metric: str, maximise: bool, budget_mib: float) -> Figure:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    scored = [r for r in rows if not math.isnan(r["metric_final"])]
    for ax, cost, label in zip(fig.subplots(1, 2), ("activation_memory_mib", "seconds"),
                               ("activation memory per training step (MiB)", "wall time (s)")):
        points = [(r[cost], r["metric_final"]) for r in scored]
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", zorder=3)
        for r, (x, y) in zip(scored, points):
            ax.annotate(r["trial"].removeprefix("trial-"), (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        front = pareto_front(points, maximise)
        if front:
            ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:orange",
                    drawstyle="steps-post", label="Pareto front")
        if cost == "activation_memory_mib":
            skipped = [r["activation_memory_mib"] for r in rows if r["status"] == "over_budget"]
            if skipped:
                ax.scatter(skipped, [min((p[1] for p in points), default=0.0)] * len(skipped), marker="x",
                           color="tab:red", label="over budget (not launched)")
            if math.isfinite(budget_mib):
                ax.axvline(budget_mib, color="tab:red", linestyle="--", linewidth=1, label="budget")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} (final epoch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return fig


def best_config(base: PipelineConfig, scfg: Any, row: dict[str, Any], overrides: dict[str, Any]) -> PipelineConfig:
    """The best trial's config, named `<sweep>-best` under the base run storage (a fresh `lofi train`)."""
    cfg = scfg.trial_config(base, overrides, row["trial"])
    return replace(cfg, [("run.storage", base.run.storage), ("run.name", f"{scfg.name}-best")])


def table_lines(rows: list[dict[str, Any]], metric: str) -> list[str]:
    def fmt(value: float, spec: str) -> str:
        return "-" if isinstance(value, float) and math.isnan(value) else format(value, spec)

    width = max(len("overrides"), *(len(r["overrides"]) for r in rows))
    lines = [f"{'trial':<10} {'status':<13} {metric + ' %':>18} {'best %':>7} {'epochs':>6} {'act. MiB':>9} "
             f"{'seconds':>8}  {'overrides':<{width}}"]
    for r in rows:
        final = r["metric_final"] * 100 if "mAP" in metric else r["metric_final"]
        best = r["metric_best"] * 100 if "mAP" in metric else r["metric_best"]
        lines.append(f"{r['trial']:<10} {r['status']:<13} {fmt(final, '.2f'):>18} {fmt(best, '.2f'):>7} "
                     f"{r['epochs']:>6} {fmt(r['activation_memory_mib'], '.1f'):>9} {fmt(r['seconds'], '.0f'):>8}  "
                     f"{r['overrides']:<{width}}")
    return lines


def finish(scfg: Any, base: PipelineConfig, trials: list[dict[str, Any]], grid: Any, parent: Any,
           seconds: float, phase_seconds: dict[str, float]) -> dict[str, Any]:
    """Write and log the sweep's results; close trial runs that ASHA's stop left RUNNING."""
    from pipelines.tracking import close_running_children, mlflow_ui_command
    from pipelines.tracking.review import child_runs, end_run, tag_run

    overrides = {trial["trial"]: trial["overrides"] for trial in trials}
    for trial in trials:
        trial["epochs"] = scfg.trial_config(base, trial["overrides"], trial["trial"]).train.epochs
    runs = child_runs(base.tracking, parent.run_id) if parent.run_id else {}
    rows = trial_rows(scfg, trials, grid, runs)
    out = scfg.dir()
    write_csv(rows, out / "results.csv")
    fig = pareto_figure(rows, scfg.search.metric, scfg.search.mode == "max", scfg.search.budget_bytes() / 2**20)
    fig.savefig(out / "pareto.png", dpi=100)
    summary: dict[str, Any] = {"sweep": scfg.name, "out_dir": str(out), "seconds": seconds,
                               "phase_seconds": phase_seconds, "metric": scfg.search.metric,
                               "trials": rows, "best": None, "mlflow": {"parent_run_id": parent.run_id,
                                                                        "ui": mlflow_ui_command(base.tracking)}}
    scored = [r for r in rows if not math.isnan(r["metric_final"])]
    if scored:
        summary["best"] = scored[0]
        dump_yaml(best_config(base, scfg, scored[0], overrides[scored[0]["trial"]]), out / "best_config.yaml")
        parent.log_artifact(out / "best_config.yaml")
        parent.log_metrics({f"best_{scfg.search.metric}": scored[0]["metric_final"]}, step=0)
        parent.set_tags({"lofi.best_trial": scored[0]["trial"]})
    for row in rows:
        run = runs.get(f"{row['trial']}/train")
        if run is None:
            continue
        tag_run(base.tracking, run["run_id"], {"lofi.sweep": scfg.name, "lofi.trial": row["trial"],
                                               "lofi.trial_status": row["status"],
                                               "lofi.overrides": json.dumps(overrides[row["trial"]], default=str)})
        if row["status"] == "stopped_early" and run["status"] != "KILLED":  # killed mid-run, maybe mid-exception
            end_run(base.tracking, run["run_id"], "KILLED", STOPPED)
    if parent.run_id:  # ASHA stops a trial by killing its process: nobody ended its run
        close_running_children(base.tracking, parent.run_id, reason=STOPPED)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    parent.log_artifact(out / "results.csv")
    parent.log_figure(fig, "pareto.png")
    parent.log_artifact(out / "trials.json")
    print("\n".join(["", f"lofi sweep {scfg.name}: done in {seconds:.0f} s; trials sorted by {scfg.search.metric}:",
                     *table_lines(rows, scfg.search.metric), "",
                     f"results: {out}/results.csv, pareto.png" + (", best_config.yaml (lofi train --config it)"
                                                                  if scored else ""),
                     f"MLflow: parent run {parent.run_id} ('sweep/{scfg.name}', trials are its child runs); browse "
                     f"with:", f"  {mlflow_ui_command(base.tracking)}"]), flush=True)
    return summary
