"""The one package that talks to MLflow: runs, params, metrics, artifacts, models.

    from pipelines.tracking import Tracker, TrackingConfig

    with Tracker.start(cfg.tracking, "pipeline") as parent:          # driver
        with parent.child("train") as run:                            # or, in a Ray worker:
            run.log_config(cfg)                                       # Tracker.attach(cfg, run_id,
            run.log_metrics({"loss": 0.3, "lr": 1e-3}, step=epoch)    #   enabled=rank == 0)
            run.log_figure(plots.training_curves(history), "plots/curves.png")
            run.log_torch_model(encoder, "encoder", input_example=frames, dynamic_dims=(0, 1))

Tracking URI: `tracking.tracking_uri`, else $MLFLOW_TRACKING_URI (an `mlflow server`), else
sqlite:///mlflow.db in the working directory with artifacts in ./mlartifacts beside it
(MLflow 3 refuses the old ./mlruns file store). The stages of one pipeline run are child runs
of one parent run (tag mlflow.parentRunId). A training stage's run is made on the driver; its
rank-0 worker attaches to it (`Tracker.attach`) and logs each epoch live; other ranks pass
enabled=False and never import MLflow.

Failures: no method raises. An unreachable server costs the training loop MLflow's own few
HTTP retries once (`tracking.retries`, `tracking.timeout_sec`, set for the process when a
tracker starts), then calls are queued in memory and sent when it answers again; what is still
queued at `end()` is dropped with a warning (details in pipelines/tracking/queue.py).
Runs always end: FINISHED, FAILED (exception), KILLED (KeyboardInterrupt, or a process that
exits without ending them). A job killed outright (SIGKILL, a lost node, Tune's ASHA) leaves
its runs RUNNING: the next run of the same name and parent ends them as KILLED, and
`close_running_children(cfg, parent_run_id)` ends a parent's (a sweep's) left-over children.
Only this package imports mlflow, and only when a run starts.
"""

from pipelines.tracking.config import (
    TrackingConfig,
    TrackingWarning,
    mlflow_ui_command,
    resolve_tracking_uri,
)
from pipelines.tracking.review import close_running_children
from pipelines.tracking.tracker import Tracker

__all__ = ["Tracker", "TrackingConfig", "TrackingWarning", "close_running_children", "mlflow_ui_command",
           "resolve_tracking_uri"]
