"""THUMOS14's way on generated long videos: a fixed-stride level -> `lofi extract` -> `lofi train-head`
on sliding windows -> `lofi detect` merging each video's windows -> eval.json at THUMOS's tIoUs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from lofi.config import from_dict
from lofi.models.encoders import EncoderConfig, build_encoder
from lofi_cli.commands import main as lofi_main
from pipelines.data.prepare import PrepareConfig, run as prepare

pytestmark = pytest.mark.ray
STRIDE_SEC, WINDOW, OVERLAP = 1.0, 16, 0.5  # windows of 16 s, 8 s apart
LEVEL = {"name": "stride", "snippet_stride_sec": STRIDE_SEC, "frames_per_snippet": 2, "size_px": 32,
         "snippets_per_row": 16}


def expected_windows(duration_sec: float) -> int:
    """Windows of a video, counted by hand: one when it fits in a window, else one every
    8 snippets until the last one, which ends at the video's end."""
    num_snippets = math.ceil(duration_sec / STRIDE_SEC)
    if num_snippets <= WINDOW:
        return 1
    step = round(WINDOW * (1 - OVERLAP))
    return math.ceil((num_snippets - WINDOW) / step) + 1


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory) -> Path:
    """`lofi synth`: 4 untrimmed videos of 12-90 s at 32 px, 4 fps, each with many 1-3 s actions."""
    out = tmp_path_factory.mktemp("thumos_like")
    argv = ["synth", str(out), "--videos", "4", "--seed", "2", "--size-px", "32", "--fps", "4", "--min-duration-sec",
            "12", "--max-duration-sec", "90", "--min-instance-sec", "1", "--max-instance-sec", "3", "--val-fraction",
            "0.5", "--quiet"]
    assert lofi_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def windowed_run(ray_cluster, long_videos, tmp_path_factory):
    """prepare (stride level) -> extract (tiny encoder) -> train-head on windows -> detect, by the CLI."""
    tmp = tmp_path_factory.mktemp("thumos_run")
    prepare(from_dict(PrepareConfig, {"input": {"annotations": str(long_videos / "annotations.json"),
                                                "videos": str(long_videos / "videos")},
                                      "output": str(tmp / "shards"), "levels": [LEVEL], "num_workers": 2}),
            verbose=False)
    torch.manual_seed(0)
    torch.save(build_encoder(EncoderConfig(width=8)).state_dict(), tmp / "encoder.pt")
    config = {
        "run": {"name": "thumos_like", "storage": str(tmp / "runs")},
        "data": {"shards": str(tmp / "shards"), "full_level": "stride", "train_subset": "training",
                 "val_subset": "validation", "window_snippets": WINDOW, "window_overlap": OVERLAP},
        "encoder": {"width": 8, "checkpoint": str(tmp / "encoder.pt")},
        "head": {"name": "bmn", "hidden": 16, "num_sample": 4, "num_sample_perbin": 1, "max_duration": 8},
        "train_head": {"optimizer": "adamw", "lr": 0.003, "epochs": 1, "batch_size": 4},
        "detect": {"protocol": "thumos", "top_k": 40},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "tracking": {"enabled": False},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    for command in ("extract", "train-head", "detect"):
        assert lofi_main([command, "--config", str(path)]) == 0, command
    run_dir = tmp / "runs" / "thumos_like"
    database = json.loads((long_videos / "annotations.json").read_text())["database"]
    return run_dir, database


def test_detections_cover_each_whole_video_and_never_its_padding(windowed_run):
    run_dir, database = windowed_run
    results = json.loads((run_dir / "detect" / "predictions.json").read_text())["results"]
    val = {vid: v for vid, v in database.items() if v["subset"] == "validation"}
    assert sorted(results) == sorted(val)
    beyond_first_window = 0
    for vid, entries in results.items():
        duration = val[vid]["duration"]
        assert entries and len(entries) <= 40
        assert all(0.0 <= e["segment"][0] < e["segment"][1] <= duration for e in entries), vid
        beyond_first_window += sum(e["segment"][0] >= WINDOW * STRIDE_SEC for e in entries)
    assert any(v["duration"] > 2 * WINDOW * STRIDE_SEC for v in val.values())  # the data has long videos
    assert beyond_first_window > 0  # later windows' detections reached video time


def test_head_trains_on_windows_counted_as_expected(windowed_run):
    run_dir, database = windowed_run
    model = json.loads((run_dir / "head" / "model.json").read_text())
    assert model["num_snippets"] == WINDOW  # the head's grid is one window
    windows = model["windows"]
    assert (windows["window_snippets"], windows["window_overlap"], windows["snippet_stride_sec"]) == \
           (WINDOW, OVERLAP, STRIDE_SEC)
    by_subset = {s: [v["duration"] for v in database.values() if v["subset"] == s] for s in ("training", "validation")}
    assert windows["val_windows"] == sum(map(expected_windows, by_subset["validation"]))
    # training: every window holding an action (these videos are dense with them), at most all windows
    assert 0 < windows["train_windows"] <= sum(map(expected_windows, by_subset["training"]))


def test_eval_json_scores_at_thumos_tious(windowed_run):
    run_dir, database = windowed_run
    saved = json.loads((run_dir / "detect" / "eval.json").read_text())
    assert saved["tiou_thresholds"] == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7])
    assert len(saved["mAP"]) == 5 and 0.0 <= saved["average_mAP"] <= 1.0
    assert saved["num_videos"] == sum(v["subset"] == "validation" for v in database.values())


def test_window_plan_labels_and_training_choice_worked_by_hand():
    """No Ray: a 40 s video at 1 s snippets, windows of 16 every 8 -> starts 0, 8, 16, 24; its
    action (14, 18) s is half in window 0, whole in window 8, half in window 16, absent from 24."""
    from pipelines.data.batches import VideoLabel
    from pipelines.config import DataSection
    from pipelines.data.feature_windows import plan_windows, training_windows, window_labels

    videos = {0: VideoLabel("a", "training", 40.0, ((14.0, 18.0),), (1,), ("jump",)),
              1: VideoLabel("b", "validation", 5.5, (), (), ())}
    windows = plan_windows({"a": 40.0, "b": 5.5}, DataSection(window_snippets=16, window_overlap=0.5), 1.0)
    assert [(w.video_id, w.start, w.start_sec, w.valid_end_sec) for w in windows.values()] == \
           [("a", 0, 0.0, 16.0), ("a", 8, 8.0, 24.0), ("a", 16, 16.0, 32.0), ("a", 24, 24.0, 40.0), ("b", 0, 0.0, 5.5)]
    labels = window_labels(windows, videos, 16, 1.0)
    assert [labels[i].segments_sec for i in range(5)] == [((14.0, 16.0),), ((6.0, 10.0),), ((0.0, 2.0),), (), ()]
    assert labels[1].duration_sec == 16.0 and labels[1].labels == ("jump",) and labels[1].label_ids == (1,)
    # training: the windows with ground truth; an empty one only when its draw falls under the fraction
    assert training_windows(labels, "training", 0.0, seed=0) == [0, 1, 2]
    assert training_windows(labels, "training", 1.0, seed=0) == [0, 1, 2, 3]
    many = {i: VideoLabel(f"v{i}", "training", 16.0, (), (), ()) for i in range(400)}
    chosen = training_windows(many, "training", 0.25, seed=3)
    assert chosen == training_windows(many, "training", 0.25, seed=3) and 60 < len(chosen) < 140  # ~100 of 400
