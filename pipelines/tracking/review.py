"""Reading and tagging runs after the fact: a sweep finds its trials' child runs and marks them.

Unlike `Tracker`, these calls act on runs the caller did not open (a Tune trial's stage-2 run
is opened in the trial's own process). `child_runs` and `tag_run` may raise: they run once, at
the end of a job, where a clear error beats a silent gap; `close_running_children` never raises.
Nothing here is called from a training loop.
"""

from __future__ import annotations

import warnings
from typing import Any

from pipelines.tracking import backend
from pipelines.tracking.config import TrackingConfig, TrackingWarning, resolve_tracking_uri
from pipelines.tracking.tracker import STATUSES


def child_runs(cfg: TrackingConfig, parent_run_id: str) -> dict[str, dict[str, Any]]:
    """run name -> {run_id, status, metrics, tags} of the runs whose parent is `parent_run_id`
    (the newest of each name: a trial run again after a resume replaces its earlier run)."""
    client = backend.client(resolve_tracking_uri(cfg))
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    return {run.info.run_name: {"run_id": run.info.run_id, "status": run.info.status, "metrics": dict(run.data.metrics),
                                "tags": dict(run.data.tags)} for run in runs}


def tag_run(cfg: TrackingConfig, run_id: str, tags: dict[str, Any]) -> None:
    client = backend.client(resolve_tracking_uri(cfg))
    backend.log_batch(client, run_id, tags=[(str(k), str(v)) for k, v in tags.items()])


def close_running_children(cfg: TrackingConfig, parent_run_id: str, status: str = "KILLED",
                           reason: str = "its job was stopped without ending it") -> int:
    """End the RUNNING child runs of `parent_run_id` (and their RUNNING children) as `status`,
    tagged lofi.closed_by=reason; returns how many. For the end of a sweep: Ray Tune's ASHA stops
    a trial by killing its actor, so the trial's runs never end. Searches the parent's experiment
    and cfg.experiment. Never raises: an unreachable MLflow gives 0 and a warning."""
    if not cfg.enabled:
        return 0
    try:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        uri = resolve_tracking_uri(cfg)
        backend.configure_http(cfg.retries, cfg.timeout_sec)  # as a tracker's: a dead server costs seconds
        return backend.close_children(backend.client(uri), parent_run_id, cfg.experiment, status, reason)
    except Exception as err:
        warnings.warn(f"lofi tracking: the children of run {parent_run_id} were not closed: "
                      f"{type(err).__name__}: {err}", TrackingWarning, stacklevel=2)
        return 0


def end_run(cfg: TrackingConfig, run_id: str, status: str, reason: str) -> None:
    """Mark a run its own process ended otherwise or not at all (a trial ASHA stopped: its process
    is killed, sometimes mid-exception, which would read FAILED), tagged lofi.closed_by=reason."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    backend.end_run(backend.client(resolve_tracking_uri(cfg)), run_id, status, reason)
