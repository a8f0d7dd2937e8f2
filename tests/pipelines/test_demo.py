"""`lofi demo --smoke`, for real: every stage on the shared Ray cluster, tracked in MLflow, then rerun (reused)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from pipelines.cli import main as lofi_main

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ANET_TIOU = [0.5 + 0.05 * i for i in range(10)]
CHILDREN = {"synth", "prepare", "stage1/pretrain", "lofi/train", "baseline/extract", "baseline/train_head",
            "baseline/detect", "lofi/extract", "lofi/train_head", "lofi/detect"}


@pytest.fixture(scope="module")
def demo(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the demo's default: a SQLite file in --out
    try:
        assert lofi_main(["demo", "--smoke", "--out", str(out)]) == 0
    finally:
        mp.undo()
    return out, json.loads((out / "report.json").read_text())


def test_report_has_both_branches_with_scores_memory_and_times(demo):
    out, report = demo
    for branch, stages in (("baseline", {"pretrain", "extract", "train_head", "detect"}),
                           ("lofi", {"pretrain", "train", "extract", "train_head", "detect"})):
        b = report[branch]
        assert b["tiou_thresholds"] == pytest.approx(ANET_TIOU)
        assert len(b["mAP"]) == 10 and all(0.0 <= m <= 1.0 for m in b["mAP"])
        assert b["average_mAP"] == pytest.approx(statistics.fmean(b["mAP"]))
        assert set(b["stage_seconds"]) == stages and all(s > 0 for s in b["stage_seconds"].values())
        assert b["num_validation_videos"] == 1 and Path(b["predictions"]).is_file()
        assert json.loads(Path(b["eval"]).read_text())["average_mAP"] == b["average_mAP"]
    # the frozen encoder's head-only step < a step at the largest LoFi level < full fidelity end to end
    assert 0 < report["baseline"]["activation_memory_bytes"] < report["lofi"]["activation_memory_bytes"] \
        < report["full_fidelity_activation_memory_bytes"]
    # both branches' first stage is the same stage-1 run
    assert report["baseline"]["stage_seconds"]["pretrain"] == report["lofi"]["stage_seconds"]["pretrain"]
    assert report["data_seconds"]["synth"] > 0 and report["data_seconds"]["prepare"] > 0


def test_mlflow_holds_one_finished_parent_with_every_stage_as_a_finished_child(demo):
    from mlflow import MlflowClient

    out, report = demo
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    parent = client.get_run(report["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["lofi_average_mAP"] == pytest.approx(report["lofi"]["average_mAP"])
    assert "report.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_name for c in children} == CHILDREN
    assert {c.info.status for c in children} == {"FINISHED"}
    assert report["mlflow"]["ui"] == f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}"


def test_the_demo_lists_its_files_and_a_rerun_reuses_every_stage(demo, capsys):
    out, first = demo
    for rel in ("data/annotations.json", "prepared/manifest.json", "runs/stage1/pretrain/encoder.pt",
                "runs/lofi/train/encoder.pt", "runs/baseline/features/features_manifest.json",
                "runs/lofi/head/model.pt", "runs/baseline/detect/eval.json", "runs/lofi/detect/predictions.json"):
        assert (out / rel).is_file(), rel
    capsys.readouterr()
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        assert lofi_main(["demo", "--smoke", "--out", str(out)]) == 0
    finally:
        mp.undo()
    printed = capsys.readouterr().out
    assert "reusing the dataset" in printed and "mlflow ui --backend-store-uri sqlite:///" in printed
    assert f"files in {out}: report.json" in printed
    second = json.loads((out / "report.json").read_text())
    assert second["lofi"]["reused_stages"] == list(first["lofi"]["stage_seconds"])
    assert second["lofi"]["average_mAP"] == first["lofi"]["average_mAP"]
    assert second["mlflow"]["parent_run_id"] != first["mlflow"]["parent_run_id"]
