"""deploy/README.md's job submissions against a real token-authenticated 2-node Ray cluster.

`lofi prepare`, `lofi train` (stopped with `ray job stop`, then resubmitted: it resumes from its
last checkpoint) and `lofi demo --smoke` go in with `ray job submit --runtime-env
deploy/runtime_env.yaml --working-dir .`, the code uploaded from this checkout; the jobs log to
the cluster's MLflow server. Paths are absolute, as on shared storage.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import pytest

from lofi.synth import MOTION_CLASSES
from pipelines.stages.demo import unseen_classes


REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]
SMOKE = "deploy/configs/pipeline/demo_smoke.yaml"
EPOCHS = 3
ANET_TIOU = [0.5 + 0.05 * i for i in range(10)]
# --no-full-end-to-end: the third branch is the same stages at the full level (~50 s more here);
# `make demo` runs it, and its activation memory is still reported (from lofi.memory's planner)
DEMO = ("lofi", "demo", "--smoke", "--no-full-end-to-end")
BRANCH_STAGES = {"baseline": {"pretrain", "extract", "train_head", "detect"},
                 "lofi": {"pretrain", "train", "extract", "train_head", "detect"}}
DEMO_CHILDREN = {"synth", "synth_clips", "prepare", "prepare_clips", "stage1/pretrain"} | {
    f"{branch}/{stage}" for branch, stages in BRANCH_STAGES.items() for stage in stages - {"pretrain"}}


def test_readme_commands_are_the_ones_tested():
    readme = (REPO / "deploy" / "README.md").read_text()
    submit = "ray job submit --runtime-env deploy/runtime_env.yaml --working-dir . --"
    for command in (f"{submit} lofi prepare --config deploy/configs/prepare/demo_smoke.yaml",
                    f"{submit} lofi train --config {SMOKE}", f"{submit} lofi demo --smoke",
                    "ray get-auth-token --generate", "ray job stop"):
        assert command in " ".join(readme.replace("\\\n", " ").split()), command


@pytest.fixture(scope="module")
def shards(ray_job_cluster, tiny_tal_videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster_prepare") / "prepared"
    _, output = ray_job_cluster.submit(
        "lofi", "prepare", "--config", "deploy/configs/prepare/demo_smoke.yaml",
        "--set", f"input.annotations={tiny_tal_videos / 'annotations.json'}",
        "--set", f"input.videos={tiny_tal_videos / 'videos'}", "--set", f"output={out}")
    return out, output


def test_prepare_job_writes_every_level_of_every_video(shards, tiny_tal_videos):
    out, output = shards
    manifest = json.loads((out / "manifest.json").read_text())
    videos = json.loads((tiny_tal_videos / "annotations.json").read_text())["database"]
    assert {level["name"] for level in manifest["levels"]} == {"full", "s_lofi", "t_lofi", "st_lofi"}
    assert not manifest["errors"]
    for level in manifest["levels"]:
        assert level["videos"] == len(videos), level["name"]
    assert "lofi prepare:" in output


def _epochs_in(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"lofi train: epoch (\d+)/" + str(EPOCHS), output)]


def test_train_job_stopped_then_resubmitted_resumes_from_its_last_checkpoint(ray_job_cluster, shards, tmp_path):
    cluster, (shard_dir, _) = ray_job_cluster, shards
    argv = ("lofi", "train", "--config", SMOKE, "--set", f"data.shards={shard_dir}",
            "--set", f"run.storage={tmp_path / 'runs'}", "--set", "run.name=cluster-train",
            "--set", f"train.epochs={EPOCHS}", "--set", "tracking.experiment=cluster-train")
    job, _ = cluster.submit(*argv, wait=False)
    checkpoints = tmp_path / "runs" / "cluster-train" / "ray" / "train"
    deadline = time.monotonic() + 300
    # epoch 0 reported, epoch 1 about to start, and Ray Train's controller has registered the
    # checkpoint (its snapshot in the run's storage is what a resubmission resumes from)
    snapshot = checkpoints / "checkpoint_manager_snapshot.json"
    while not (cluster.pause_file.exists() and snapshot.is_file() and "epoch-0000" in snapshot.read_text()):
        assert time.monotonic() < deadline, f"no pause at epoch 1 after 300 s:\n{cluster.logs(job)[-4000:]}"
        assert cluster.status(job) in ("PENDING", "RUNNING"), cluster.logs(job)[-4000:]
        time.sleep(0.5)
    cluster.ray("job", "stop", job)
    assert cluster.status(job) == "STOPPED"
    assert sorted(p.name for p in checkpoints.glob("epoch-*")) == ["epoch-0000"]
    first_output = cluster.logs(job)
    assert not (tmp_path / "runs" / "cluster-train" / "train" / "encoder.pt").exists()

    _, output = cluster.submit(*argv)
    resumed_at = _epochs_in(output)
    assert resumed_at and resumed_at[-1] == EPOCHS
    # it went on after the last checkpoint: the checkpointed epoch is not trained again
    assert resumed_at == list(range(2, EPOCHS + 1)), resumed_at
    assert _epochs_in(first_output) == [1]
    assert (tmp_path / "runs" / "cluster-train" / "train" / "encoder.pt").is_file()
    # MLflow: the stopped job's run is not left RUNNING; the resumed run holds every epoch
    runs = {r.info.run_id: r for r in cluster.runs("cluster-train")}
    statuses = sorted(r.info.status for r in runs.values())
    assert statuses == ["FINISHED", "KILLED"], [(r.info.status, r.data.tags.get("lofi.error")) for r in runs.values()]
    from mlflow import MlflowClient

    finished = next(r for r in runs.values() if r.info.status == "FINISHED")
    history = MlflowClient(cluster.tracking_uri).get_metric_history(finished.info.run_id, "loss_total")
    assert sorted(m.step for m in history) == list(range(EPOCHS))


@pytest.fixture(scope="module")
def demo(ray_job_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster_demo") / "out"
    _, output = ray_job_cluster.submit(*DEMO, "--out", str(out))
    return out, json.loads((out / "report.json").read_text()), output


def test_demo_job_reports_its_branches_with_scores_memory_and_times(demo):
    out, report, output = demo
    for branch, stages in BRANCH_STAGES.items():
        b = report[branch]
        assert b["tiou_thresholds"] == pytest.approx(ANET_TIOU)
        assert len(b["mAP"]) == 10 and all(0.0 <= m <= 1.0 for m in b["mAP"])
        assert b["average_mAP"] == pytest.approx(statistics.fmean(b["mAP"]))
        assert set(b["stage_seconds"]) == stages and all(s > 0 for s in b["stage_seconds"].values())
        assert b["num_validation_videos"] == 1 and Path(b["predictions"]).is_file()
        assert json.loads(Path(b["eval"]).read_text())["average_mAP"] == b["average_mAP"]
        # stage 1 trained on the generated clip set, not the TAL videos: declared as external data
        external = json.loads(Path(b["predictions"]).read_text())["external_data"]
        assert external["used"] is True and "clip set" in external["details"], external
    # the frozen encoder's head-only step < a step at the largest LoFi level < full fidelity end to end
    assert 0 < report["baseline"]["activation_memory_bytes"] < report["lofi"]["activation_memory_bytes"] \
        < report["full_fidelity_activation_memory_bytes"]
    assert "full_end_to_end" not in report
    assert len({report[b]["stage_seconds"]["pretrain"] for b in BRANCH_STAGES}) == 1  # one stage-1 run
    for key in ("synth", "synth_clips", "prepare", "prepare_clips"):
        assert report["data_seconds"][key] > 0, key
    for key in ("val_balanced_accuracy", "val_tal_balanced_accuracy"):
        assert 0.0 <= report["stage1"][key] <= 1.0, key
    # where stage 1 puts the validation videos' background snippets: a share per class of its clip set
    shares = {k[len("val_tal_background_as_"):]: v for k, v in report["stage1"].items()
              if k.startswith("val_tal_background_as_")}
    # the clip set's classes: the motion classes but the seed's unseen one, and still
    assert set(shares) == set(report["stage1_classes"]) == {*MOTION_CLASSES, "still"} - set(unseen_classes(0))
    assert sum(shares.values()) == pytest.approx(1.0) and report["stage1"]["val_tal_background_top_share"] == max(
        shares.values())
    for branch in BRANCH_STAGES:  # AP per class of the ground truth's classes
        assert set(report[branch]["per_class_average_AP"]) <= set(MOTION_CLASSES)
    # Ray's own messages are in the log file, not in the job's output
    assert "execution finished" not in output and "core_worker" not in output
    assert "Dataset" in (out / "lofi.log").read_text()
    for rel in ("data/annotations.json", "prepared/manifest.json", "runs/demo-smoke/lofi/train/encoder.pt",
                "runs/demo-smoke/baseline/features/features_manifest.json", "runs/demo-smoke/lofi/head/model.pt",
                "runs/demo-smoke/lofi/detect/predictions.json"):
        assert (out / rel).is_file(), rel
    assert f"files in {out}:" in output


def test_demo_job_is_tracked_on_the_clusters_mlflow_server(demo, ray_job_cluster):
    from mlflow import MlflowClient

    _, report, output = demo
    client = MlflowClient(tracking_uri=ray_job_cluster.tracking_uri)
    parent = client.get_run(report["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["lofi_average_mAP"] == pytest.approx(report["lofi"]["average_mAP"])
    assert "report.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_name for c in children} == DEMO_CHILDREN
    assert {c.info.status for c in children} == {"FINISHED"}
    assert ray_job_cluster.tracking_uri in output


def test_a_resubmitted_demo_reuses_every_stage(demo, ray_job_cluster):
    out, first, _ = demo
    _, output = ray_job_cluster.submit(*DEMO, "--out", str(out))
    assert "reusing the synth output" in output and "reusing the synth_clips output" in output
    second = json.loads((out / "report.json").read_text())
    assert second["lofi"]["reused_stages"] == list(first["lofi"]["stage_seconds"])
    assert second["lofi"]["average_mAP"] == first["lofi"]["average_mAP"]
    assert second["mlflow"]["parent_run_id"] != first["mlflow"]["parent_run_id"]
