"""Annotation formats: round trips, the variants seen in the wild, validation, and the real files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lofi.annotations import (
    AnnotationError,
    AnnotationSet,
    Detections,
    LabelVocab,
    Segment,
    Video,
    detections_from_results,
    load_annotations,
    load_predictions,
    save_activitynet,
    save_predictions,
)


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def anet(database, taxonomy=()):
    return {"version": "VERSION 1.3", "taxonomy": list(taxonomy), "database": database}


def entry(subset="validation", duration=60.0, annotations=(), **extra):
    return {"subset": subset, "duration": duration, "annotations": list(annotations), **extra}


def ann(start, end, label="Jump"):
    return {"segment": [start, end], "label": label}


SMALL = AnnotationSet(
    (
        Video("a", "training", 30.0, 25.0, (Segment(1.0, 4.5, "Jump"), Segment(10.0, 12.0, "Run"))),
        Video("b", "validation", 12.5, None, (Segment(0.0, 12.5, "Run"),)),
        Video("c", "testing", 8.0),
    ),
    LabelVocab.from_names(["Run", "Jump", "Swim"]),
)


def test_label_vocab_ids_are_positions_of_sorted_names():
    vocab = LabelVocab.from_names(["Swim", "Jump", "Run", "Jump"])
    assert vocab.names == ("Jump", "Run", "Swim")
    assert [vocab.index(n) for n in ("Jump", "Run", "Swim")] == [0, 1, 2]
    assert len(vocab) == 3 and list(vocab) == ["Jump", "Run", "Swim"]
    with pytest.raises(AnnotationError, match="'Fly' is not in the vocabulary"):
        vocab.index("Fly")
    with pytest.raises(ValueError, match="sorted"):
        LabelVocab(("b", "a"))


def test_activitynet_round_trip_keeps_everything(tmp_path):
    path = tmp_path / "gt.json"
    save_activitynet(SMALL, path)
    loaded = load_annotations(path)
    assert loaded == SMALL
    assert loaded.labels == SMALL.labels  # "Swim" has no segment but stays in the vocabulary (taxonomy)
    assert loaded.get("a").fps == 25.0 and loaded.get("b").fps is None
    val = loaded.subset("validation")
    assert val.video_ids == ("b",) and val.labels == SMALL.labels and val.num_segments == 1
    assert len(loaded) == 3 and loaded.num_segments == 3


def test_thumos_json_variant_in_the_wild(tmp_path):
    # Conversions of THUMOS14 to ActivityNet JSON: capitalised subsets, string times, extra keys, no taxonomy.
    data = {"database": {
        "video_validation_0000051": {"subset": "Validation", "duration": "169.8", "fps": 30.0, "annotations": [
            {"label": "Billiards", "segment": ["1.5", "3.25"], "segment(frames)": [45, 97], "label_id": 2}]},
        "video_test_0000004": {"subset": "Test", "duration": 33.7, "fps": "25", "annotations": []},
    }}
    loaded = load_annotations(write_json(tmp_path / "thumos.json", data))
    val, test = loaded.get("video_validation_0000051"), loaded.get("video_test_0000004")
    assert (val.subset, val.duration_sec, val.fps) == ("validation", 169.8, 30.0)
    assert val.segments == (Segment(1.5, 3.25, "Billiards"),)
    assert (test.subset, test.fps, test.segments) == ("testing", 25.0, ())
    assert loaded.labels.names == ("Billiards",)


def bad_database():
    return {
        "ok": entry(annotations=[ann(1, 2)]),
        "neg": entry(annotations=[ann(-1, 2), ann(3, 4)]),
        "backwards": entry(annotations=[ann(5, 4)]),
        "past_end": entry(duration=60.0, annotations=[ann(10, 61.5)]),  # tolerance max(1 s, 0.6 s) = 1 s
        "subset": entry(subset="holdout", annotations=[ann(1, 2)]),
        "nolabel": entry(annotations=[ann(1, 2, label="")]),
        "unknown": entry(annotations=[ann(1, 2, label="Jumpp")]),
        "notimes": entry(annotations=[{"segment": ["x", 2], "label": "Jump"}]),
    }


def test_every_problem_is_reported_at_once_with_file_video_and_field(tmp_path):
    taxonomy = [{"nodeId": 0, "nodeName": "Root", "parentId": None},
                {"nodeId": 1, "nodeName": "Jump", "parentId": 0}]
    path = write_json(tmp_path / "bad.json", anet(bad_database(), taxonomy))
    with pytest.raises(AnnotationError) as info:
        load_annotations(path)
    problems = info.value.problems
    expected = [
        ("neg", "annotations[0].segment", "negative start"),
        ("backwards", "annotations[0].segment", "end 4.0 is before start 5.0"),
        ("past_end", "annotations[0].segment", "runs past the video's duration 60.0 s"),
        ("subset", "subset", "unknown subset 'holdout'"),
        ("nolabel", "annotations[0].label", "empty or missing label"),
        ("unknown", "annotations[0].label", "unknown label 'Jumpp'"),
        ("notimes", "annotations[0].segment", "is not [start, end]"),
    ]
    assert len(problems) == len(expected), problems
    for problem, (vid, field, what) in zip(problems, expected):
        assert problem.startswith(f"{path}: video '{vid}': {field}: ") and what in problem
    assert "7 problems" in str(info.value) and "--skip-invalid" in str(info.value)


def test_skip_invalid_drops_bad_entries_and_says_how_many(tmp_path):
    path = write_json(tmp_path / "bad.json", anet(bad_database()))
    loaded = load_annotations(path, skip_invalid=True, labels=["Jump"])
    # The video with a bad subset goes; bad segments go, their videos stay.
    assert sorted(loaded.video_ids) == ["backwards", "neg", "nolabel", "notimes", "ok", "past_end", "unknown"]
    assert loaded.get("neg").segments == (Segment(3.0, 4.0, "Jump"),)
    assert loaded.num_segments == 2
    assert loaded.warnings[0].startswith(f"{path}: dropped 6 segment(s) and 1 video(s) with 7 problem(s)")


def test_ends_within_tolerance_are_clipped_beyond_are_errors(tmp_path):
    db = {
        "short": entry(duration=60.0, annotations=[ann(50, 60.9)]),  # 0.9 s over, tolerance 1 s
        "long": entry(duration=300.0, annotations=[ann(200, 302.9)]),  # 2.9 s over, tolerance 1% = 3 s
    }
    loaded = load_annotations(write_json(tmp_path / "gt.json", anet(db)))
    assert loaded.get("short").segments[0].end_sec == 60.0
    assert loaded.get("long").segments[0].end_sec == 300.0
    assert any("clipped the end of 2 segment(s)" in w for w in loaded.warnings)
    db["long"]["annotations"] = [ann(200, 303.1)]
    with pytest.raises(AnnotationError, match="'long'.*tolerance 3 s"):
        load_annotations(write_json(tmp_path / "gt2.json", anet(db)))


def test_lenient_keeps_suspect_segments_as_written(tmp_path):
    db = {"v": entry(duration=10.0, annotations=[ann(4, 4), ann(5, 15), ann(9, 10.5)])}
    path = write_json(tmp_path / "gt.json", anet(db))
    with pytest.raises(AnnotationError) as info:
        load_annotations(path)
    assert len(info.value.problems) == 2  # zero length, past the end; 10.5 is within the tolerance
    loaded = load_annotations(path, lenient=True)
    assert loaded.get("v").segments == (Segment(4.0, 4.0, "Jump"), Segment(5.0, 15.0, "Jump"), Segment(9.0, 10.5, "Jump"))
    assert loaded.warnings[0].endswith("kept 2 suspect segment(s) as written (lenient):")


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"database": {\n  "a": {"subset": "training",,\n}}')
    with pytest.raises(AnnotationError, match=r"broken.json: line 2, column 30: not valid JSON"):
        load_annotations(path)


def test_duplicate_video_ids_are_reported(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"database": {"a": {"subset": "training", "duration": 5, "annotations": []}, '
                    '"a": {"subset": "validation", "duration": 5, "annotations": []}}}')
    with pytest.raises(AnnotationError, match="video 'a': id: the same video id appears again"):
        load_annotations(path)
    assert load_annotations(path, skip_invalid=True).get("a").subset == "training"  # the first one is kept


def test_prediction_format_ground_truth_needs_metadata(tmp_path):
    path = write_json(tmp_path / "gt_as_pred.json", {"results": {"x1": [{"label": "Jump", "score": 1, "segment": [1, 2]}]}})
    with pytest.raises(AnnotationError, match="pass --metadata CSV"):
        load_annotations(path)
    meta = tmp_path / "meta.csv"
    meta.write_text("filename,video-duration,fps,video-frames\nv_x1.mp4,20.0,30,600\n")
    loaded = load_annotations(path, metadata=meta)
    assert loaded.get("x1") == Video("x1", "validation", 20.0, 30.0, (Segment(1.0, 2.0, "Jump"),))


def test_predictions_round_trip_and_string_values(tmp_path):
    det = Detections(np.array(["v2", "v1", "v2"], dtype=object), np.array([1.0, 0.5, 3.0]), np.array([2.0, 4.0, 3.5]),
                     np.array([0.9, 0.8, 0.1]), np.array(["Jump", "Run", ""], dtype=object))
    path = tmp_path / "pred.json"
    save_predictions(det, path)
    payload = json.loads(path.read_text())
    assert list(payload["results"]) == ["v2", "v1"] and "label" not in payload["results"]["v2"][1]
    back = load_predictions(path)
    assert back.video_id.tolist() == ["v2", "v2", "v1"]  # grouped by video, file order within
    assert back.start_sec.tolist() == [1.0, 3.0, 0.5] and back.label.tolist() == ["Jump", "", "Run"]
    strings = write_json(tmp_path / "s.json", {"results": {"v": [{"label": "Jump", "score": "0.5", "segment": ["1", "2.5"]}]}})
    assert load_predictions(strings).end_sec.tolist() == [2.5]


def test_bad_predictions_are_all_reported(tmp_path):
    path = write_json(tmp_path / "p.json", {"results": {"v": [
        {"label": "Jump", "score": 0.5, "segment": [1, 2]},
        {"label": "Jump", "score": "high", "segment": [1, 2]},
        {"label": "Jump", "score": 0.5, "segment": [3, 1]},
        {"label": 7, "score": 0.5, "segment": [1, 2]},
    ]}})
    with pytest.raises(AnnotationError) as info:
        load_predictions(path)
    assert [p.split(": ")[2] for p in info.value.problems] == ["results[1]", "results[2]", "results[3]"]
    assert "score 'high' is not a number" in info.value.problems[0]
    assert len(load_predictions(path, skip_invalid=True)) == 1


# Empty result lists, a video listed with nothing, a missing label (proposal), labels no
# ground truth knows, integer and exponent numbers, equal scores, a zero-length segment, an
# extra field: all well formed, so the columnar fast path must read them.
TRICKY_RESULTS = {
    "v1": [{"label": "Jump", "score": 0.5, "segment": [1, 2]}, {"label": "Run", "score": 0.5, "segment": [0, 3.25]},
           {"label": "Not a class", "score": 0.9, "segment": [2, 2]}],
    "v_empty": [],
    "v2": [{"score": 1, "segment": [0, 10]}, {"segment": [5, 7.5], "label": "Jump", "score": 0.5}],
    "v3": [{"label": "Jump", "score": 0.25, "segment": [1e-3, 4e5], "extra": {"k": [1]}}],
    "v_empty_too": [],
}


def plain_rows(results: dict) -> list[tuple]:
    """The reading rule written as the plainest loop: file order, float(), a missing label is ""."""
    return [(video, float(e["segment"][0]), float(e["segment"][1]), float(e["score"]), e.get("label", ""))
            for video, entries in results.items() for e in entries]


def test_fast_prediction_reader_equals_a_plain_row_loop(tmp_path):
    from lofi.annotations import predictions

    path = write_json(tmp_path / "p.json", {"version": "VERSION 1.3", "results": TRICKY_RESULTS})
    assert predictions._fast_columns(TRICKY_RESULTS) is not None  # the fast path, not the entry-by-entry one
    det = load_predictions(path)
    got = list(zip(det.video_id.tolist(), det.start_sec.tolist(), det.end_sec.tolist(), det.score.tolist(),
                   det.label.tolist()))
    assert got == plain_rows(TRICKY_RESULTS)
    assert [c.dtype for c in (det.video_id, det.start_sec, det.end_sec, det.score, det.label)] == \
        [object, np.float64, np.float64, np.float64, object]
    in_memory = detections_from_results(TRICKY_RESULTS)
    assert in_memory.video_id.tolist() == det.video_id.tolist() and in_memory.score.tolist() == det.score.tolist()
    empty = load_predictions(write_json(tmp_path / "e.json", {"results": {"a": [], "b": []}}))
    assert len(empty) == 0 and empty.start_sec.dtype == np.float64


@pytest.mark.parametrize("results, problem", [
    ({"v": [{"label": "J", "score": float("nan"), "segment": [1, 2]}]}, "must be finite numbers"),
    ({"v": [{"label": "J", "score": 0.5, "segment": [1, 2, 3]}]}, "is not [start, end]"),
    ({"v": [{"label": "J", "score": True, "segment": [1, 2]}, {"label": ["J"], "score": 1, "segment": [1, 2]}]},
     "label ['J'] is not a string"),
    ({"v": {"label": "J"}}, "must be a list, got dict"),
])
def test_prediction_reader_names_problems_the_fast_path_leaves_to_the_checked_one(tmp_path, results, problem):
    path = write_json(tmp_path / "p.json", {"results": results})
    with pytest.raises(AnnotationError) as info:
        load_predictions(path)
    assert problem in str(info.value) and "video 'v'" in str(info.value)


def test_repeated_video_id_in_predictions_is_reported(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"results": {"v": [{"label": "J", "score": 1, "segment": [1, 2]}], '
                    '"v": [{"label": "J", "score": 1, "segment": [3, 4]}]}}')
    with pytest.raises(AnnotationError, match="the same video id appears again"):
        load_predictions(path)
    assert load_predictions(path, skip_invalid=True).start_sec.tolist() == [1.0]


# --- the real files -------------------------------------------------------------------------


def anet_expected(shared_data):
    """Counts and suspect segments of the real ActivityNet val GT, computed here with json/csv."""
    results = json.loads((shared_data / "activitynet/sample_detection_prediction.json").read_text())["results"]
    with open(shared_data / "activitynet/activitynet_v1-3_valid_metadata.csv") as f:
        duration = {row["filename"][2:-4]: float(row["video-duration"]) for row in csv.DictReader(f)}
    suspects = set()
    for vid, entries in results.items():
        for i, e in enumerate(entries):
            start, end = e["segment"]
            tol = max(1.0, 0.01 * duration[vid])
            if end == start or start >= duration[vid] or end > duration[vid] + tol:
                suspects.add((vid, i))
    labels = {e["label"] for entries in results.values() for e in entries}
    return len(results), sum(map(len, results.values())), labels, suspects


def test_real_activitynet_validation(shared_data):
    gt_path = shared_data / "activitynet/sample_detection_prediction.json"
    meta = shared_data / "activitynet/activitynet_v1-3_valid_metadata.csv"
    num_videos, num_segments, labels, suspects = anet_expected(shared_data)
    assert (num_videos, num_segments, len(labels)) == (4926, 7654, 200)
    loaded = load_annotations(gt_path, metadata=meta, lenient=True,
                              labels=shared_data / "activitynet/activitynet_v1-3_action_label_mapping.json")
    assert (len(loaded), loaded.num_segments, len(loaded.labels)) == (4926, 7654, 200)
    assert loaded.labels.names == tuple(sorted(labels))
    assert loaded.subset_counts()["validation"] == 4926
    first = loaded.get("JDg--pjY5gg")  # metadata row v_JDg--pjY5gg.mp4: 126.133333333333 s, 30 fps
    assert (first.duration_sec, first.fps) == (126.133333333333, 30.0)
    # Strictly, the real file has a few zero-length or past-the-end segments: all listed at once.
    with pytest.raises(AnnotationError) as info:
        load_annotations(gt_path, metadata=meta)
    found = {(p.split("video '")[1].split("'")[0], int(p.split("results[")[1].split("]")[0])) for p in info.value.problems}
    assert found == suspects and len(suspects) == 6
    assert load_annotations(gt_path, metadata=meta, skip_invalid=True).num_segments == 7654 - len(suspects)


def test_real_thumos14_test(shared_data):
    gt_path = shared_data / "thumos14/thumos14_test_tsp_groundtruth.csv"
    meta_path = shared_data / "thumos14/thumos14_test_metadata.csv"
    with open(gt_path) as f:
        rows = list(csv.DictReader(f))
    with open(meta_path) as f:
        duration = {row["filename"][:-4]: float(row["video-duration"]) for row in csv.DictReader(f)}
    actions = [r for r in rows if r["temporal-region-label"] == "Action"]
    past_end = [r for r in actions if float(r["t-end"]) > duration[r["video-name"]] + max(1.0, 0.01 * duration[r["video-name"]])]
    loaded = load_annotations(gt_path, metadata=meta_path, lenient=True)
    assert len(loaded) == len({r["video-name"] for r in rows})
    assert loaded.num_segments == len(actions)
    assert loaded.labels.names == tuple(sorted({r["action-label"] for r in actions}))
    assert set(loaded.subset_counts().items()) >= {("testing", len(loaded))}
    with pytest.raises(AnnotationError) as info:
        load_annotations(gt_path, metadata=meta_path)
    assert len(info.value.problems) == len(past_end) > 0
    # The known THUMOS14 annotation errors (e.g. video_test_0000270 annotated past its 176 s).
    assert {p.split("video '")[1].split("'")[0] for p in info.value.problems} == {r["video-name"] for r in past_end}


def test_kinetics_csv_rows_are_trimmed_clips_one_segment_each(tmp_path):
    path = tmp_path / "clips.csv"
    path.write_text("label,youtube_id,time_start,time_end,split,is_cc\n"
                    "abseiling,--07WQ2iBlw,1,11,train,0\n"
                    "rotate,clip_00003,0,2,val,0\n"
                    "rotate,clip_00004,0,2,test,0\n")
    ann = load_annotations(path)  # found by its header, not by the extension alone
    by_id = {v.video_id: v for v in ann.videos}
    assert set(by_id) == {"--07WQ2iBlw_000001_000011", "clip_00003_000000_000002", "clip_00004_000000_000002"}
    clip = by_id["--07WQ2iBlw_000001_000011"]
    assert clip.subset == "training" and clip.duration_sec == 10.0
    assert [(s.start_sec, s.end_sec, s.label) for s in clip.segments] == [(0.0, 10.0, "abseiling")]
    assert by_id["clip_00003_000000_000002"].subset == "validation"
    assert by_id["clip_00004_000000_000002"].subset == "testing"
    assert list(ann.labels) == ["abseiling", "rotate"]


def test_kinetics_csv_problems_name_the_line_and_field(tmp_path):
    path = tmp_path / "clips.csv"
    path.write_text("label,youtube_id,time_start,time_end,split\n"
                    "grow,a,0,2,train\n"
                    ",b,0,2,train\n"
                    "grow,c,x,2,train\n"
                    "grow,d,3,3,bogus\n")
    with pytest.raises(AnnotationError) as err:
        load_annotations(path)
    text = str(err.value)
    assert "line 3 label" in text and "line 4 time_start/time_end" in text
    assert "'d_000003_000003'" in text and "unknown subset 'bogus'" in text
    kept = {v.video_id: v for v in load_annotations(path, skip_invalid=True).videos}
    assert set(kept) == {"a_000000_000002", "b_000000_000002"}  # bad times or split drop the clip
    assert kept["b_000000_000002"].segments == ()  # an unlabelled clip yields no training clip
