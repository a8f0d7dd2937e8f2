"""Where runs go: the tracking config, the resolved tracking URI, and how to browse it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from lofi.config import ConfigError
from pipelines.storage import in_ray_job, location, uri_problem

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACTS_DIR = "mlartifacts"  # beside the SQLite file, as `mlflow server` names its own


class TrackingWarning(UserWarning):
    """MLflow could not be reached or refused a call; training goes on (see pipelines.tracking)."""


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str = "lofi"
    register_model_as: str | None = None  # registered model name for the trained encoder; None: log, do not register
    # where a new experiment's artifacts go: <this>/<experiment>, a folder or an object-store URI (s3://bucket/prefix,
    # gs://...; MLflow uploads with boto3 / google-cloud-storage, endpoint MLFLOW_S3_ENDPOINT_URL or AWS_ENDPOINT_URL).
    # None: mlartifacts/ beside a SQLite database, or the tracking server's --default-artifact-root.
    # An experiment keeps the location it was created with.
    artifact_location: str | None = None
    enabled: bool = True  # false: every Tracker is a no-op (as on non-zero ranks)
    # MLflow's HTTP retries of a failed request (0 s, 2 s, 4 s, ... apart; MLflow allows at most 10) before the
    # call is queued, and its limit per request (connect, each read; whole seconds, rounded up). A tracker sets
    # them for its process when it starts: MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT.
    retries: int = 3
    timeout_sec: float = 5.0
    offline_retry_sec: float = 30.0  # after a failure, calls only queue for this long, then one try flushes the queue

    def __post_init__(self) -> None:
        problem = _uri_problem(self.tracking_uri or DEFAULT_TRACKING_URI)
        if problem:
            raise ValueError(f"tracking_uri: {problem}")
        if not self.experiment.strip():
            raise ValueError("experiment must be a non-empty name, e.g. lofi")
        problem = self.artifact_location is not None and uri_problem(self.artifact_location)
        if problem:
            raise ValueError(f"artifact_location: {problem}")
        if self.register_model_as is not None and not self.register_model_as.strip():
            raise ValueError("register_model_as must be a name or null (no registration)")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.timeout_sec <= 0:
            raise ValueError(f"timeout_sec must be > 0, got {self.timeout_sec}")
        if self.offline_retry_sec < 0:
            raise ValueError(f"offline_retry_sec must be >= 0, got {self.offline_retry_sec}")


def _uri_problem(uri: str) -> str | None:
    """What MLflow 3 refuses (the file store), said with the fix, so it fails before any run starts."""
    if uri.startswith("file:") or ("://" not in uri and not uri.startswith(("sqlite:", "databricks"))):
        return (
            f"{uri!r} is a local folder (MLflow's file store), which MLflow 3 refuses; "
            "use a SQLite file such as sqlite:///mlflow.db or a tracking server URL such as http://host:5000"
        )
    return None


def _absolute_sqlite(uri: str) -> str:
    """`sqlite:///rel.db` -> `sqlite:////abs/rel.db`: Ray workers run in other directories."""
    match = re.fullmatch(r"sqlite:///([^?]*)(\?.*)?", uri)
    if not match or match.group(1).startswith("/") or match.group(1) in ("", ":memory:"):
        return uri
    return f"sqlite:///{Path(match.group(1)).absolute()}{match.group(2) or ''}"


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; SQLite paths made absolute.

    Resolve on the driver and pass the result to workers
    (`dataclasses.replace(cfg, tracking_uri=resolve_tracking_uri(cfg))`): a relative SQLite
    path would otherwise land in each worker's own working directory.
    """
    if cfg.tracking_uri:
        uri, where = cfg.tracking_uri, "tracking.tracking_uri"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri, where = os.environ["MLFLOW_TRACKING_URI"], "environment variable MLFLOW_TRACKING_URI"
    else:
        uri, where = DEFAULT_TRACKING_URI, "default tracking URI"
    problem = _uri_problem(uri)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    resolved = _absolute_sqlite(uri)
    db = sqlite_path(resolved)
    if db is not None and in_ray_job() and db.resolve().is_relative_to(Path.cwd().resolve()):
        raise ConfigError(
            f"{where}: {uri} puts the MLflow database in {db}, inside the working directory of this Ray job, which "
            "Ray deletes when the job ends; set tracking.tracking_uri (or MLFLOW_TRACKING_URI) to a tracking server "
            "(http://host:5000) or to a SQLite file on storage that outlives the job (sqlite:////shared/mlflow.db)")
    return resolved


def sqlite_path(uri: str) -> Path | None:
    """The database file of an absolute `sqlite:////...` URI, else None."""
    match = re.fullmatch(r"sqlite:///(/[^?]*)(\?.*)?", uri)
    return Path(match.group(1)) if match else None


def artifact_location(uri: str, experiment: str, root: str | None = None) -> str | None:
    """Where a new experiment's artifacts go: `<root>/<experiment>` (tracking.artifact_location, a
    folder or an object-store URI), else beside a SQLite database; None: a server picks its own."""
    folder = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)
    if root:
        return str(location(root, "tracking.artifact_location", output=True) / folder)
    db = sqlite_path(uri)
    if db is None:
        return None
    return str(db.parent / ARTIFACTS_DIR / folder)


def mlflow_ui_command(cfg: TrackingConfig) -> str:
    """How to browse the runs: the `mlflow ui` line for a database, or the server's address."""
    uri = resolve_tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"
