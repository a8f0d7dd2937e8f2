"""lofi.windows: sliding windows over fixed-stride features, against hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest

from lofi.windows import cut_window, merge_window_detections, window_ground_truth, window_starts, window_step


@pytest.mark.parametrize("num_snippets, window, overlap, expected", [
    (10, 4, 0.5, [0, 2, 4, 6]),  # step 2; 6 + 4 = 10 already ends at the video's end
    (11, 4, 0.5, [0, 2, 4, 6, 7]),  # the last window aligned to the end overlaps its neighbour more
    (12, 4, 0.0, [0, 4, 8]),  # no overlap: a partition
    (5, 4, 0.0, [0, 1]),
    (6, 4, 0.75, [0, 1, 2]),  # step 1
    (4, 4, 0.5, [0]),  # exactly one window
    (3, 4, 0.5, [0]),  # shorter than a window: one window, padded
    (1, 256, 0.5, [0]),
])
def test_window_starts_step_by_the_overlap_and_end_at_the_video_end(num_snippets, window, overlap, expected):
    starts = window_starts(num_snippets, window, overlap)
    assert starts.tolist() == expected
    covered = np.zeros(num_snippets, dtype=bool)
    for s in starts:
        covered[s:s + window] = True
    assert covered.all()  # every snippet lies in some window


def test_window_step_is_rounded_and_overlap_must_leave_a_step():
    assert window_step(256, 0.5) == 128 and window_step(128, 0.25) == 96 and window_step(3, 0.9) == 1
    with pytest.raises(ValueError, match="overlap"):
        window_step(4, 1.0)
    with pytest.raises(ValueError, match="window_snippets"):
        window_starts(10, 0, 0.5)


def test_cut_window_zero_pads_past_the_last_snippet():
    feats = np.arange(9 * 2, dtype=np.float32).reshape(9, 2)  # row t = [2t, 2t + 1]
    window, valid = cut_window(feats, 7, 4)
    assert valid == 2 and window.shape == (4, 2)
    np.testing.assert_array_equal(window, [[14, 15], [16, 17], [0, 0], [0, 0]])
    window, valid = cut_window(feats, 2, 4)
    assert valid == 4 and window[:, 0].tolist() == [4, 6, 8, 10]


def test_window_ground_truth_clips_shifts_and_drops_mostly_outside_segments():
    # window [10, 20) s
    segments = np.array([[12.0, 15.0],   # inside: kept, (2, 5) from the window's start
                         [8.0, 12.0],    # half inside (2 of 4 s): kept, clipped to (0, 2)
                         [18.0, 26.0],   # a quarter inside: dropped
                         [5.0, 9.0],     # outside: dropped
                         [19.5, 19.5],   # zero length, inside: kept
                         [0.0, 30.0]])   # covers the window, a third inside: dropped
    labels = np.array([0, 1, 2, 3, 4, 5])
    segs, kept = window_ground_truth(segments, labels, 10.0, 10.0)
    np.testing.assert_allclose(segs, [[2.0, 5.0], [0.0, 2.0], [9.5, 9.5]])
    assert kept.tolist() == [0, 1, 4]
    segs, kept = window_ground_truth(segments, labels, 10.0, 10.0, min_kept_fraction=0.2)
    assert kept.tolist() == [0, 1, 2, 4, 5]
    np.testing.assert_allclose(segs[2], [8.0, 10.0])
    empty, none = window_ground_truth(np.zeros((0, 2)), np.zeros(0), 0.0, 10.0)
    assert empty.shape == (0, 2) and none.shape == (0,)


def _det(segments, scores, labels):
    return {"segments_sec": np.array(segments, dtype=float).reshape(-1, 2), "scores": np.array(scores, dtype=float),
            "label_ids": np.array(labels)}


def test_merge_shifts_windows_drops_padding_and_suppresses_once_per_video():
    # a 12 s video, windows of 10 s: A starts at 0, B at 5 (its last 3 s lie past the video's end)
    a = _det([[1, 3], [8, 10]], [0.9, 0.5], [0, 1])
    b = _det([[3, 5],    # video (8, 10): the same action as A's second, better scored -> A's copy suppressed
              [8, 10],   # video (13, 15): past the end, dropped
              [6, 8],    # video (11, 13): centre 12 = the end, dropped
              [5, 8]],   # video (10, 13): centre 11.5 inside, clipped to (10, 12)
             [0.6, 0.95, 0.8, 0.3], [1, 0, 0, 0])
    merged = merge_window_detections([a, b], [0.0, 5.0], [10.0, 12.0], method="nms", iou_threshold=0.5)
    np.testing.assert_allclose(merged["segments_sec"], [[1, 3], [8, 10], [10, 12]])
    np.testing.assert_allclose(merged["scores"], [0.9, 0.6, 0.3])
    assert merged["label_ids"].tolist() == [0, 1, 0]
    top = merge_window_detections([a, b], [0.0, 5.0], [10.0, 12.0], method="nms", top_k=2)
    assert len(top["scores"]) == 2
    soft = merge_window_detections([a, b], [0.0, 5.0], [10.0, 12.0], sigma=0.5)
    assert len(soft["scores"]) == 4 and soft["segments_sec"].max() <= 12.0  # Soft-NMS decays, keeps all 4
    np.testing.assert_allclose(soft["scores"][-1], 0.5 * np.exp(-1 / 0.5))  # A's copy: tIoU 1 with B's
    # one candidate per window: A's best (1, 3) and B's best left after the padding's are dropped (8, 10)
    capped = merge_window_detections([a, b], [0.0, 5.0], [10.0, 12.0], max_per_window=1)
    np.testing.assert_allclose(capped["segments_sec"], [[1, 3], [8, 10]])
    np.testing.assert_allclose(capped["scores"], [0.9, 0.6])


def test_merge_of_no_detections_is_empty_and_mismatched_inputs_are_an_error():
    merged = merge_window_detections([_det([], [], [])], [0.0], [10.0])
    assert merged["segments_sec"].shape == (0, 2) and len(merged["scores"]) == 0
    with pytest.raises(ValueError, match="one of each per window"):
        merge_window_detections([_det([], [], [])], [0.0, 5.0], [10.0])
