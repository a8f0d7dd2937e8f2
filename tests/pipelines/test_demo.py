"""`lofi demo --smoke`, for real: every stage on the shared Ray cluster, tracked in MLflow, then rerun (reused)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from pipelines.cli import main as lofi_main

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ANET_TIOU = [0.5 + 0.05 * i for i in range(10)]
BRANCH_STAGES = {"baseline": {"pretrain", "extract", "train_head", "detect"},
                 "lofi": {"pretrain", "train", "extract", "train_head", "detect"},
                 "full_end_to_end": {"pretrain", "train", "extract", "train_head", "detect"}}
CHILDREN = {"synth", "synth_clips", "prepare", "prepare_clips", "stage1/pretrain"} | {
    f"{branch}/{stage}" for branch, stages in BRANCH_STAGES.items() for stage in stages - {"pretrain"}}


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


def test_report_has_three_branches_with_scores_memory_times_and_stage1_accuracy(demo):
    out, report = demo
    for branch, stages in BRANCH_STAGES.items():
        b = report[branch]
        assert b["tiou_thresholds"] == pytest.approx(ANET_TIOU)
        assert len(b["mAP"]) == 10 and all(0.0 <= m <= 1.0 for m in b["mAP"])
        assert b["average_mAP"] == pytest.approx(statistics.fmean(b["mAP"]))
        assert set(b["stage_seconds"]) == stages and all(s > 0 for s in b["stage_seconds"].values())
        assert b["num_validation_videos"] == 1 and Path(b["predictions"]).is_file()
        assert json.loads(Path(b["eval"]).read_text())["average_mAP"] == b["average_mAP"]
    # the frozen encoder's head-only step < a step at the largest LoFi level < full fidelity end to end
    assert 0 < report["baseline"]["activation_memory_bytes"] < report["lofi"]["activation_memory_bytes"] \
        < report["full_end_to_end"]["activation_memory_bytes"] == report["full_fidelity_activation_memory_bytes"]
    # every branch's first stage is the same stage-1 run
    assert len({report[b]["stage_seconds"]["pretrain"] for b in BRANCH_STAGES}) == 1
    for key in ("synth", "synth_clips", "prepare", "prepare_clips"):
        assert report["data_seconds"][key] > 0, key
    # stage 1 trained on the clip set and was scored on held-out clips and on the TAL validation snippets
    for key in ("val_balanced_accuracy", "val_tal_balanced_accuracy"):
        assert 0.0 <= report["stage1"][key] <= 1.0, key


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
    for rel in ("data/annotations.json", "clips/clips.csv", "prepared/manifest.json", "prepared_clips/manifest.json",
                "runs/demo-smoke/stage1/pretrain/encoder.pt", "runs/demo-smoke/lofi/train/encoder.pt",
                "runs/demo-smoke/full_end_to_end/train/encoder.pt",
                "runs/demo-smoke/baseline/features/features_manifest.json", "runs/demo-smoke/lofi/head/model.pt",
                "runs/demo-smoke/baseline/detect/eval.json", "runs/demo-smoke/lofi/detect/predictions.json"):
        assert (out / rel).is_file(), rel
    capsys.readouterr()
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        assert lofi_main(["demo", "--smoke", "--out", str(out)]) == 0
    finally:
        mp.undo()
    printed = capsys.readouterr().out
    assert "reusing the synth output" in printed and "reusing the synth_clips output" in printed
    assert "mlflow ui --backend-store-uri sqlite:///" in printed and f"files in {out}:" in printed
    second = json.loads((out / "report.json").read_text())
    assert second["lofi"]["reused_stages"] == list(first["lofi"]["stage_seconds"])
    assert second["lofi"]["average_mAP"] == first["lofi"]["average_mAP"]
    assert second["mlflow"]["parent_run_id"] != first["mlflow"]["parent_run_id"]
