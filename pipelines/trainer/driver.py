"""The driver side of the training harness: the TorchTrainer, datasets, results, tracking (see pipelines.trainer)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from lofi.config import to_dict
from lofi.errors import LofiError
from pipelines.config import PipelineConfig, StageResult
from pipelines.storage import Location
from pipelines.trainer.worker import STATE_FILE, numeric

PAUSE_ENV = "LOFI_TEST_PAUSE"


def _ingest_config(names: Sequence[str]) -> Any:
    """Ray Train's DataConfig for the stage's datasets: "train..." datasets split equally (DDP needs
    every worker to take the same number of steps), by Ray's own `configure`; the others
    (validation) split without dropping a row, so every video is validated once. Rows keep
    their order (preserve_order) in both, on top of Ray's default ingest options."""
    from ray.train import DataConfig

    def ordered() -> Any:
        options = DataConfig.default_ingest_options()
        options.preserve_order = True
        return options

    train = [name for name in names if name.startswith("train")]

    class IngestConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            for name, ds in datasets.items():
                ds.set_name(name.replace("/", "_"))  # Ray Data's metrics and progress lines use the name
            output = super().configure({k: v for k, v in datasets.items() if k in train}, world_size, worker_handles,
                                       worker_node_ids, **kwargs)
            for name, ds in datasets.items():
                if name in train:
                    continue
                ds = ds.copy(ds)
                ds.context.execution_options = ordered()
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                    output[i][name] = split
            return output

    return IngestConfig(datasets_to_split=train, execution_options={name: ordered() for name in train})


def fits_in_memory(cfg: PipelineConfig, num_bytes: float) -> bool:
    """Whether a dataset of num_bytes (decoded) is small enough to be read on the driver (data.cache_max_mib)."""
    return num_bytes <= cfg.data.cache_max_mib * 2**20


def table_dataset(table: Any) -> Any:
    """An Arrow table read on the driver as a Ray Dataset: put in the object store once, so
    epochs (and a restarted worker group) read no shard and decode nothing again."""
    import ray.data

    return ray.data.from_arrow(table)


def fit(cfg: PipelineConfig, stage: str, loop: Callable[[dict[str, Any]], None], loop_config: Any,
        datasets: dict[str, Any], callbacks: Sequence[Any] = (), tracker: Any = None) -> Any:
    """Run `loop` on cfg.scaling workers with Ray Train V2; returns the ray.train.Result.

    `loop_config`: the stage's typed loop config (a dataclass with to_dict/from_dict); it crosses
    to the workers as plain data under the key "loop", where the stage's `loop` rebuilds it.

    `callbacks`: Ray Train callbacks, e.g. a Tune trial's TuneReportCallback (tuning/), which
    forwards every epoch's report to Tune. `tracker`: the stage's Tracker; each epoch's metrics
    go to its run live from the rank-0 worker, and after training `fit` logs from the result the
    epochs the run lacks (all of them when it had no run to hand over: MLflow was unreachable)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError

    if os.environ.get("RAY_TRAIN_V2_ENABLED", "1").strip().lower() in ("0", "false", "no", "off"):
        raise LofiError("lofi needs Ray Train V2 (Ray's default): unset RAY_TRAIN_V2_ENABLED (or set it to 1)")
    resources = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})}
    cfg.run.location().check_bucket()  # a missing bucket or unreachable store: one clear line, before any worker
    live = _live_run(tracker)
    config = {"cfg": to_dict(cfg), "section": stage, "pause": os.environ.get(PAUSE_ENV, ""), "mlflow": live,
              "loop": loop_config.to_dict()}
    trainer = TorchTrainer(
        loop, train_loop_config=config, datasets=datasets, dataset_config=_ingest_config(list(datasets)),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=stage, storage_path=cfg.run.ray_storage(),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             # resuming needs the latest only; the epoch history travels inside each one
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                             callbacks=list(callbacks) or None,
                             # Ray Train's INFO lines (every report's full metrics dict, process group set-up)
                             # would bury the one progress line per epoch the loop prints
                             logging_config=LoggingConfig(log_level="WARNING")))
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        user = _worker_user_error(err)
        if user is not None:
            raise user from err
        raise
    if tracker is not None:
        log_missing_epochs(tracker, epoch_history(result), handed_over=live is not None)
    return result


def log_missing_epochs(tracker: Any, history: list[dict[str, Any]], handed_over: bool) -> None:
    """The epochs the workers did not get into the run (their MLflow was unreachable, e.g. a SQLite
    file on another node; or queued calls died with a killed worker), so each epoch is there once.
    When the run's epochs cannot be read, none is logged again: better a gap than a duplicate."""
    if handed_over:
        logged = tracker.logged_steps("epoch")
        history = [] if logged is None else [row for row in history if int(row["epoch"]) not in logged]
    log_epochs(tracker, history)


def _live_run(tracker: Any) -> dict[str, str] | None:
    """What the rank-0 worker needs to attach to the stage's run: its id and the tracking URI as
    resolved here (a relative SQLite path means this process's working directory, not the worker's)."""
    if tracker is None or not tracker.active or tracker.run_id is None:
        return None
    from pipelines.tracking import resolve_tracking_uri

    return {"run_id": tracker.run_id, "tracking_uri": resolve_tracking_uri(tracker.cfg)}


def _worker_user_error(err: Exception) -> LofiError | None:
    """A LofiError a worker raised (config or data problem), to be shown as one clear line."""
    for rank, exc in sorted((getattr(err, "worker_failures", None) or {}).items()):
        for candidate in (getattr(exc, "cause", None), exc):
            if isinstance(candidate, LofiError):
                message = str(candidate.args[0]) if candidate.args else str(candidate)
                return LofiError(f"training worker {rank}: {message}")
    return None


def epoch_history(result: Any, state: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each finished epoch's metrics, in epoch order: the history the last checkpoint carries
    (every epoch since the run began, whatever checkpoints run.keep_checkpoints left), else
    Ray's metrics dataframe of the retained checkpoints (NaN cells dropped). `state`: that
    checkpoint's state.pt when the caller has already read it (it holds the model too)."""
    if state is None and result.checkpoint is not None:
        state = final_state(result)
    if state is not None:
        history = state.get("history")
        if history:
            return sorted(history, key=lambda row: row["epoch"])
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return [dict(result.metrics)] if result.metrics else []
    rows = [{k: v for k, v in row.items() if not (isinstance(v, float) and np.isnan(v))}
            for row in frame.to_dict("records")]
    return sorted(rows, key=lambda row: row["epoch"])


def final_state(result: Any) -> dict[str, Any]:
    """state.pt of the run's last checkpoint (model, optimizer, epoch, ...), on the CPU."""
    if result.checkpoint is None:
        raise LofiError(f"training reported no checkpoint; see the Ray Train logs under {result.path}")
    with result.checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def torch_bytes(obj: Any) -> bytes:
    """`torch.save` of `obj` in memory: what `write_outputs` stores (a path or an object-store URI)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_outputs(out: Location, files: dict[str, tuple[str, bytes]], tracker: Any) -> dict[str, str]:
    """A stage's outputs {name: (file name, bytes)} written under `out` (each file whole: a rename
    locally, one upload to an object store) and logged as artifacts of its MLflow run; returns
    {name: path or URI}. The pipeline's stage record, written after, is what marks them complete."""
    paths = {}
    for name, (file_name, data) in files.items():
        (out / file_name).write_bytes(data)
        tracker.log_bytes(data, file_name)
        paths[name] = str(out / file_name)
    return paths


def log_epochs(tracker: Any, history: list[dict[str, Any]]) -> None:
    """Each epoch's numeric metrics at step = epoch (what the rank-0 worker logs live)."""
    for row in history:
        tracker.log_metrics(numeric(row), step=int(row["epoch"]))


def log_training(tracker: Any, history: list[dict[str, Any]]) -> None:
    """The training curves figure, where pipelines.plots is there. The epochs' metrics are in the
    run already: `fit(..., tracker=)` logs them."""
    try:
        from pipelines.plots import training_curves
    except ImportError:
        return
    curves: dict[str, list[float]] = {}
    for row in history:
        for key, value in numeric(row).items():
            if key.startswith(("loss_", "val_")) and not key.endswith("seconds"):
                curves.setdefault(key, []).append(value)
    if curves:
        tracker.log_figure(training_curves(curves), "training_curves.png")


def stage_tracker(cfg: PipelineConfig, stage: str, parent_run_id: str | None) -> Any:
    from pipelines.tracking import Tracker

    return Tracker.start(cfg.tracking, f"{cfg.run.name}/{stage}", parent_run_id=parent_run_id, tags={"stage": stage})


def finish_stage(cfg: PipelineConfig, stage: str, start: float, history: list[dict[str, Any]],
                 artifacts: dict[str, str], out_dir: Location, run_id: str | None,
                 extra_metrics: dict[str, float] | None = None) -> StageResult:
    """The end every training stage shares: final metrics, the printed summary, the result."""
    metrics = (numeric(history[-1]) if history else {}) | (extra_metrics or {})
    seconds = time.perf_counter() - start
    print("\n".join(summary_lines(cfg, stage, seconds, len(history), metrics, artifacts, run_id)), flush=True)
    return StageResult(stage=stage, out_dir=str(out_dir), metrics=metrics, seconds=seconds, mlflow_run_id=run_id,
                       artifacts=artifacts)


def summary_lines(cfg: PipelineConfig, stage: str, seconds: float, epochs: int, metrics: dict[str, float],
                  artifacts: dict[str, str], run_id: str | None) -> list[str]:
    keys = [k for k in ("loss_total", "val_loss_total", "val_accuracy", "val_balanced_accuracy",
                         "val_tal_balanced_accuracy", "val_average_mAP") if k in metrics]
    final = [f"{k} {metrics[k]:.4g}" for k in keys]
    if "activation_memory_bytes" in metrics:
        final.append(f"activation memory {metrics['activation_memory_bytes'] / 2**20:.1f} MiB per step")
    lines = [f"lofi {stage.replace('_', '-')}: {epochs} epochs in {seconds:.1f} s; final " + ", ".join(final)]
    lines += [f"  wrote {name}: {path}" for name, path in artifacts.items()]
    lines.append(f"  checkpoints (a rerun with run.name={cfg.run.name} resumes): {cfg.run.ray_storage()}/{stage}")
    if run_id:
        lines.append(f"  MLflow run {run_id}")
    return lines
