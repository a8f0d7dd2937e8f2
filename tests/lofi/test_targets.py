"""Label assignment from seconds to the snippet grid, checked against hand-worked values.

The running example is a 37.3 s video (it does not divide evenly into snippets):
at T = 25 a snippet is 37.3 / 25 = 1.492 s long; at T = 100 it is 0.373 s.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lofi.targets import (
    TargetError,
    boundary_targets,
    class_targets,
    iou_map_targets,
    make_targets,
    segments_to_snippets,
    snippet_length_sec,
)

DURATION_SEC = 37.3
GT = np.array([[5.0, 20.0]])  # one action from 5 s to 20 s


def test_snippet_length_of_a_non_dividing_duration():
    assert snippet_length_sec(DURATION_SEC, 25) == pytest.approx(1.492)
    assert snippet_length_sec(DURATION_SEC, 100) == pytest.approx(0.373)


def test_seconds_to_snippet_units_at_t25_and_t100():
    # T=25: 5 / 1.492 = 3.3512 (35% into snippet 3); 20 / 1.492 = 13.4048.
    got = segments_to_snippets(GT, DURATION_SEC, 25)
    np.testing.assert_allclose(got, [[3.351206434, 13.404825737]], atol=1e-8)
    # T=100: 5 / 0.373 = 13.4048; 20 / 0.373 = 53.6193.
    got = segments_to_snippets(GT, DURATION_SEC, 100)
    np.testing.assert_allclose(got, [[13.404825737, 53.619302949]], atol=1e-8)


def test_seconds_outside_the_video_are_clipped_to_the_grid():
    got = segments_to_snippets(np.array([[-2.0, 4.0], [36.0, 40.0]]), DURATION_SEC, 25)
    # -2 s -> 0; 4 / 1.492 = 2.6810; 36 / 1.492 = 24.1287; 40 s is past 37.3 s -> 25.
    np.testing.assert_allclose(got, [[0.0, 4.0 / 1.492], [36.0 / 1.492, 25.0]])


def test_boundary_targets_at_t25():
    start, end = boundary_targets(GT, DURATION_SEC, 25)
    b_start, b_end = 5.0 / 1.492, 20.0 / 1.492  # 3.3512, 13.4048 snippet units
    expected_start = np.zeros(25)
    # Start anchors are centred on snippet start edges: t=3 covers [2.5, 3.5), t=4 [3.5, 4.5).
    # The region [b - 0.5, b + 0.5] = [2.8512, 3.8512] overlaps them by 0.6488 and 0.3512.
    expected_start[3] = 3.5 - (b_start - 0.5)  # 0.6488
    expected_start[4] = (b_start + 0.5) - 3.5  # 0.3512
    expected_end = np.zeros(25)
    # End anchors are centred on snippet end edges: t=12 ends at 13, covers [12.5, 13.5);
    # t=13 covers [13.5, 14.5). The region [12.9048, 13.9048] overlaps them by 0.5952, 0.4048.
    expected_end[12] = 13.5 - (b_end - 0.5)  # 0.5952
    expected_end[13] = (b_end + 0.5) - 13.5  # 0.4048
    np.testing.assert_allclose(start, expected_start, atol=1e-9)
    np.testing.assert_allclose(end, expected_end, atol=1e-9)


def test_boundary_targets_at_t100():
    start, end = boundary_targets(GT, DURATION_SEC, 100)
    # Start at 13.4048 units: snippet 13's start edge is 0.4048 away -> 0.5952; snippet 14's 0.5952 -> 0.4048.
    assert start[13] == pytest.approx(1 - (5.0 / 0.373 - 13))
    assert start[14] == pytest.approx(1 - (14 - 5.0 / 0.373))
    assert start[12] == 0 and start[15] == 0
    # End at 53.6193 units: snippet 52 ends at 53 (0.6193 away -> 0.3807), snippet 53 ends at 54 (-> 0.6193).
    assert end[52] == pytest.approx(1 - (20.0 / 0.373 - 53))
    assert end[53] == pytest.approx(1 - (54 - 20.0 / 0.373))
    assert end.sum() == pytest.approx(1.0)


def test_bmn_three_snippet_boundary_region():
    start, _ = boundary_targets(GT, DURATION_SEC, 25, region_snippets=3.0)
    # Region [3.3512 - 1.5, 3.3512 + 1.5] = [1.8512, 4.8512]: anchor t=2 [1.5, 2.5) overlaps 0.6488,
    # t=3 and t=4 lie inside (1.0), t=5 [4.5, 5.5) overlaps 0.3512.
    expected = np.zeros(25)
    expected[2:6] = [2.5 - (5.0 / 1.492 - 1.5), 1.0, 1.0, (5.0 / 1.492 + 1.5) - 4.5]
    np.testing.assert_allclose(start, expected, atol=1e-9)


def test_boundary_on_a_grid_edge_marks_one_snippet():
    start, end = boundary_targets(np.array([[2 * 1.492, 5 * 1.492]]), DURATION_SEC, 25)
    assert start[2] == pytest.approx(1.0) and start.sum() == pytest.approx(1.0)
    assert end[4] == pytest.approx(1.0) and end.sum() == pytest.approx(1.0)  # snippet 4 ends at unit 5


def test_iou_map_targets_at_t25():
    iou = iou_map_targets(GT, DURATION_SEC, 25, max_duration=25)
    lo, hi = 5.0 / 1.492, 20.0 / 1.492  # gt in snippet units: [3.3512, 13.4048]
    assert iou.shape == (25, 25)
    # [d=9, s=3] is snippets 3..12 = units [3, 13): overlap 13 - 3.3512, union 13.4048 - 3.
    assert iou[9, 3] == pytest.approx((13 - lo) / (hi - 3))  # 0.9273
    # [d=10, s=3] = units [3, 14) contains the gt: IoU = gt length / 11.
    assert iou[10, 3] == pytest.approx((hi - lo) / 11)  # 0.9140
    # [d=0, s=0] = units [0, 1) misses the gt.
    assert iou[0, 0] == 0.0
    # [d=2, s=12] = units [12, 15): overlap 13.4048 - 12, union 15 - 3.3512.
    assert iou[2, 12] == pytest.approx((hi - 12) / (15 - lo))  # 0.1206
    # s + d >= T runs past the video: 0 however much it overlaps.
    assert iou[24, 1] == 0.0 and iou[22, 3] == 0.0


def test_iou_map_targets_at_t100_with_shorter_max_duration():
    iou = iou_map_targets(GT, DURATION_SEC, 100, max_duration=50)
    lo, hi = 5.0 / 0.373, 20.0 / 0.373  # [13.4048, 53.6193]
    assert iou.shape == (50, 100)
    # [d=40, s=13] = units [13, 54) contains the gt: IoU = 40.2145 / 41.
    assert iou[40, 13] == pytest.approx((hi - lo) / 41)  # 0.9808
    # [d=39, s=14] = units [14, 54): overlap 53.6193 - 14, union 54 - 13.4048.
    assert iou[39, 14] == pytest.approx((hi - 14) / (54 - lo))
    assert iou.max() == pytest.approx((hi - lo) / 41)


def test_iou_map_takes_the_best_of_several_gts():
    segs = np.array([[0.0, 1.492], [10 * 1.492, 12 * 1.492]])  # snippet 0 and snippets 10..11 exactly
    iou = iou_map_targets(segs, DURATION_SEC, 25, max_duration=4)
    assert iou[0, 0] == pytest.approx(1.0)
    assert iou[1, 10] == pytest.approx(1.0)
    assert iou[0, 10] == pytest.approx(0.5)  # snippet 10 alone is half of the 2-snippet gt


def test_class_targets_use_snippet_centres():
    segs = np.array([[5.0, 20.0], [30.0, 30.5]])
    got = class_targets(segs, np.array([1, 0]), 3, DURATION_SEC, 25)
    expected = np.zeros((3, 25))
    # Class 1: gt units [3.3512, 13.4048]; centres 3.5 .. 12.5 are inside, 13.5 is not.
    expected[1, 3:13] = 1.0
    # Class 0: 30 s .. 30.5 s = units [20.1072, 20.4424] holds no centre (20.5 is outside);
    # its midpoint 20.27 lies in snippet 20, which is marked so the action is not lost.
    expected[0, 20] = 1.0
    np.testing.assert_array_equal(got, expected)


def test_class_targets_at_t100():
    got = class_targets(GT, np.array([2]), 3, DURATION_SEC, 100)
    # gt units [13.4048, 53.6193]: centres 13.5 .. 53.5, i.e. snippets 13..53 (41 snippets).
    assert np.flatnonzero(got[2]).tolist() == list(range(13, 54))
    assert got[:2].sum() == 0


def test_segments_outside_the_video_are_ignored():
    segs = np.array([[40.0, 45.0]])  # wholly after the 37.3 s video
    start, end = boundary_targets(segs, DURATION_SEC, 25)
    assert start.sum() == 0 and end.sum() == 0
    assert iou_map_targets(segs, DURATION_SEC, 25, 25).sum() == 0
    assert class_targets(segs, np.array([0]), 2, DURATION_SEC, 25).sum() == 0


def test_a_video_without_actions_has_all_zero_targets():
    t = make_targets([(np.zeros((0, 2)), np.zeros(0), DURATION_SEC)], 25, 10, 4)
    for x in (t.start, t.end, t.iou_map, t.classes):
        assert x.abs().sum() == 0


def test_make_targets_batches_float32_tensors():
    videos = [(GT, np.array([1]), DURATION_SEC), (np.array([[1.0, 3.0], [10.0, 30.0]]), np.array([0, 2]), 60.0)]
    t = make_targets(videos, num_snippets=25, max_duration=10, num_classes=3)
    assert t.start.shape == (2, 25) and t.end.shape == (2, 25)
    assert t.iou_map.shape == (2, 10, 25) and t.classes.shape == (2, 3, 25)
    assert all(x.dtype == torch.float32 for x in (t.start, t.end, t.iou_map, t.classes))
    assert t.start[0, 3].item() == pytest.approx(3.5 - (5.0 / 1.492 - 0.5), abs=1e-6)


def test_bad_inputs_name_the_problem():
    with pytest.raises(TargetError, match="label ids \\[5\\]"):
        class_targets(GT, np.array([5]), 3, DURATION_SEC, 25)
    with pytest.raises(TargetError, match="one label per segment"):
        class_targets(GT, np.array([0, 1]), 3, DURATION_SEC, 25)
    with pytest.raises(TargetError, match="duration_sec"):
        segments_to_snippets(GT, 0.0, 25)
    with pytest.raises(TargetError, match="shape"):
        segments_to_snippets(np.array([1.0, 2.0, 3.0]), DURATION_SEC, 25)
    with pytest.raises(TargetError, match="max_duration"):
        iou_map_targets(GT, DURATION_SEC, 25, max_duration=26)
