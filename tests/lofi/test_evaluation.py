"""Detection mAP and proposal AR@AN: hand-worked cases, properties, and the naive reference.

Segments are [start, end] in seconds; "tIoU" values in comments are worked by hand.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lofi.annotations import AnnotationSet, Detections, LabelVocab, Segment, Video
from lofi.evaluation import evaluate_detection, evaluate_proposals, read_blocked, tiou_thresholds

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("naive_eval", REPO / "bench/reference/naive_eval.py")
naive = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(naive)


def gt_set(videos: dict[str, list[tuple[float, float, str]]], labels=None) -> AnnotationSet:
    vids = tuple(Video(v, "validation", 1000.0, None, tuple(Segment(float(s), float(e), l) for s, e, l in segs))
                 for v, segs in videos.items())
    names = labels or {l for segs in videos.values() for _, _, l in segs}
    return AnnotationSet(vids, LabelVocab.from_names(names))


def dets(rows: list[tuple[str, float, float, str, float]]) -> Detections:
    if not rows:
        return Detections.empty()
    v, s, e, l, sc = zip(*rows)
    return Detections(np.array(v, dtype=object), np.array(s, float), np.array(e, float), np.array(sc, float),
                      np.array(l, dtype=object))


def test_protocol_thresholds():
    assert tiou_thresholds("anet") == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    assert tiou_thresholds("thumos") == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7])
    assert tiou_thresholds("anet", [0.5, 0.75]).tolist() == [0.5, 0.75]


def test_perfect_predictions_score_one():
    gt = gt_set({"a": [(0, 10, "X"), (20, 30, "Y")], "b": [(5, 6, "X")]})
    result = evaluate_detection(gt, dets([("a", 0, 10, "X", 0.5), ("a", 20, 30, "Y", 0.4), ("b", 5, 6, "X", 0.9)]))
    assert result.mAP.tolist() == [1.0] * 10 and result.average_mAP == 1.0
    assert result.labels == ("X", "Y")


def test_duplicate_detection_is_a_false_positive():
    gt = gt_set({"a": [(0, 10, "X"), (20, 30, "X")]})
    # ranks: [0,10] TP, its duplicate FP (ground truth taken), [20,30] TP
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    result = evaluate_detection(gt, dets([("a", 0, 10, "X", 0.9), ("a", 0, 10, "X", 0.8), ("a", 20, 30, "X", 0.7)]), [0.5])
    assert result.ap[0, 0] == pytest.approx(5 / 6)


def test_second_detection_takes_the_next_best_free_ground_truth():
    gt = gt_set({"a": [(0, 10, "X"), (4, 14, "X")]})
    # [1,11] vs A=[0,10]: 9/11 = 0.82; vs B=[4,14]: 7/13 = 0.54. The first takes A; the second
    # (same segment) finds A taken and takes B where 0.54 passes (0.5) but not at 0.6.
    result = evaluate_detection(gt, dets([("a", 1, 11, "X", 0.9), ("a", 1, 11, "X", 0.8)]), [0.5, 0.6])
    assert result.ap[:, 0].tolist() == [1.0, 0.5]


def test_worked_average_precision():
    gt = gt_set({"a": [(0, 10, "X"), (20, 30, "X")], "b": [(0, 5, "X")]})
    # ranked TP, FP, TP, FP, TP: precision 1, 1/2, 2/3, 1/2, 3/5; recall 1/3, 1/3, 2/3, 2/3, 1.
    # Monotone precision at the three recall steps: 1, 2/3, 3/5 -> AP = (1 + 2/3 + 3/5) / 3 = 34/45.
    rows = [("a", 0, 10, "X", 0.9), ("a", 40, 50, "X", 0.8), ("b", 0, 5, "X", 0.7), ("c", 0, 5, "X", 0.6),
            ("a", 21, 30, "X", 0.5)]  # [21,30] vs [20,30]: 9/10
    assert evaluate_detection(gt, dets(rows), [0.5]).ap[0, 0] == pytest.approx(34 / 45)


def test_empty_predictions_and_classes_without_predictions_score_zero():
    gt = gt_set({"a": [(0, 10, "X"), (20, 30, "Y")]})
    assert evaluate_detection(gt, dets([])).mAP.tolist() == [0.0] * 10
    result = evaluate_detection(gt, dets([("a", 0, 10, "X", 0.9)]))
    assert result.ap[:, 0].tolist() == [1.0] * 10 and result.ap[:, 1].tolist() == [0.0] * 10
    assert result.average_mAP == 0.5


def test_unknown_labels_and_outside_videos_are_counted_not_fatal():
    gt = gt_set({"a": [(0, 10, "X")]}, labels={"X", "Y"})  # Y is in the vocabulary but has no ground truth
    result = evaluate_detection(gt, dets([("a", 0, 10, "X", 0.5), ("a", 0, 10, "Nope", 0.9), ("a", 0, 10, "Y", 0.9),
                                          ("zz", 0, 10, "X", 0.95)]), [0.5])
    assert result.unknown_labels == {"Nope": 1, "Y": 1}
    assert result.labels == ("X",)
    # the prediction on video zz (no ground truth) ranks first and is a false positive: AP = 1/2
    assert result.ap[0, 0] == 0.5 and result.num_predictions_outside_videos == 1


def test_blocked_videos_leave_ground_truth_and_predictions(tmp_path):
    path = tmp_path / "blocked.txt"
    path.write_text("# removed from YouTube\nb\n\n")
    blocked = read_blocked(path)
    assert blocked == {"b"}
    gt = gt_set({"a": [(0, 10, "X")], "b": [(0, 10, "X")]})
    result = evaluate_detection(gt, dets([("a", 0, 10, "X", 0.5), ("b", 50, 60, "X", 0.9)]), [0.5], blocked)
    assert result.ap[0, 0] == 1.0 and result.num_videos == 1 and result.num_ground_truth == 1


def test_equal_scores_rank_in_reverse_file_order_as_official():
    # The official argsort()[::-1] puts the later of two equal scores first: here the TP.
    gt = gt_set({"a": [(0, 10, "X")]})
    assert evaluate_detection(gt, dets([("a", 50, 60, "X", 0.5), ("a", 0, 10, "X", 0.5)]), [0.5]).ap[0, 0] == 1.0
    assert evaluate_detection(gt, dets([("a", 0, 10, "X", 0.5), ("a", 50, 60, "X", 0.5)]), [0.5]).ap[0, 0] == 0.5


def test_equal_tiou_prefers_the_later_ground_truth_as_official():
    gt = gt_set({"a": [(0, 10, "X"), (10, 20, "X")]})
    # [5,15] has tIoU 5/15 with both; the official argsort()[::-1] picks the later one, [10,20],
    # so the exact [10,20] detection that follows finds it taken: precision 1, 1/2 at recall 1/2.
    result = evaluate_detection(gt, dets([("a", 5, 15, "X", 0.9), ("a", 10, 20, "X", 0.8)]), [0.3])
    assert result.ap[0, 0] == 0.5


def test_two_zero_length_segments_match_as_official():
    # 0/0 tIoU is NaN in the official code, which passes every threshold: the GT scored against
    # itself keeps AP 1 even with the zero-length segments of the real ActivityNet file.
    gt = gt_set({"a": [(4, 4, "X"), (0, 10, "X")]})
    assert evaluate_detection(gt, dets([("a", 4, 4, "X", 1.0), ("a", 0, 10, "X", 1.0)])).mAP.tolist() == [1.0] * 10


def test_proposal_recall_curve_worked_by_hand():
    gt = gt_set({"a": [(0, 10, "X"), (20, 30, "X")]})
    props = dets([("a", 0, 10, "", 0.9), ("a", 50, 60, "", 0.8), ("a", 20, 30, "", 0.7)])
    # Budget 3 per video: the curve's point j keeps int(3 * j/100) proposals.
    # j <= 33: none; 34..66: the first ([0,10], recalls A); 67..99: two (still A); 100: all three.
    result = evaluate_proposals(gt, props, [0.5], max_avg_proposals=3)
    ar = result.average_recall
    assert ar[:33].tolist() == [0.0] * 33 and ar[33:99].tolist() == [0.5] * 66 and ar[99] == 1.0
    assert result.average_num_proposals[-1] == 3.0


# --- properties and the naive reference -------------------------------------------------------

LABELS = ("X", "Y")
small_segment = st.tuples(st.integers(0, 8), st.integers(0, 4)).map(lambda t: (float(t[0]), float(t[0] + t[1])))


@st.composite
def cases(draw, unique_scores=False):
    num_videos = draw(st.integers(1, 3))
    gt = {f"v{i}": [(*draw(small_segment), draw(st.sampled_from(LABELS))) for _ in range(draw(st.integers(0, 4)))]
          for i in range(num_videos)}
    if not any(gt.values()):
        gt["v0"] = [(0.0, 3.0, "X")]
    n = draw(st.integers(0, 14))
    # Coarse scores make ties common, which is where tie rules matter.
    scores = draw(st.lists(st.integers(0, 1000) if unique_scores else st.integers(0, 2), min_size=n, max_size=n,
                           unique=unique_scores))
    rows = [(f"v{draw(st.integers(0, num_videos))}", *draw(small_segment), draw(st.sampled_from(LABELS)), float(sc))
            for sc in scores]
    return gt, rows


def naive_rows(gt: dict, rows: list) -> tuple[list, list]:
    return [(v, s, e, l) for v, segs in gt.items() for s, e, l in segs], rows


@settings(max_examples=150, deadline=None)
@given(cases())
def test_vectorised_equals_naive_reference(case):
    gt, rows = case
    thresholds = [0.1, 0.3, 0.5, 0.7, 1.0]
    result = evaluate_detection(gt_set(gt), dets(rows), thresholds)
    reference = naive.detection_ap(*naive_rows(gt, rows), thresholds)
    assert set(reference) == set(result.labels)
    for k, label in enumerate(result.labels):
        np.testing.assert_allclose(result.ap[:, k], reference[label], rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(cases(), st.sampled_from([1, 3, 100]))
def test_proposals_equal_naive_reference(case, budget):
    gt, rows = case
    if not rows:
        return
    result = evaluate_proposals(gt_set(gt), dets(rows), [0.3, 0.5, 0.9], max_avg_proposals=budget)
    gt_rows = [(v, s, e) for v, segs in gt.items() for s, e, _ in segs]
    ar, an = naive.average_recall(gt_rows, [(v, s, e, sc) for v, s, e, _, sc in rows], [0.3, 0.5, 0.9], budget)
    np.testing.assert_allclose(result.average_recall, ar, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.average_num_proposals, an, rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(cases(unique_scores=True), st.randoms(use_true_random=False))
def test_invariant_to_video_order(case, rnd):
    gt, rows = case
    shuffled_gt = dict(rnd.sample(list(gt.items()), len(gt)))
    shuffled_rows = rnd.sample(rows, len(rows))
    a = evaluate_detection(gt_set(gt), dets(rows))
    b = evaluate_detection(gt_set(shuffled_gt), dets(shuffled_rows))
    np.testing.assert_allclose(a.ap, b.ap, rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(cases(), st.integers(0, 3), st.sampled_from(LABELS))
def test_an_added_false_positive_never_raises_ap(case, score, label):
    gt, rows = case
    before = evaluate_detection(gt_set(gt), dets(rows))
    # A video without ground truth: a false positive wherever it ranks, and it takes no ground truth.
    after = evaluate_detection(gt_set(gt), dets(rows + [("elsewhere", 0.0, 5.0, label, float(score))]))
    assert np.all(after.ap <= before.ap + 1e-12)


def test_prediction_file_with_gaps_scores_as_the_naive_reference(tmp_path):
    """Read from files: a video without predictions, empty lists, an unknown label, tied scores."""
    import json

    from lofi.annotations import load_annotations, load_predictions

    gt = {"v1": [(0.0, 4.0, "X"), (6.0, 9.0, "X")], "v2": [(1.0, 3.0, "Y")], "v_missing": [(2.0, 5.0, "X")]}
    results = {"v1": [{"label": "X", "score": 0.5, "segment": [0, 4]}, {"label": "X", "score": 0.5, "segment": [6, 8]},
                      {"label": "Z", "score": 0.9, "segment": [0, 4]}],
               "v_empty": [],
               "v2": [{"label": "Y", "score": 0.5, "segment": [1, 2]}, {"label": "X", "score": 0.5, "segment": [1, 3]}],
               "elsewhere": [{"label": "Y", "score": 0.7, "segment": [1, 3]}], "v_empty_too": []}
    database = {v: {"subset": "validation", "duration": 20.0,
                    "annotations": [{"segment": [s, e], "label": l} for s, e, l in segs]} for v, segs in gt.items()}
    (tmp_path / "gt.json").write_text(json.dumps({"database": database}))
    (tmp_path / "p.json").write_text(json.dumps({"results": results}))
    thresholds = [0.5, 0.7, 0.9]
    result = evaluate_detection(load_annotations(tmp_path / "gt.json"), load_predictions(tmp_path / "p.json"),
                                thresholds)
    rows = [(v, float(e["segment"][0]), float(e["segment"][1]), e["label"], float(e["score"]))
            for v, entries in results.items() for e in entries]
    reference = naive.detection_ap(*naive_rows(gt, rows), thresholds)
    assert result.labels == ("X", "Y") and result.unknown_labels == {"Z": 1}
    assert result.num_predictions_outside_videos == 1
    for k, label in enumerate(result.labels):
        np.testing.assert_allclose(result.ap[:, k], reference[label], rtol=0, atol=1e-12)


def test_grouping_helpers_agree_with_plain_python():
    from lofi.evaluation.common import factorize, lookup, regroup, score_order

    rng = np.random.default_rng(0)
    # Runs of equal neighbours (as prediction files group by video), repeats after a gap, absent values.
    values = np.array([f"v{i}" for i in rng.integers(0, 30, 200).repeat(rng.integers(1, 4, 200))], dtype=object)
    index = {f"v{i}": i * 7 for i in range(0, 30, 2)}
    assert lookup(values, index).tolist() == [index.get(v, -1) for v in values]
    first_seen = list(dict.fromkeys(values.tolist()))
    assert factorize(values).tolist() == [first_seen.index(v) for v in values]
    assert lookup(values[:0], index).dtype == np.int64 and len(factorize(values[:0])) == 0
    score = rng.integers(0, 5, len(values)).astype(float)
    position = np.arange(len(values))
    for major in (rng.integers(0, 3, len(values)), rng.integers(0, 100_000, len(values))):  # int16 and wider keys
        minor = rng.integers(0, 40_000, len(values))
        expected = np.lexsort((-position, -score, minor, major))  # ties in reverse file order, as official
        assert regroup(score_order(score), major, minor).tolist() == expected.tolist()
