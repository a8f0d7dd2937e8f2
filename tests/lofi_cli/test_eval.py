"""`lofi eval` and `lofi annotations` as a user runs them, through the `lofi` entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lofi.annotations import load_annotations, save_predictions
from lofi.annotations.types import Detections
from lofi_cli.commands import main as lofi


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = lofi(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_activitynet_validation_scored_against_itself_is_perfect(shared_data, capsys):
    gt = shared_data / "activitynet/sample_detection_prediction.json"
    code, out, err = run(capsys, "eval", "--ground-truth", str(gt), "--predictions", str(gt),
                         "--metadata", str(shared_data / "activitynet/activitynet_v1-3_valid_metadata.csv"), "--json")
    assert code == 0, err
    result = json.loads(out)  # stdout holds exactly one JSON object
    assert result["tiou_thresholds"] == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    assert result["mAP"] == [1.0] * 10 and result["average_mAP"] == 1.0
    assert len(result["per_class_ap"]) == 200 and all(v == [1.0] * 10 for v in result["per_class_ap"].values())
    assert (result["num_videos"], result["num_predictions"], result["unknown_labels"]) == (4926, 7654, {})
    assert "kept 6 suspect segment(s)" in err  # the real file's zero-length / past-the-end segments, listed


def test_thumos_protocol_blocked_list_and_table(shared_data, tmp_path, capsys):
    gt_path = shared_data / "thumos14/thumos14_test_tsp_groundtruth.csv"
    gt = load_annotations(gt_path, lenient=True)
    rows = [(v.video_id, s.start_sec, s.end_sec, s.label) for v in gt.videos for s in v.segments]
    vids, starts, ends, labels = zip(*rows)
    # The ground truth as predictions, plus a wrong one on a video we then block.
    pred = Detections(list(vids) + ["video_test_0000004"], list(starts) + [20.0], list(ends) + [25.0],
                      [1.0] * len(rows) + [2.0], list(labels) + ["CricketBowling"])
    save_predictions(pred, tmp_path / "pred.json")
    blocked = tmp_path / "blocked.txt"
    blocked.write_text("video_test_0000004\n")
    common = ("eval", "--ground-truth", str(gt_path), "--predictions", str(tmp_path / "pred.json"), "--subset", "testing")
    code, out, _ = run(capsys, *common, "--protocol", "thumos", "--json")
    assert code == 0 and json.loads(out)["mAP"][0] < 1.0  # the wrong detection costs precision
    code, out, _ = run(capsys, *common, "--protocol", "thumos", "--blocked", str(blocked), "--json")
    result = json.loads(out)
    assert result["tiou_thresholds"] == [0.3, 0.4, 0.5, 0.6, 0.7] and result["mAP"] == [1.0] * 5
    assert result["num_videos"] == len(gt) - 1
    code, out, _ = run(capsys, *common, "--tiou", "0.5,0.9", "--blocked", str(blocked))
    assert code == 0 and "0.50  100.00%" in out and "0.90  100.00%" in out and "avg   100.00%" in out


def test_proposals_json(tmp_path, capsys):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"database": {"a": {"subset": "validation", "duration": 60, "annotations": [
        {"segment": [0, 10], "label": "X"}, {"segment": [20, 30], "label": "X"}]}}}))
    pred = tmp_path / "p.json"
    pred.write_text(json.dumps({"results": {"a": [{"score": 0.9, "segment": [0, 10]}, {"score": 0.5, "segment": [20, 30]}]}}))
    code, out, _ = run(capsys, "eval", "--ground-truth", str(gt), "--predictions", str(pred), "--proposals",
                       "--max-avg-proposals", "2", "--json")
    result = json.loads(out)
    assert code == 0 and result["average_recall"][-1] == 1.0 and result["num_proposals"] == 2
    assert {"AUC", "AR@1", "AR@5", "AR@10", "AR@100"} <= set(result)


def test_eval_starts_without_torch_or_pandas(tmp_path):
    """`lofi eval` is a quick command: its process never pays for importing torch or pandas."""
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"database": {"a": {"subset": "validation", "duration": 60, "annotations": [
        {"segment": [0, 10], "label": "X"}]}}}))
    pred = tmp_path / "p.json"
    pred.write_text(json.dumps({"results": {"a": [{"label": "X", "score": 0.9, "segment": [0, 10]}]}}))
    code = ("import sys; from lofi_cli.commands import main; "
            f"assert main(['eval', '--ground-truth', {str(gt)!r}, '--predictions', {str(pred)!r}, '--json']) == 0; "
            "print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"

def test_eval_reports_bad_inputs_with_status_2(tmp_path, capsys):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"database": {"a": {"subset": "validation", "duration": 60,
                                                 "annotations": [{"segment": [0, 10], "label": "X"}]}}}))
    pred = tmp_path / "p.json"
    pred.write_text(json.dumps({"results": {"a": [{"label": "X", "score": "?", "segment": [0, 1]},
                                                  {"label": "X", "score": 1, "segment": [5]}]}}))
    code, out, err = run(capsys, "eval", "--ground-truth", str(gt), "--predictions", str(pred), "--json")
    assert code == 2 and out == ""
    assert "results[0]: score '?' is not a number" in err and "results[1]: segment [5] is not [start, end]" in err
    code, _, err = run(capsys, "eval", "--ground-truth", str(gt), "--predictions", str(pred), "--subset", "testing")
    assert code == 2 and "no videos in subset 'testing'" in err
    code, _, err = run(capsys, "eval", "--predictions", str(pred))
    assert code == 2 and "--ground-truth" in err


@pytest.mark.parametrize("command", ["eval", "annotations"])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as info:
        lofi([command, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.count("--") >= 8


def test_annotations_summary_conversion_and_errors(tmp_path, capsys):
    csv_path = tmp_path / "thumos.csv"
    csv_path.write_text("video-name,t-start,t-end,action-label,video-duration,temporal-region-label\n"
                        "video_test_1,1.0,2.0,Dive,30.0,Action\nvideo_test_1,2.0,5.0,,30.0,No action\n"
                        "video_validation_2,3.0,4.5,Jump,20.0,Action\n")
    out_json = tmp_path / "out.json"
    code, out, _ = run(capsys, "annotations", str(csv_path), "--subset", "testing", "--to-activitynet", str(out_json))
    assert code == 0 and "videos: 1 (training 0, validation 0, testing 1)" in out and "segments: 1" in out
    converted = load_annotations(out_json)
    assert converted.video_ids == ("video_test_1",) and converted.get("video_test_1").duration_sec == 30.0
    assert converted.labels.names == ("Dive", "Jump")  # the vocabulary of the whole file is kept
    csv_path.write_text("video-name,t-start,t-end,action-label,video-duration\nclip,5.0,2.0,Dive,30.0\nclip,1.0,40.0,,30.0\n")
    code, out, err = run(capsys, "annotations", str(csv_path))
    assert code == 2 and out == ""
    assert "video 'clip': subset: no subset; add one" in err and "--assign-subset" in err
    assert "line 2 t-start/t-end: end 2.0 is before start 5.0" in err
    assert "line 3 action-label: empty or missing label" in err and "line 3 t-start/t-end: [1.0, 40.0] runs past" in err
    code, out, err = run(capsys, "annotations", str(csv_path), "--assign-subset", "training", "--skip-invalid")
    assert code == 0 and "segments: 0" in out and "dropped 2 segment(s) and 0 video(s)" in err
