"""The MLflow calls themselves: clients, MLflow's HTTP settings, experiments, batches, artifacts,
models, closing runs a killed job left RUNNING, and MLflow's system-metrics sampler.

Everything here may raise; pipelines.tracking.queue decides what to queue or drop.
MLflow is imported on first use: it costs seconds, and disabled trackers never need it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lofi.errors import LofiError
from pipelines.tracking.config import TrackingWarning, artifact_location

# Server-side codes that a later try may not see again (overload, a locked database).
_TRANSIENT_REST_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
_CLIENTS: dict[str, Any] = {}
_MONITOR_STOP_SEC = 5.0  # how long the end of training waits for the system-metrics sampler to stop
_log = logging.getLogger(__name__)


def mlflow_module() -> Any:
    import mlflow
    import mlflow.pytorch  # noqa: F401  (`import mlflow` alone leaves the flavour unloaded)

    from pipelines.logs import reroute_loggers

    reroute_loggers()  # importing mlflow gives its logger a terminal handler; a command's log file takes it back
    return mlflow


def client(uri: str) -> Any:
    """One client per URI per process: a SQLite store checks its schema on first use."""
    if uri not in _CLIENTS:
        _CLIENTS[uri] = mlflow_module().MlflowClient(tracking_uri=uri)
    return _CLIENTS[uri]


def configure_http(retries: int, timeout_sec: float) -> None:
    """MLflow's own HTTP retry and timeout settings, for this process, set when a tracker starts.

    MLflow reads them from the environment on every request (its system-metrics thread too),
    so they are set once, never around a call. Its defaults (7 retries with backoff from 2 s to
    minutes, 120 s per request, waiting out a server's Retry-After) would stall training for
    minutes on a dead server: here a failed request is retried `retries` times (MLflow allows
    at most _MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT, 10) after 0 s, 2 s, 4 s, ... (urllib3's
    backoff with MLflow's integer factor 1), each request waits at most `timeout_sec`.
    """
    from mlflow import environment_variables as env

    env.MLFLOW_HTTP_REQUEST_MAX_RETRIES.set(min(retries, env._MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT.get()))
    env.MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.set(1)
    env.MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.set(0.0)
    env.MLFLOW_HTTP_REQUEST_TIMEOUT.set(math.ceil(timeout_sec))  # MLflow takes whole seconds
    env.MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER.set(False)  # a Retry-After of minutes would stall training


def reachable(uri: str, timeout_sec: float) -> bool:
    """Whether a tracking server answers: one GET /health, no retries, at most `timeout_sec`.
    Any answer but an overload counts. True for a database URI (no server to ask)."""
    if not uri.startswith(("http://", "https://")):
        return True
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:  # MLflow's request with its auth and TLS settings, with the retries given here, not the process's
        http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0, timeout=math.ceil(timeout_sec),
                     respect_retry_after_header=False)
    except Exception as err:
        return not is_transient(err)
    return True


@contextlib.contextmanager
def tracking_uri_for(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` for `mlflow.pytorch.log_model`, which reads
    only that one; then back to $MLFLOW_TRACKING_URI as it was (MLflow's own `_use_tracking_uri`
    restores its previous URI, and unsets a variable the user set when that was None)."""
    mlflow = mlflow_module()
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # also sets the variable
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)  # None unsets it, as it was


def is_transient(err: BaseException) -> bool:
    """Network trouble, server overload or a locked database: worth retrying later.

    Anything else (a refused value, a deleted experiment, a model that does not export) would
    fail the same way again, so the tracker drops that one call with a warning instead.
    """
    seen: BaseException | None = err
    for _ in range(8):  # MLflow wraps request errors; the cause is a few links down
        if seen is None:
            return False
        if isinstance(seen, (ConnectionError, TimeoutError)):
            return True
        if type(seen).__module__.split(".")[0] in ("requests", "urllib3"):
            return True
        if type(seen).__name__ == "RestException" and getattr(seen, "error_code", None) in _TRANSIENT_REST_CODES:
            return True
        if "database is locked" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def experiment_id(mlflow_client: Any, uri: str, name: str, artifact_root: str | None = None) -> str:
    """The experiment's id, created if it does not exist, with its artifacts under `artifact_root`
    (tracking.artifact_location) or else beside a SQLite file."""
    from mlflow.exceptions import MlflowException

    wanted = artifact_location(uri, name, artifact_root)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return mlflow_client.create_experiment(name, artifact_location=wanted)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another rank or stage created it first
                raise
            experiment = mlflow_client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise LofiError(
            f"MLflow experiment {name!r} (id {experiment.experiment_id}) is deleted; restore it with "
            f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` or set tracking.experiment to a new name"
        )
    if artifact_root and _plain(experiment.artifact_location) != _plain(wanted):
        warnings.warn(f"tracking.artifact_location: MLflow experiment {name!r} already exists with its artifacts in "
                      f"{experiment.artifact_location}, which it keeps (not {wanted}); set tracking.experiment to a new "
                      "name to put artifacts there", TrackingWarning, stacklevel=2)
    return experiment.experiment_id


def _plain(artifact_location: str) -> str:
    """A location as compared: MLflow stores local folders as file:// URIs."""
    return artifact_location.removeprefix("file://").rstrip("/")


def param_value(value: Any) -> str:
    """A config value as MLflow stores it; too long ones are cut (config.yaml keeps them whole).

    MLflow's store cuts a too long value itself (unless MLFLOW_TRUNCATE_LONG_VALUES=false, which
    refuses it), but a tracking server first refuses a whole log_batch request over
    MAX_BATCH_LOG_REQUEST_SIZE (1 MB), which up to 100 long values in one batch exceed: cut here,
    to MLflow's own limit, every batch fits.
    """
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    if len(text) <= MAX_PARAM_VAL_LENGTH:
        return text
    note = f"...[cut: {len(text)} chars; full value in config.yaml]"
    return text[: MAX_PARAM_VAL_LENGTH - len(note)] + note


def log_batch(mlflow_client: Any, run_id: str, params: list[tuple[str, str]] = (),
              metrics: list[tuple[str, float, int, int]] = (), tags: list[tuple[str, str]] = ()) -> None:
    """MlflowClient.log_batch splits them into requests within MLflow's batch limits (and its store
    cuts too long tags); `synchronous=True` so MLflow's async-logging mode never starts a thread."""
    from mlflow.entities import Metric, Param, RunTag

    mlflow_client.log_batch(
        run_id,
        metrics=[Metric(key, value, timestamp_ms, step) for key, value, timestamp_ms, step in metrics],
        params=[Param(key, value) for key, value in params],
        tags=[RunTag(key, value) for key, value in tags],
        synchronous=True,
    )


def json_default(value: Any) -> Any:
    """numpy and torch scalars/arrays as plain numbers; anything else as its text."""
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def plain_json(data: Any) -> Any:
    """`data` as plain JSON values (numpy/torch as numbers), a copy: later changes do not leak in."""
    return json.loads(json.dumps(data, default=json_default))


def upload_path(mlflow_client: Any, run_id: str, path: Path, artifact_path: str | None) -> None:
    if path.is_dir():
        mlflow_client.log_artifacts(run_id, str(path), artifact_path=artifact_path)
    else:
        mlflow_client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def tensor_signature(example: np.ndarray, output: Any, dynamic_dims: tuple[int, ...]) -> Any:
    """Input spec with -1 on the dims that vary (torch.export keeps those dynamic); output all -1."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    shape = tuple(-1 if d in dynamic_dims else n for d, n in enumerate(example.shape))
    outputs = None
    if isinstance(output, torch.Tensor) and output.dtype.is_floating_point and output.dtype != torch.bfloat16:
        out_dtype = np.dtype(str(output.dtype).removeprefix("torch."))  # numpy has no bfloat16
        outputs = Schema([TensorSpec(out_dtype, (-1,) * output.dim())])
    return ModelSignature(inputs=Schema([TensorSpec(example.dtype, shape)]), outputs=outputs)


def pip_requirements(serialization_format: str) -> list[str]:
    """Explicit requirements: MLflow's inference would import-scan the model (slow) instead."""
    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    return reqs + (["cloudpickle"] if serialization_format == "pickle" else [])


def log_model(mlflow_client: Any, uri: str, run_id: str, exp_id: str, model: torch.nn.Module, name: str,
              example: torch.Tensor | None, dynamic_dims: tuple[int, ...], register_as: str | None,
              serialization_format: str) -> str:
    """Log `model` (CPU, eval mode) with mlflow.pytorch; return its `models:/` URI.

    The LoggedModel is created in the run's experiment first: left to itself, log_model files
    it under the process's "active" experiment (Default), whose artifacts land in ./mlruns.
    "pt2" (torch.export, loads without unpickling) needs an example input; "pickle" loads only
    where the model's classes import and MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true.
    """
    mlflow = mlflow_module()
    kwargs: dict[str, Any] = {}
    if serialization_format == "pt2":
        assert example is not None
        for dim in dynamic_dims:
            if example.shape[dim] == 1:  # torch.export fixes size-1 dims to 1: give it two to keep the dim free
                example = torch.cat([example, example], dim=dim)
        array = example.numpy()
        with torch.no_grad():
            output = model(example)
        kwargs = {"input_example": array, "signature": tensor_signature(array, output, dynamic_dims)}
    logged = mlflow_client.create_logged_model(experiment_id=exp_id, name=name, source_run_id=run_id)
    with tracking_uri_for(uri):
        info = mlflow.pytorch.log_model(
            model, name=name, model_id=logged.model_id, run_id=run_id, serialization_format=serialization_format,
            pip_requirements=pip_requirements(serialization_format), registered_model_name=register_as,
            await_registration_for=0, **kwargs,
        )
    if register_as is not None and info.registered_model_version is not None:
        return f"models:/{register_as}/{info.registered_model_version}"
    return info.model_uri


def cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A CPU copy in eval mode, made without a second copy on the GPU; training keeps the original."""
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    memo: dict[int, Any] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        cpu = tensor.detach().to("cpu", copy=True)
        memo[id(tensor)] = torch.nn.Parameter(cpu, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else cpu
    return copy.deepcopy(model, memo).eval()


def _quoted(value: str) -> str | None:
    """`value` as a search-filter string constant; None when it holds both quote characters."""
    if "'" not in value:
        return f"'{value}'"
    return f'"{value}"' if '"' not in value else None


def close_running(mlflow_client: Any, experiment_id: str, reason: str, run_name: str | None = None,
                  parent_run_id: str | None = None, status: str = "KILLED") -> int:
    """End the RUNNING runs of the experiment with this name and/or parent as `status`, tagged
    lofi.closed_by=reason; returns how many. Without a parent, only top-level runs of that name
    match. A closed run's own RUNNING children are closed with it: their job died with it."""
    if run_name is None and parent_run_id is None:
        raise ValueError("close_running needs a run name or a parent run id; it would close every top-level run")
    terms = ["attributes.status = 'RUNNING'"]
    for key, value in (("mlflow.runName", run_name), ("mlflow.parentRunId", parent_run_id)):
        if value is not None:
            constant = _quoted(value)
            if constant is None:
                return 0  # not expressible as a filter: leave the runs alone rather than guess
            terms.append(f"tags.`{key}` = {constant}")
    runs = mlflow_client.search_runs([experiment_id], filter_string=" and ".join(terms), max_results=1000)
    closed = 0
    for run in runs:
        if parent_run_id is None and "mlflow.parentRunId" in run.data.tags:
            continue
        end_run(mlflow_client, run.info.run_id, status, reason)
        closed += 1 + close_running(mlflow_client, experiment_id, reason, parent_run_id=run.info.run_id, status=status)
    return closed


def end_run(mlflow_client: Any, run_id: str, status: str, reason: str) -> None:
    """End a run its own process did not end (or ended otherwise), tagged lofi.closed_by=reason."""
    log_batch(mlflow_client, run_id, tags=[("lofi.closed_by", reason)])
    mlflow_client.set_terminated(run_id, status)  # end time: now


def close_children(mlflow_client: Any, parent_run_id: str, experiment: str, status: str, reason: str) -> int:
    """close_running for the children of a run, in its experiment and in `experiment` (by name)."""
    experiments = {mlflow_client.get_run(parent_run_id).info.experiment_id}
    named = mlflow_client.get_experiment_by_name(experiment)
    if named is not None:
        experiments.add(named.experiment_id)
    return sum(close_running(mlflow_client, exp, reason, parent_run_id=parent_run_id, status=status)
               for exp in sorted(experiments))


def start_system_metrics(uri: str, run_id: str) -> Any | None:
    """MLflow's sampler of CPU, memory, disk, network (and GPU, with pynvml) logging system/* metrics
    to the run every 10 s, started; None without psutil, which it needs (not a lofi dependency)."""
    if importlib.util.find_spec("psutil") is None:
        _log.info("lofi tracking: no system metrics (pip install psutil, and pynvml for GPUs, to log them)")
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=uri)
    monitor.start()
    return monitor


def stop_system_metrics(monitor: Any) -> None:
    """Stop the sampler; waits at most a few seconds (its last send to a dead server takes MLflow's
    retries and timeouts), then leaves the daemon thread to die with the process."""
    import threading

    stopper = threading.Thread(target=monitor.finish, daemon=True, name="lofi-stop-system-metrics")
    stopper.start()
    stopper.join(_MONITOR_STOP_SEC)
