"""Tracker: one MLflow run whose methods never raise into the training loop.

Every logging call builds its payload now (later changes by the caller do not leak in; a figure
is rendered when sent, by MLflow's log_figure) and goes through the run's offline queue
(pipelines.tracking.queue): sent at once when MLflow answers, after MLflow's own few short HTTP
retries; held in order while it does not, and sent when it answers again. `end()` sends the whole queue once more; what still fails is dropped with a
warning that counts it, and the run may then stay RUNNING on that server. A call MLflow refuses
(a changed param, a deleted experiment) is dropped with a warning. The one error `start` raises
is a config the user must fix before anything runs (a LofiError from resolving the tracking URI,
e.g. a SQLite file inside a Ray job's temporary working directory).

A killed job leaves its runs RUNNING: creating a run first ends, as KILLED, the RUNNING runs of
the same name and parent in its experiment (and their RUNNING children), tagged lofi.closed_by.
So two live runs must not share a name and parent (a rerun of a stage's run.name is meant to
replace the old one). `review.close_running_children` does the same for the children of one run.

Nothing here touches checkpoints: they are written by the training stage on its own.
Not thread-safe: one tracker per process (rank 0) and thread, as the stages use it.
"""

from __future__ import annotations

import atexit
import functools
import io
import logging
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from lofi.config import flatten, to_dict
from lofi.errors import LofiError
from pipelines.tracking import backend
from pipelines.tracking.config import TrackingConfig, TrackingWarning, resolve_tracking_uri
from pipelines.tracking.queue import Call, CallQueue

STATUSES = ("FINISHED", "FAILED", "KILLED")
_REPLACED = "a new run of the same name started"  # the lofi.closed_by tag of a run closed by its rerun
_OPEN: set[Tracker] = set()  # runs to end as KILLED if the process exits without ending them
_log = logging.getLogger(__name__)


def _never_raises(method: Callable) -> Callable:
    """The tracker's promise: a no-op when inactive, and a warning instead of any exception."""

    @functools.wraps(method)
    def guarded(self: Tracker, *args: Any, **kwargs: Any) -> None:
        if not self.active:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as err:
            self._warn(f"{method.__name__} failed and was skipped: {type(err).__name__}: {err}")
            return None

    return guarded


_STOP_SIGNALLED = threading.Event()


def stop_on_sigterm() -> None:
    """SIGTERM (`ray job stop`, a scheduler's preemption) ends this process through SystemExit(143),
    and the runs it leaves end KILLED, not FAILED. Install after `ray.init`, whose own handler it
    replaces (Ray's exits with a code that a stage's cleanup may turn into another exception).
    Main thread only, as Python's signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        _STOP_SIGNALLED.set()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _stopped(exc_type: type[BaseException], exc: BaseException | None) -> bool:
    """Ctrl-C, or a stop signal (whatever exception it became on the way out)."""
    return issubclass(exc_type, KeyboardInterrupt) or _STOP_SIGNALLED.is_set() or (
        issubclass(exc_type, SystemExit) and getattr(exc, "code", None) in (signal.SIGTERM, 128 + signal.SIGTERM))


def _end_open_runs() -> None:
    for tracker in list(_OPEN):
        tracker.end("KILLED")


class Tracker:
    """A context manager around one MLflow run; see the module docstring for failures.

    `Tracker.start(cfg, "train", parent_run_id=...)` opens a run (a child run when given its
    parent's id, e.g. passed to a Ray worker); `tracker.child("eval")` opens a child run of
    this one; `Tracker.attach(cfg, run_id)` logs to a run that exists (the stage's run, from
    the rank-0 Ray worker) and never creates or ends it. `enabled=False` (non-zero ranks) gives a
    tracker that does nothing and never imports MLflow. Leaving the `with` block ends the run
    FINISHED, FAILED on an exception (its message in the tag `lofi.error`) or KILLED when the
    process was stopped (KeyboardInterrupt; SIGTERM, as `ray job stop` sends, which Ray's driver
    turns into SystemExit(15)); an attached tracker only sends what is queued.
    """

    def __init__(self, cfg: TrackingConfig, run_name: str, parent_run_id: str | None = None,
                 tags: dict[str, Any] | None = None, enabled: bool = True, parent: Tracker | None = None):
        self.cfg = cfg
        self.run_name = run_name
        self.run_id: str | None = None  # None until MLflow created the run (or when disabled)
        self.logged_models: list[str] = []  # models:/ URIs of the models logged so far
        self.enabled = cfg.enabled and enabled
        self._parent_run_id = parent_run_id
        self._parent = parent
        self._tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self._uri = ""
        self._experiment_id = ""
        self._queue = CallQueue(run_name, cfg.offline_retry_sec, self._reachable, self._warn)
        self._ended = False
        self._attach_id: str | None = None  # attached: the existing run's id (set before _open)
        self._system_metrics = False  # attached: also run MLflow's system-metrics sampler
        self._monitor: Any = None  # that sampler, once started

    @classmethod
    def start(cls, cfg: TrackingConfig, run_name: str, parent_run_id: str | None = None,
              tags: dict[str, Any] | None = None, enabled: bool = True) -> Tracker:
        tracker = cls(cfg, run_name, parent_run_id=parent_run_id, tags=tags, enabled=enabled)
        tracker._open()
        return tracker

    @classmethod
    def attach(cls, cfg: TrackingConfig, run_id: str, run_name: str = "", system_metrics: bool = False,
               enabled: bool = True) -> Tracker:
        """Log to the existing run `run_id` with `start`'s queue and promises, but never create, end
        or tag it with errors; `end()` sends what is queued and detaches. `system_metrics`: also run
        MLflow's system/* sampler (CPU, memory, disk, network; GPU with pynvml) when psutil imports."""
        tracker = cls(cfg, run_name or run_id, enabled=enabled)
        tracker._attach_id, tracker._system_metrics = run_id, system_metrics
        tracker._open()
        return tracker

    def logged_steps(self, key: str) -> set[int] | None:
        """The steps at which the run holds metric `key`, whoever logged them; None when that is not
        known (no run yet, calls still queued or offline, MLflow unreachable after its retries)."""
        if not self.active or self.run_id is None or self._queue.pending:
            return None
        try:
            return {m.step for m in self._client().get_metric_history(self.run_id, key)}
        except Exception as err:
            self._warn(f"could not read metric {key!r}: {type(err).__name__}: {err}")
            return None

    def child(self, run_name: str, tags: dict[str, Any] | None = None) -> Tracker:
        """A run nested under this one (tag mlflow.parentRunId), with the same config."""
        child = Tracker(self.cfg, run_name, tags=tags, enabled=self.enabled, parent=self)
        child._open()
        return child

    @property
    def active(self) -> bool:
        return self.enabled and not self._ended and not self._queue.dead

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        clean = exc_type is None or (issubclass(exc_type, SystemExit) and getattr(exc, "code", 1) in (0, None))
        if clean or self._attach_id is not None:  # an attached run's owner records how it ended
            self.end("FINISHED")
            return False
        self.set_tags({"lofi.error": f"{exc_type.__name__}: {exc}"})
        self.end("KILLED" if _stopped(exc_type, exc) else "FAILED")
        return False  # the exception goes on

    # ---- logging: each builds its payload now (a figure renders when sent) ----

    @_never_raises
    def log_config(self, cfg: Any) -> None:
        """Every config value as a param (dotted key), and the resolved YAML as config.yaml."""
        params = [(key, backend.param_value(value)) for key, value in flatten(to_dict(cfg)).items()]
        # one call: MlflowClient.log_batch sends them in requests of MLflow's batch size
        self._queue.submit(Call(f"log_config {len(params)} params", functools.partial(self._send_batch, params=params)))
        text = yaml.safe_dump(to_dict(cfg), sort_keys=False)  # as lofi.config.dump_yaml writes a config file
        self._queue.submit(Call("log_artifact config.yaml", functools.partial(self._send_text, text, "config.yaml")))

    @_never_raises
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One value per key at `step` (epoch or iteration), timestamped now; non-numbers skipped."""
        now_ms = int(time.time() * 1000)
        rows = []
        for key, value in metrics.items():
            try:
                rows.append((str(key), float(value), now_ms, int(step)))
            except (TypeError, ValueError):
                self._warn(f"metric {key!r} at step {step} is {value!r}, not a number; skipped")
        self._queue.submit(Call(f"log_metrics step {step}", functools.partial(self._send_batch, metrics=rows)))

    @_never_raises
    def set_tags(self, tags: dict[str, Any]) -> None:
        rows = [(str(k), str(v)) for k, v in tags.items()]
        self._queue.submit(Call(f"set_tags {sorted(tags)}", functools.partial(self._send_batch, tags=rows)))

    @_never_raises
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or folder, uploaded under `artifact_path`; it must exist until the run ends."""
        source = Path(path)
        if not source.exists():
            self._warn(f"log_artifact: {source} does not exist; nothing logged")
            return
        self._queue.submit(Call(f"log_artifact {source}", functools.partial(self._send_path, source, artifact_path)))

    @_never_raises
    def log_dict(self, data: Any, name: str) -> None:
        """JSON artifact `name` (e.g. predictions.json, eval/report.json); numpy/torch values as numbers
        (MlflowClient.log_dict, which writes YAML for a name ending .yaml/.yml)."""
        send = functools.partial(self._send_dict, backend.plain_json(data), name)
        self._queue.submit(Call(f"log_artifact {name}", send))

    @_never_raises
    def log_figure(self, fig: Any, name: str) -> None:
        """A matplotlib figure as image artifact `name` (format from its suffix, PNG if none), rendered
        when it is sent (MlflowClient.log_figure): hand over a figure that is not changed afterwards."""
        if not Path(name).suffix:
            name += ".png"
        self._queue.submit(Call(f"log_artifact {name}", functools.partial(self._send_figure, fig, name)))

    @_never_raises
    def log_bytes(self, data: bytes, name: str) -> None:
        """Bytes as artifact `name` (a file a stage wrote, as it stored it)."""
        self._queue.submit(Call(f"log_artifact {name}", functools.partial(self._send_bytes, bytes(data), name)))

    @_never_raises
    def log_torch_model(self, model: torch.nn.Module, name: str, input_example: torch.Tensor | None = None,
                        register_as: str | None = None, dynamic_dims: tuple[int, ...] = (0,)) -> None:
        """Log `model` as an MLflow model `name`, registered as `register_as` or cfg.register_model_as.

        With `input_example` (one tensor input) it is saved with torch.export ("pt2": loads
        with mlflow.pytorch.load_model anywhere, no unpickling); `dynamic_dims` are the input
        dims that may vary at load time (for an encoder: (0, 1), batch and snippets). A model
        that does not export, or no example, falls back to pickle: loading that needs lofi
        importable and MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true. The URI lands in logged_models.
        """
        register = register_as if register_as is not None else self.cfg.register_model_as
        example = input_example.detach().to("cpu", copy=True) if input_example is not None else None
        send = functools.partial(self._send_model, backend.cpu_copy(model), name, example, tuple(dynamic_dims), register)
        self._queue.submit(Call(f"log_torch_model {name}", send))

    def end(self, status: str = "FINISHED") -> None:
        """Send what is queued and mark the run FINISHED, FAILED or KILLED (attached: leave it running);
        later calls do nothing."""
        if not self.enabled or self._ended:
            return
        self._ended = True
        _OPEN.discard(self)
        if self._monitor is not None:
            backend.stop_system_metrics(self._monitor)
        if self._queue.dead:
            return
        if status not in STATUSES:
            self._warn(f"end(status={status!r}) is not one of {STATUSES}; ending the run as FAILED")
            status = "FAILED"
        end_ms = int(time.time() * 1000)
        if self._attach_id is None:  # an attached tracker leaves the run to its owner
            self._queue.pending.append(Call(f"end run as {status}", functools.partial(self._send_end, status, end_ms)))
        try:
            self._queue.flush(final=True)
        except Exception as err:  # the promise holds at the very end too
            self._warn(f"ending the run failed: {type(err).__name__}: {err}")
        unsent = self._queue.unsent()
        if unsent:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(unsent.items()))
            if self._attach_id is not None:
                outcome = f"run {self._attach_id} lacks them"
            elif self.run_id is None:
                outcome = "the run was never created"
            elif self._queue.pending:
                outcome = f"run {self.run_id} may show RUNNING there"
            else:
                outcome = f"run {self.run_id} ended {status}"
            self._warn(f"{sum(unsent.values())} call(s) were never sent to {self._uri} ({kinds}); {outcome}")
        self._queue.clear()

    # ---- sending: through the queue ----

    def _open(self) -> None:
        if not self.enabled:
            return
        try:
            self._uri = resolve_tracking_uri(self.cfg)
            backend.mlflow_module()
            backend.configure_http(self.cfg.retries, self.cfg.timeout_sec)
        except LofiError:  # a config the user must fix (e.g. a database Ray deletes with the job): said up front
            raise
        except Exception as err:  # a broken MLflow install
            self._warn(f"tracking is off for this run: {type(err).__name__}: {err}")
            self._queue.dead = True
            return
        self._queue.uri = self._uri
        if not _OPEN:  # (re-)registered after MLflow's import: runs before the exit hooks MLflow set up then
            atexit.unregister(_end_open_runs)
            atexit.register(_end_open_runs)
        _OPEN.add(self)
        if self._attach_id is not None:
            self._queue.submit(Call(f"attach to run {self._attach_id}", self._attach_run, creates_run=True))
        else:
            self._queue.submit(Call(f"create run {self.run_name!r}", self._create_run, creates_run=True))

    def _reachable(self) -> bool:
        return backend.reachable(self._uri, self.cfg.timeout_sec)

    def _warn(self, message: str) -> None:
        warnings.warn(f"lofi tracking ({self.run_name}): {message}", TrackingWarning, stacklevel=3)

    def _client(self) -> Any:
        return backend.client(self._uri)

    def _create_run(self) -> None:
        parent_id = self._parent_run_id or self._parent_id()  # first: an offline parent fails it without a request
        self._experiment_id = backend.experiment_id(self._client(), self._uri, self.cfg.experiment,
                                                    self.cfg.artifact_location)
        tags = dict(self._tags)
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        self._close_replaced(parent_id)  # first: a transient failure here retries both, so one run is made
        run = self._client().create_run(self._experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id

    def _close_replaced(self, parent_id: str | None) -> None:
        """End as KILLED the RUNNING runs of this name and parent: a killed job left them so."""
        try:
            closed = backend.close_running(self._client(), self._experiment_id, _REPLACED, run_name=self.run_name,
                                           parent_run_id=parent_id)
        except Exception as err:
            if backend.is_transient(err):
                raise
            self._warn(f"runs left RUNNING under this name stay so: {type(err).__name__}: {err}")
            return
        if closed:
            _log.warning("lofi tracking (%s): ended %d run(s) of this name left RUNNING (a killed job's) as KILLED",
                         self.run_name, closed)

    def _attach_run(self) -> None:
        run = self._client().get_run(self._attach_id)  # a missing run is refused: nothing is logged
        self._experiment_id, self.run_id = run.info.experiment_id, run.info.run_id
        if self._system_metrics and self._monitor is None:
            try:
                self._monitor = backend.start_system_metrics(self._uri, self.run_id)
            except Exception as err:  # the sampler is extra: the run's metrics go on without it
                self._warn(f"no system metrics: {type(err).__name__}: {err}")

    def _parent_id(self) -> str | None:
        parent = self._parent
        if parent is None or not parent.active:
            return parent.run_id if parent else None
        if parent.run_id is None:
            parent._queue.flush()  # the child is trying now, so the parent tries too (offline: one short request)
        if parent.run_id is None:
            raise ConnectionError(f"parent run {parent.run_name!r} is not created yet")
        return parent.run_id

    def _send_bytes(self, data: bytes, name: str) -> None:
        self._client().log_stream(self.run_id, io.BytesIO(data), name)

    def _send_text(self, text: str, name: str) -> None:
        self._client().log_text(self.run_id, text, name)

    def _send_dict(self, data: Any, name: str) -> None:
        self._client().log_dict(self.run_id, data, name)

    def _send_figure(self, fig: Any, name: str) -> None:
        self._client().log_figure(self.run_id, fig, name, save_kwargs={"dpi": 100, "bbox_inches": "tight"})

    def _send_path(self, source: Path, artifact_path: str | None) -> None:
        backend.upload_path(self._client(), self.run_id, source, artifact_path)

    def _send_end(self, status: str, end_ms: int) -> None:
        self._client().set_terminated(self.run_id, status, end_time=end_ms)

    def _send_batch(self, params: list = (), metrics: list = (), tags: list = ()) -> None:
        backend.log_batch(self._client(), self.run_id, params=params, metrics=metrics, tags=tags)

    def _send_model(self, model: torch.nn.Module, name: str, example: torch.Tensor | None,
                    dynamic_dims: tuple[int, ...], register_as: str | None) -> None:
        formats = ("pt2", "pickle") if example is not None else ("pickle",)
        for fmt in formats:
            try:
                uri = backend.log_model(self._client(), self._uri, self.run_id, self._experiment_id, model, name,
                                        example, dynamic_dims, register_as, fmt)
            except Exception as err:
                if fmt == "pickle" or backend.is_transient(err):
                    raise
                self._warn(f"model {name!r} does not export with torch.export ({type(err).__name__}: {err}); "
                           "logging it as pickle (loads where lofi imports, with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true)")
                continue
            self.logged_models.append(uri)
            _log.info("lofi tracking (%s): logged model %s", self.run_name, uri)
            return

