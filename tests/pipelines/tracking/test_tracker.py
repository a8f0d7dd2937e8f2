"""pipelines.tracking.Tracker against a real SQLite store and a real `mlflow server` on loopback
(conftest.py): where runs go, what a run holds, how it ends, a worker attached to a stage's run."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lofi.config import ConfigError, from_dict
from lofi.models.encoders import EncoderConfig, build_encoder
from pipelines import plots
from pipelines.tracking import Tracker, TrackingConfig, TrackingWarning, mlflow_ui_command, resolve_tracking_uri
from pipelines.tracking import tracker as tracker_module
from pipelines.tracking.tracker import stop_on_sigterm


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/mlflow.db"
    assert mlflow_ui_command(TrackingConfig()) == f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:///runs/x.db")) == f"sqlite:///{tmp_path}/runs/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(TrackingConfig()) == "http://tracking.example:5000"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:////abs/m.db")) == "sqlite:////abs/m.db"
    # MLflow 3 refuses the folder store: say so before any run starts, with the fix.
    with pytest.raises(ConfigError, match=r"tracking_uri: './mlruns' is a local folder.*sqlite:///mlflow\.db"):
        from_dict(TrackingConfig, {"tracking_uri": "./mlruns"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    with pytest.raises(ConfigError, match="environment variable MLFLOW_TRACKING_URI: 'file:///tmp/mlruns'"):
        resolve_tracking_uri(TrackingConfig())


def test_disabled_tracker_logs_nothing(tmp_path, stage_config):
    never = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/never.db")
    for tracker in (Tracker.start(never, "train", enabled=False),  # a non-zero rank
                    Tracker.start(dataclasses.replace(never, enabled=False), "train")):
        with tracker as run:
            run.log_config(stage_config)
            run.log_metrics({"loss": 1.0}, step=0)
            run.log_dict({"a": 1}, "predictions.json")
            run.log_figure(plots.memory_vs_map([]), "plots/memory.png")
            run.log_torch_model(torch.nn.Linear(2, 2), "encoder", input_example=torch.zeros(1, 2))
            assert run.child("eval").run_id is None
        assert run.run_id is None and run.logged_models == []
    assert list(tmp_path.iterdir()) == []  # not even a database file


@pytest.mark.slow
def test_sqlite_stages_are_child_runs_with_params_metrics_and_artifacts(sqlite_uri, tmp_path, stage_config, runs_by_name):
    cfg = TrackingConfig(tracking_uri=sqlite_uri, experiment="stages")
    predictions = {"v_1": [{"segment": [np.float32(1.5), 3.0], "label": "jump", "score": np.float64(0.75)}]}
    with Tracker.start(cfg, "pipeline", tags={"lofi.job": "demo"}) as parent:
        with parent.child("train") as train:
            train.log_config(stage_config)
            for epoch, loss in enumerate([1.0, 0.5, 0.25]):
                train.log_metrics({"loss": loss, "lr": 0.1 / (epoch + 1), "throughput_videos_per_sec": 3.0,
                                   "peak_memory_bytes": 2**30, "val/mAP": torch.tensor(0.1 * epoch)}, step=epoch)
            train.log_dict(predictions, "predictions.json")
            train.log_figure(plots.training_curves({"loss": [1.0, 0.5, 0.25]}), "plots/curves.png")
            train.log_figure(plots.detection_timeline("v_1", 10.0, [(1.0, 3.0, "jump")], [(1.5, 3.0, "jump", 0.75)]),
                             "plots/timeline_v_1")
        with parent.child("eval") as evaluation:
            evaluation.log_dict({"average_mAP": 0.42}, "eval/report.json")
            (tmp_path / "detections.txt").write_text("v_1 1.5 3.0 jump 0.75\n")
            evaluation.log_artifact(tmp_path / "detections.txt", "eval")
            with pytest.warns(TrackingWarning, match="missing.txt does not exist"):
                evaluation.log_artifact(tmp_path / "missing.txt")

    runs = runs_by_name(sqlite_uri, "stages")
    assert {name: run.info.status for name, run in runs.items()} == {"pipeline": "FINISHED", "train": "FINISHED", "eval": "FINISHED"}
    assert runs["train"].data.tags["mlflow.parentRunId"] == runs["eval"].data.tags["mlflow.parentRunId"] == parent.run_id
    assert "mlflow.parentRunId" not in runs["pipeline"].data.tags and runs["pipeline"].data.tags["lofi.job"] == "demo"

    params = runs["train"].data.params
    assert len(params) == 130 + 4 and params["big.f129"] == "129" and params["seed"] == "7"
    assert params["long.sizes"] == "[1, 2, 3]" and params["long.note"] == "None"
    assert len(params["long.text"]) == 6000 and params["long.text"].startswith("y" * 5900)

    from mlflow import MlflowClient

    client = MlflowClient(sqlite_uri)
    history = client.get_metric_history(train.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert [m.value for m in client.get_metric_history(train.run_id, "val/mAP")] == pytest.approx([0.0, 0.1, 0.2])

    assert [a.path for a in client.list_artifacts(evaluation.run_id, "eval")] == ["eval/detections.txt", "eval/report.json"]
    files = Path(client.download_artifacts(train.run_id, "", str(tmp_path / "train")))
    assert yaml.safe_load((files / "config.yaml").read_text())["long"]["text"] == "y" * 7000  # whole, unlike the param
    assert json.loads((files / "predictions.json").read_text()) == {"v_1": [{"segment": [1.5, 3.0], "label": "jump", "score": 0.75}]}
    assert is_png(files / "plots" / "curves.png") and is_png(files / "plots" / "timeline_v_1.png")
    # Artifacts live beside the database, not in ./mlruns.
    store_dir = Path(sqlite_uri.removeprefix("sqlite:///")).parent
    assert len(list((store_dir / "mlartifacts").rglob("config.yaml"))) == 1


@pytest.mark.slow
def test_runs_end_failed_or_killed_when_the_body_stops(sqlite_uri, stage_config, runs_by_name):
    cfg = TrackingConfig(tracking_uri=sqlite_uri, experiment="statuses")
    with pytest.raises(ValueError, match="bad batch"):
        with Tracker.start(cfg, "raises") as run:
            run.log_metrics({"loss": 1.0}, step=0)
            raise ValueError("bad batch")
    with pytest.raises(KeyboardInterrupt):
        with Tracker.start(cfg, "interrupted"):
            raise KeyboardInterrupt
    with pytest.raises(SystemExit):
        with Tracker.start(cfg, "sigterm"):
            sys.exit(signal.SIGTERM)  # what Ray's driver raises on `ray job stop`
    with pytest.raises(SystemExit):
        with Tracker.start(cfg, "exit-1"):
            sys.exit(1)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop_on_sigterm()
        with pytest.raises(SystemExit):
            with Tracker.start(cfg, "stopped"):
                os.kill(os.getpid(), signal.SIGTERM)  # `ray job stop`
                time.sleep(5)
    finally:
        signal.signal(signal.SIGTERM, previous)
        tracker_module._STOP_SIGNALLED.clear()
    done = Tracker.start(cfg, "explicit")
    done.end()
    done.log_metrics({"loss": 2.0}, step=1)  # after end: ignored, no error
    with Tracker.start(cfg, "refused") as run:
        run.log_config(stage_config)
        with pytest.warns(TrackingWarning, match="refused and is dropped"):
            run.log_config(dataclasses.replace(stage_config, seed=8))  # MLflow never changes a logged param
        run.log_metrics({"loss": 3.0}, step=0)  # the refusal does not block what follows
    runs = runs_by_name(sqlite_uri, "statuses")
    assert runs.pop("refused").data.metrics == {"loss": 3.0}
    assert {name: run.info.status for name, run in runs.items()} == {"raises": "FAILED", "interrupted": "KILLED", "sigterm": "KILLED",
                                                                 "exit-1": "FAILED", "stopped": "KILLED", "explicit": "FINISHED"}
    assert runs["raises"].data.tags["lofi.error"] == "ValueError: bad batch"
    assert runs["explicit"].data.metrics == {}


@pytest.mark.slow
def test_server_worker_run_logs_and_registers_the_encoder(server_uri, tmp_path, monkeypatch, stage_config, runs_by_name):
    cfg = TrackingConfig(tracking_uri=server_uri, experiment="server", register_model_as="lofi-encoder-test")
    encoder = build_encoder(EncoderConfig(width=8)).eval()
    frames = torch.randint(0, 256, (1, 2, 2, 32, 32, 3), dtype=torch.uint8)  # (B, T, F, H, W, C) uint8
    with Tracker.start(cfg, "pipeline") as parent:
        # A Ray worker gets only the parent's id and its rank.
        with Tracker.start(cfg, "train", parent_run_id=parent.run_id, enabled=True) as train:
            train.log_config(stage_config)
            train.log_metrics({"loss": 0.5}, step=0)
            train.log_figure(plots.memory_vs_map([("full", 2**31, 0.3), ("st_lofi", 2**29, 0.25)]), "plots/memory.png")
            train.log_torch_model(encoder, "encoder", input_example=frames, dynamic_dims=(0, 1))
        Tracker.start(cfg, "train", parent_run_id=parent.run_id, enabled=False).end()  # rank 1: no run

    from mlflow import MlflowClient

    client = MlflowClient(server_uri)
    runs = runs_by_name(server_uri, "server")
    assert sorted(runs) == ["pipeline", "train"] and runs["train"].info.status == "FINISHED"
    assert runs["train"].data.tags["mlflow.parentRunId"] == parent.run_id
    assert len(runs["train"].data.params) == 134
    assert {a.path for a in client.list_artifacts(train.run_id)} >= {"config.yaml", "plots"}
    assert is_png(Path(client.download_artifacts(train.run_id, "plots/memory.png", str(tmp_path))))

    versions = client.search_model_versions("name='lofi-encoder-test'")
    assert [(v.version, v.run_id) for v in versions] == [("1", train.run_id)]
    assert train.logged_models == ["models:/lofi-encoder-test/1"]
    import mlflow.pytorch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_uri)
    loaded = mlflow.pytorch.load_model("models:/lofi-encoder-test/1")
    other = torch.randint(0, 256, (2, 3, 2, 32, 32, 3), dtype=torch.uint8)  # another batch size and snippet count
    with torch.no_grad():
        assert torch.allclose(loaded(other), encoder(other), atol=1e-5)


# ---- a stage's run, logged to from the rank-0 worker ----

@pytest.mark.slow
def test_an_attached_tracker_logs_to_the_run_and_never_ends_it(sqlite_uri, recwarn):
    from mlflow import MlflowClient

    client = MlflowClient(sqlite_uri)
    cfg = TrackingConfig(tracking_uri=sqlite_uri, experiment="attached")
    with Tracker.start(cfg, "w1/train") as owner:
        with Tracker.attach(cfg, owner.run_id, run_name="w1/train rank 0", system_metrics=True) as worker:
            worker.log_metrics({"loss": 0.5}, step=0)
        assert worker.run_id == owner.run_id and client.get_run(owner.run_id).info.status == "RUNNING"
        with pytest.raises(ValueError, match="worker died"):
            with Tracker.attach(cfg, owner.run_id) as failing:
                failing.log_metrics({"loss": 0.25}, step=1)
                raise ValueError("worker died")  # a restarted worker group may still finish the run
        run = client.get_run(owner.run_id)
        assert run.info.status == "RUNNING" and "lofi.error" not in run.data.tags
    assert not [w for w in recwarn if issubclass(w.category, TrackingWarning)]
    run = client.get_run(owner.run_id)
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(owner.run_id, "loss")] == [(0, 0.5), (1, 0.25)]
    if importlib.util.find_spec("psutil") is None:  # MLflow's sampler needs it: without, no system metrics
        assert not [key for key in run.data.metrics if key.startswith("system/")]
    with pytest.warns(TrackingWarning, match="no run: attach to run"):
        missing = Tracker.attach(cfg, "0" * 32)
    missing.log_metrics({"loss": 1.0}, step=0)  # nothing logged, nothing raised
    missing.end()


@pytest.mark.slow
def test_an_attached_tracker_logs_system_metrics_when_psutil_is_there(sqlite_uri, monkeypatch):
    pytest.importorskip("psutil")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cfg = TrackingConfig(tracking_uri=sqlite_uri, experiment="system")
    with Tracker.start(cfg, "w1/train") as owner:
        with Tracker.attach(cfg, owner.run_id, system_metrics=True):
            time.sleep(2.0)
    metrics = MlflowClient(sqlite_uri).get_run(owner.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics


@pytest.mark.slow
def test_after_training_only_the_epochs_the_run_lacks_are_logged(sqlite_uri):
    from mlflow import MlflowClient

    from pipelines.trainer import log_missing_epochs

    client = MlflowClient(sqlite_uri)
    cfg = TrackingConfig(tracking_uri=sqlite_uri, experiment="gaps")
    history = [{"epoch": e, "loss_total": 1.0 / (e + 1), "level": "s_lofi"} for e in range(3)]
    with Tracker.start(cfg, "w1/train") as handed, Tracker.attach(cfg, handed.run_id) as worker:
        worker.log_metrics({"epoch": 1, "loss_total": 0.5}, step=1)  # the worker got epoch 1 out only
        log_missing_epochs(handed, history, handed_over=True)
    with Tracker.start(cfg, "w1/train_head") as kept:  # no run to hand over: every epoch after training
        log_missing_epochs(kept, history, handed_over=False)
    for run_id in (handed.run_id, kept.run_id):
        assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss_total")) == [
            (0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]


def _write_head_features(folder: Path) -> None:
    """4 training videos of 8 snippets of 8 features, one action each (class a or b) on noise."""
    from pipelines.data.features import FeatureWriter

    rng = np.random.default_rng(1)
    writer = FeatureWriter(folder, num_snippets=8, feature_dim=8)
    for i in range(4):
        first, k = 1 + i, i % 2
        feats = rng.normal(0.0, 0.1, (8, 8)).astype(np.float32)
        feats[first:first + 3, k] += 1.0
        writer.add({"video_id": f"v{i}", "subset": "training", "duration_sec": 16.0, "num_snippets": 8,
                    "segment_start_sec": [2.0 * first], "segment_end_sec": [2.0 * first + 6.0],
                    "segment_label": ["ab"[k]], "segment_label_id": [k]}, feats)
    writer.commit({"labels": ["a", "b"], "fixed_grid": True, "level": "fake"})


def _watch_paused_run(uri: str, run_name: str, pid_file: Path, seen: dict) -> None:
    """While the rank-0 worker waits at the start of epoch 1: what MLflow shows of the stage's run."""
    from mlflow import MlflowClient

    try:
        deadline = time.monotonic() + 300
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("live").experiment_id],
                                  filter_string=f"tags.mlflow.runName = '{run_name}'")
        seen["runs"] = len(runs)
        seen["status"] = runs[0].info.status
        seen["steps"] = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss_total")]
    finally:
        pid_file.write_text("")  # lets the worker go on


@pytest.mark.ray
@pytest.mark.slow
def test_a_stage_logs_each_epoch_to_mlflow_while_it_trains_and_once(ray_cluster, sqlite_uri, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipelines.config import PipelineConfig
    from pipelines.stages.train_head import run

    cfg = from_dict(PipelineConfig, {
        "run": {"name": "live", "storage": str(tmp_path), "seed": 5},
        "head": {"name": "bmn", "hidden": 16, "num_sample": 4}, "data": {"val_subset": "validation"},
        "train_head": {"optimizer": "adamw", "lr": 0.003, "epochs": 2, "batch_size": 4},
        "tracking": {"tracking_uri": sqlite_uri, "experiment": "live"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}})
    _write_head_features(cfg.run.dir() / "features")
    pid_file, seen = tmp_path / "worker.pid", {}
    monkeypatch.setenv("LOFI_TEST_PAUSE", f"1:{pid_file}")
    watcher = threading.Thread(target=_watch_paused_run, args=(sqlite_uri, "live/train_head", pid_file, seen),
                               daemon=True)
    watcher.start()
    result = run(cfg)
    watcher.join(timeout=5)
    # epoch 0 was in MLflow while the worker waited before epoch 1
    assert seen == {"runs": 1, "status": "RUNNING", "steps": [0]}
    client = MlflowClient(sqlite_uri)
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    for key in ("loss_total", "lr", "videos_per_sec", "train_seconds"):  # each epoch once: not again after fit
        assert sorted(m.step for m in client.get_metric_history(result.mlflow_run_id, key)) == [0, 1], key
    last = client.get_metric_history(result.mlflow_run_id, "loss_total")
    assert max(last, key=lambda m: m.step).value == pytest.approx(result.metrics["loss_total"])
    assert "training_curves.png" in {a.path for a in client.list_artifacts(result.mlflow_run_id)}
