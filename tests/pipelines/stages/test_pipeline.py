"""`lofi pipeline` for real on a tiny generated dataset: every stage, the report, reuse, --from, early errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lofi_cli.commands import main as lofi_main

pytestmark = [pytest.mark.ray, pytest.mark.slow]
LEVELS = {"full": (8, 32), "s_lofi": (8, 16), "t_lofi": (4, 32), "st_lofi": (6, 24)}  # name -> (T, S); F = 2


def write_config(tmp: Path, data: Path, **data_keys: str) -> Path:
    config = {
        "run": {"name": "mine", "storage": str(tmp / "runs"), "seed": 1},
        "data": {"videos": str(data / "videos"), "annotations": str(data / "annotations.json"), **data_keys},
        "prepare": {"num_workers": 2, "videos_per_part": 3, "max_error_fraction": 0.0},
        "encoder": {"width": 8, "shift_div": 4},
        "head": {"name": "gtad", "hidden": 16, "cardinality": 4, "num_gcnext": 1, "num_align_samples": 4},
        "fidelity": {"kind": "c_lofi", "overrides": {n: {"num_snippets": t, "frames_per_snippet": 2, "size_px": s}
                                                     for n, (t, s) in LEVELS.items()}},
        "pretrain": {"optimizer": "adamw", "lr": 1e-3, "epochs": 1, "batch_size": 16},
        "train": {"optimizer": "adamw", "lr": 1e-3, "epochs": 1, "batch_size": 2},
        "train_head": {"epochs": 1, "batch_size": 2},
        "detect": {"top_k": 20},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "pipeline-test"},
    }
    path = tmp / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def dataset(tiny_tal_videos) -> Path:
    return tiny_tal_videos


@pytest.fixture(scope="module")
def first_run(ray_cluster, dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    config = write_config(tmp, dataset)
    assert lofi_main(["pipeline", "--config", str(config), "--baseline"]) == 0
    return tmp, config, json.loads((tmp / "runs" / "mine" / "report.json").read_text())


def test_one_command_runs_every_stage_and_reports_both_branches(first_run):
    tmp, _, report = first_run
    run = tmp / "runs" / "mine"
    for rel in ("prepared/manifest.json", "stage1/pretrain/encoder.pt", "lofi/train/encoder.pt",
                "lofi/features/features_manifest.json", "lofi/head/model.pt", "lofi/detect/predictions.json",
                "baseline/features/features_manifest.json", "baseline/detect/eval.json"):
        assert (run / rel).is_file(), rel
    assert not (run / "baseline" / "train").exists()  # the baseline has no stage 2
    # the levels were derived from the pipeline config: the shards hold exactly the schedule's levels
    manifest = json.loads((run / "prepared" / "manifest.json").read_text())
    assert {(lv["name"], lv["num_snippets"], lv["size_px"]) for lv in manifest["levels"]} == {
        (n, t, s) for n, (t, s) in LEVELS.items()}
    for branch in ("baseline", "lofi"):
        assert 0.0 <= report[branch]["average_mAP"] <= 1.0 and report[branch]["num_validation_videos"] == 2
        assert report[branch]["reused_stages"] == []
        # stage 1 trained from random initialisation on the TAL videos themselves: no external data
        external = json.loads((run / branch / "detect" / "predictions.json").read_text())["external_data"]
        assert external["used"] is False and "random initialisation" in external["details"], external
    assert set(report["lofi"]["stage_seconds"]) == {"pretrain", "train", "extract", "train_head", "detect"}
    for branch in ("baseline", "lofi"):  # each class's AP over the thresholds, as detect's eval.json has it
        per_class = json.loads((run / branch / "detect" / "eval.json").read_text())["per_class_ap"]
        assert report[branch]["per_class_average_AP"] == {k: sum(v) / len(v) for k, v in per_class.items()}
    # stage 1 trained on the TAL videos' own classes (its classes.json): the table marks none untaught
    assert set(report["baseline"]["per_class_average_AP"]) <= set(report["stage1_classes"])
    assert "lofi pipeline: " in (run / "lofi.log").read_text()  # Ray's and MLflow's messages: in the run folder
    assert report["data_seconds"]["prepare"] > 0 and (run / "records" / "prepare.json").is_file()


def test_a_rerun_reuses_every_stage_and_from_train_reruns_stage2_and_its_dependents_only(first_run, capsys):
    tmp, config, first = first_run
    assert lofi_main(["pipeline", "--config", str(config), "--baseline"]) == 0
    second = json.loads((tmp / "runs" / "mine" / "report.json").read_text())
    for branch in ("baseline", "lofi"):
        assert second[branch]["reused_stages"] == list(first[branch]["stage_seconds"])
        assert second[branch]["average_mAP"] == first[branch]["average_mAP"]
    assert "reusing prepare" in capsys.readouterr().out
    assert lofi_main(["pipeline", "--config", str(config), "--baseline", "--from", "train"]) == 0
    third = json.loads((tmp / "runs" / "mine" / "report.json").read_text())
    assert third["lofi"]["reused_stages"] == ["pretrain"]
    assert third["baseline"]["reused_stages"] == list(first["baseline"]["stage_seconds"])


def test_input_problems_are_reported_together_before_any_work(dataset, tmp_path, capsys):
    config = write_config(tmp_path, dataset, pretrain_annotations=str(tmp_path / "missing.csv"),
                          pretrain_videos=str(tmp_path / "no_clips"))
    code = lofi_main(["pipeline", "--config", str(config), "--set", "encoder.checkpoint=/nonexistent/encoder.pt",
                      "--set", f"data.videos={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert code == 2 and "4 problem(s)" in err
    for key in ("data.videos", "data.pretrain_annotations", "data.pretrain_videos", "encoder.checkpoint"):
        assert key in err
    assert not (tmp_path / "runs" / "mine" / "prepared").exists()
