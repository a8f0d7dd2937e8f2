"""`lofi sweep` for real: Ray Tune over Ray Train V2 trials on a tiny generated dataset, MLflow read back.

One sweep, four points: fidelity.kind {full, s_lofi} x train.lr {3e-3, 1e-12}. The two full
fidelity points are over the memory budget and never launched; s_lofi at 3e-3 trains; s_lofi at
1e-12 does not move its weights.
One trial at a time, 3 epochs, ASHA with rungs after epochs 1 and 2 on the validation loss: the
second s_lofi trial is worse there than the first, so ASHA stops it before its last epoch
(which rung depends on what Tune's restored state kept of the first trial's early epochs). The sweep's driver is
killed (SIGKILL) while the first trial trains and `--resume` finishes the sweep.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lofi.config import load_config
from lofi.models.encoders import EncoderConfig, build_encoder
from lofi_cli.commands import main as lofi_main
from pipelines.config import PipelineConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]
LEVELS = {"full": (8, 32), "s_lofi": (8, 16), "t_lofi": (4, 32), "st_lofi": (6, 24)}  # name -> (T, S); F = 2
GOOD_LR, BAD_LR = 3e-3, 1e-12


def write_configs(tmp: Path, data: Path, address: str) -> tuple[Path, Path]:
    encoder = tmp / "encoder.pt"  # the starting encoder (stage 1 is not what this test is about)
    torch.manual_seed(0)
    torch.save(build_encoder(EncoderConfig(width=8, shift_div=4)).state_dict(), encoder)
    pipeline = {
        "run": {"name": "base", "storage": str(tmp / "runs"), "seed": 1},
        "data": {"videos": str(data / "videos"), "annotations": str(data / "annotations.json"),
                 "val_subset": "training"},  # the loss training lowers: ASHA's ranking is known
        "prepare": {"num_workers": 2, "videos_per_part": 3},
        "encoder": {"width": 8, "shift_div": 4, "checkpoint": str(encoder)},
        "head": {"name": "bmn", "hidden": 16, "num_sample": 4},
        "fidelity": {"kind": "s_lofi", "overrides": {n: {"num_snippets": t, "frames_per_snippet": 2, "size_px": s}
                                                     for n, (t, s) in LEVELS.items()}},
        "train": {"optimizer": "adamw", "lr": GOOD_LR, "epochs": 3, "batch_size": 2, "shuffle_buffer_rows": 0},
        "detect": {"top_k": 20},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "sweep-test"},
        "ray": {"address": address},
    }
    (tmp / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    sweep = {
        "name": "tiny", "storage": str(tmp / "sweeps"), "pipeline": str(tmp / "pipeline.yaml"),
        "space": {"fidelity.kind": {"grid": ["full", "s_lofi"]}, "train.lr": {"grid": [GOOD_LR, BAD_LR]}},
        "search": {"metric": "val_loss_total", "mode": "min", "score_subset": "training",  # see data.val_subset
                   "grace_period_epochs": 1, "reduction_factor": 2,
                   "max_concurrent_trials": 1, "budget_gb": 0.0},
    }
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return tmp / "pipeline.yaml", tmp / "sweep.yaml"


@pytest.fixture(scope="module")
def dataset(tiny_tal_videos) -> Path:
    return tiny_tal_videos


def budget_between_s_lofi_and_full(pipeline: Path) -> float:
    """A budget (GiB) that s_lofi fits and full does not, from the planner's own per-level figures."""
    from lofi.memory_plan import saved_bytes_by_level
    from lofi.fidelity import resolve_level

    cfg = load_config(PipelineConfig, pipeline)
    levels = tuple(resolve_level(n, cfg.fidelity.overrides) for n in ("s_lofi", "full"))
    memory = saved_bytes_by_level(cfg.stage2_encoder(), cfg.head, levels, num_classes=3, batch_size=2, head_snippets=8)
    assert memory["s_lofi"] < memory["full"]
    return (memory["s_lofi"] + memory["full"]) / 2 / 2**30


def wait_for(path: Path, timeout_sec: float, proc: subprocess.Popen) -> None:
    # polled every 0.05 s: the kill must land while the first trial still has epochs to train
    deadline = time.monotonic() + timeout_sec
    while time.monotonic() < deadline:
        if path.is_file() and path.stat().st_size > 0:
            return
        if proc.poll() is not None:
            pytest.fail(f"the sweep exited ({proc.returncode}) before {path} appeared:\n"
                        f"{proc.stdout.read().decode(errors='replace')[-5000:]}")
        time.sleep(0.05)
    pytest.fail(f"{path} did not appear within {timeout_sec} s")


@pytest.fixture(scope="module")
def swept(ray_cluster, dataset, tmp_path_factory):
    # Ray Train's default 2 s polls (tests/conftest.py TRAIN_POLL shortens them for other tests): with
    # 0.25 s the trials' epochs end so fast that the kill and ASHA's rungs see another sequence
    mp = pytest.MonkeyPatch()
    mp.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    try:
        yield run_sweep(ray_cluster, dataset, tmp_path_factory)
    finally:
        mp.undo()


def run_sweep(ray_cluster, dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    pipeline, sweep = write_configs(tmp, dataset, ray_cluster.get_runtime_context().gcs_address)
    budget = budget_between_s_lofi_and_full(pipeline)
    argv = ["sweep", "--config", str(sweep), "--set", f"search.budget_gb={budget}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "-m", "lofi_cli", *argv], env=env, cwd=tmp,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:  # kill the driver once the first trial has reported its first epoch to Tune
        wait_for(tmp / "sweeps" / "tiny" / "tune" / "trial-02" / "result.json", 240, driver)
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
        out = driver.stdout.read().decode(errors="replace")
    assert lofi_main([*argv, "--resume"]) == 0, out
    summary = json.loads((tmp / "sweeps" / "tiny" / "summary.json").read_text())
    return tmp, summary, budget, out


def test_over_budget_trials_are_not_launched_and_asha_stops_the_trial_that_falls_behind(swept):
    tmp, summary, budget, _ = swept
    rows = {r["trial"]: r for r in summary["trials"]}
    assert set(rows) == {"trial-00", "trial-01", "trial-02", "trial-03"}  # grid order: kind x lr
    for name in ("trial-00", "trial-01"):  # full fidelity: over the budget, with its figure, never run
        assert rows[name]["status"] == "over_budget" and rows[name]["epochs"] == 0
        assert rows[name]["activation_memory_mib"] > budget * 1024
        assert not (tmp / "sweeps" / "tiny" / "trials" / name).exists()
    assert rows["trial-02"]["status"] == "finished" and rows["trial-02"]["epochs"] == 3
    assert rows["trial-03"]["status"] == "stopped_early" and rows["trial-03"]["epochs"] in (1, 2)
    assert rows["trial-02"]["activation_memory_mib"] < budget * 1024
    assert summary["best"]["trial"] == "trial-02"
    with (tmp / "sweeps" / "tiny" / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["trial"] for r in table][:2] == ["trial-02", "trial-03"]  # sorted by the metric (min)


def test_mlflow_holds_the_sweep_parent_with_a_child_per_launched_trial(swept):
    from mlflow.tracking import MlflowClient

    tmp, summary, _, _ = swept
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    parent_id = summary["mlflow"]["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "sweep/tiny" and parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"results.csv", "pareto.png", "best_config.yaml"} <= artifacts
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    trials = {}
    for run in children:
        if run.data.tags.get("lofi.trial"):
            trials.setdefault(run.info.run_name, []).append(run)
    assert set(trials) == {"trial-02/train", "trial-03/train"}
    finished = [r for r in trials["trial-02/train"] if r.info.status == "FINISHED"]
    assert len(finished) == 1
    history = client.get_metric_history(finished[0].info.run_id, "val_loss_total")
    assert sorted({h.step for h in history}) == [0, 1, 2]  # a value per epoch
    assert finished[0].data.params["train.lr"] == str(GOOD_LR)
    # the finished trial ended on its own (outputs written); the stopped one's run is closed for it
    assert (tmp / "sweeps" / "tiny" / "trials" / "trial-02" / "train" / "encoder.pt").is_file()
    assert [r.info.status for r in trials["trial-03/train"]] == ["KILLED"]
    assert "ASHA" in trials["trial-03/train"][0].data.tags["lofi.closed_by"]
    # no run of this sweep is left RUNNING: the killed driver's, the stopped trial's
    running = client.search_runs([parent.info.experiment_id], "attributes.status = 'RUNNING'")
    assert not running, [r.info.run_name for r in running]


def test_the_killed_sweep_resumed_its_interrupted_trial_and_wrote_a_best_config_lofi_train_takes(swept):
    from pipelines.stages.train import _plan

    tmp, summary, _, _ = swept
    # the interrupted trial went on from its epoch-0 checkpoint in its own folder (the last 2 are kept)
    checkpoints = sorted(p.name for p in (tmp / "sweeps" / "tiny" / "trials" / "trial-02" / "ray" / "train").glob("epoch-*"))
    assert checkpoints == ["epoch-0001", "epoch-0002"]
    best = load_config(PipelineConfig, tmp / "sweeps" / "tiny" / "best_config.yaml")
    assert best.fidelity.kind == "s_lofi" and best.train.lr == GOOD_LR and best.run.name == "tiny-best"
    assert _plan(best).levels[0].size_px == 16  # its shards and levels are there: `lofi train` starts from it


def test_a_finished_sweep_leaves_every_cpu_free_for_the_next_job(swept, ray_cluster):
    """ASHA kills a stopped trial's Train controller; its workers' placement group must still be
    freed (Ray Train's cleaner does it through the state API), or the next run waits forever."""
    deadline = time.monotonic() + 240  # the cleaner polls; on a loaded machine it took over 90 s once
    while ray_cluster.available_resources().get("CPU", 0) < ray_cluster.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray_cluster.available_resources()
        time.sleep(1)


def test_trials_are_scored_on_the_tuning_split_which_the_data_must_have(dataset, tmp_path, capsys):
    pipeline, sweep = write_configs(tmp_path, dataset, "")
    config = yaml.safe_load(sweep.read_text())
    config["search"].pop("score_subset")  # the default: tuning
    sweep.write_text(yaml.safe_dump(config))
    assert lofi_main(["sweep", "--config", str(sweep)]) == 2  # before any work: no Ray, no prepare
    err = capsys.readouterr().err
    assert "search.score_subset is tuning" in err and "prepare.tuning_fraction" in err
    assert not (tmp_path / "runs").exists()
    from tuning.config import SweepConfig
    from lofi.config import load_config as load

    scfg = load(SweepConfig, sweep, [f"pipeline={pipeline}"])
    trial = scfg.trial_config(scfg.base_config(), {}, "trial-00")
    assert trial.data.val_subset == "tuning"  # a trial's own validation: the held-out training videos
