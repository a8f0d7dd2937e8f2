"""Soft-NMS, NMS and tIoU against hand-worked cases.

The fixture: A=[0,10] 0.9, B=[2,10] 0.8, C=[20,30] 0.7, D=[5,15] 0.6.
tIoU by hand: A-B = 8/10, A-D = 5/15 = 1/3, B-D = 5/13, C overlaps nothing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lofi.postprocess import nms, postprocess_detections, soft_nms, temporal_iou, to_activitynet_entries

SEGMENTS = np.array([[0, 10], [2, 10], [20, 30], [5, 15]], dtype=float)
SCORES = np.array([0.9, 0.8, 0.7, 0.6])


def test_temporal_iou_hand_values():
    iou = temporal_iou(SEGMENTS, SEGMENTS)
    assert iou.shape == (4, 4)
    np.testing.assert_allclose(np.diag(iou), 1.0)
    assert iou[0, 1] == pytest.approx(0.8)
    assert iou[0, 3] == pytest.approx(1 / 3)
    assert iou[1, 3] == pytest.approx(5 / 13)
    assert iou[2, [0, 1, 3]].tolist() == [0.0, 0.0, 0.0]
    # touching segments share no time; a zero-length segment has no union with itself
    assert temporal_iou([[0, 1]], [[1, 2]])[0, 0] == 0.0
    assert temporal_iou([[3, 3]], [[3, 3]])[0, 0] == 0.0
    assert temporal_iou(np.zeros((0, 2)), SEGMENTS).shape == (0, 4)


def test_soft_nms_decays_by_gaussian_of_tiou():
    seg, sc, idx = soft_nms(SEGMENTS, SCORES, sigma=0.5)
    # pick A: B *= exp(-0.8^2/0.5), D *= exp(-(1/3)^2/0.5); C untouched and picked next;
    # then D (0.6*0.8007 = 0.480 > B's 0.222) is picked and decays B by exp(-(5/13)^2/0.5)
    d_after_a = 0.6 * math.exp(-(1 / 9) / 0.5)
    b_after_a = 0.8 * math.exp(-0.64 / 0.5)
    b_after_d = b_after_a * math.exp(-((5 / 13) ** 2) / 0.5)
    assert idx.tolist() == [0, 2, 3, 1]
    np.testing.assert_allclose(sc, [0.9, 0.7, d_after_a, b_after_d])
    np.testing.assert_allclose(seg, SEGMENTS[[0, 2, 3, 1]])
    assert d_after_a == pytest.approx(0.48044, abs=1e-5)  # the hand value, for the reader


def test_soft_nms_top_k_and_min_score():
    _, sc, idx = soft_nms(SEGMENTS, SCORES, top_k=2)
    assert idx.tolist() == [0, 2]
    _, _, idx = soft_nms(SEGMENTS, SCORES, min_score=0.3)
    assert idx.tolist() == [0, 2, 3]  # B decayed to 0.165, below 0.3
    many = np.stack([np.arange(300.0), np.arange(300.0) + 0.5], axis=1)
    assert len(soft_nms(many, np.linspace(1, 0.1, 300))[2]) == 100  # default top-100 per video


def test_soft_nms_class_aware_suppresses_within_a_class_only():
    labels = np.array([0, 1, 0, 0])
    _, sc, idx = soft_nms(SEGMENTS, SCORES, sigma=0.5, labels=labels)
    assert idx.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(sc, [0.9, 0.8, 0.7, 0.6 * math.exp(-(1 / 9) / 0.5)])


def test_soft_nms_bmn_width_dependent_threshold():
    # duration 100 s: A's width fraction 0.1 -> threshold 0.5 + 0.4 * 0.1 = 0.54;
    # B (tIoU 0.8) decays with BMN's alpha 0.4, D (1/3) does not
    _, sc, idx = soft_nms(SEGMENTS, SCORES, sigma=0.4, low_threshold=0.5, high_threshold=0.9, duration_sec=100)
    assert idx.tolist() == [0, 2, 3, 1]
    np.testing.assert_allclose(sc, [0.9, 0.7, 0.6, 0.8 * math.exp(-0.64 / 0.4)])


def test_hard_nms():
    _, sc, idx = nms(SEGMENTS, SCORES, iou_threshold=0.5)
    assert idx.tolist() == [0, 2, 3]
    np.testing.assert_allclose(sc, [0.9, 0.7, 0.6])
    assert nms(SEGMENTS, SCORES, iou_threshold=0.3)[2].tolist() == [0, 2]
    assert nms(SEGMENTS, SCORES, iou_threshold=0.5, top_k=1)[2].tolist() == [0]
    labels = np.array([0, 1, 0, 0])
    assert nms(SEGMENTS, SCORES, iou_threshold=0.3, labels=labels)[2].tolist() == [0, 1, 2]


def test_empty_input():
    seg, sc, idx = soft_nms(np.zeros((0, 2)), np.zeros(0))
    assert seg.shape == (0, 2) and sc.shape == (0,) and idx.shape == (0,)
    assert nms(np.zeros((0, 2)), np.zeros(0))[2].shape == (0,)


def test_activitynet_entries_and_postprocess():
    entries = to_activitynet_entries(
        [[-1.0, 4.0], [3.0, 12.5]], [0.5, 0.25], [1, 0], ["run", "jump"], duration_sec=12.0)
    assert entries == [
        {"label": "jump", "score": 0.5, "segment": [0.0, 4.0]},
        {"label": "run", "score": 0.25, "segment": [3.0, 12.0]},
    ]
    assert to_activitynet_entries([[1, 2]], [0.1]) == [{"score": 0.1, "segment": [1.0, 2.0]}]
    # one proposal emitted once per top class: class-aware NMS keeps both copies
    det = {"segments_sec": np.array([[0.0, 10.0], [0.0, 10.0], [1.0, 10.0]]),
           "scores": np.array([0.6, 0.3, 0.5]), "label_ids": np.array([0, 1, 0])}
    out = postprocess_detections([det], ["v1"], ["run", "jump"], [20.0], method="nms", iou_threshold=0.5)
    assert out == {"v1": [{"label": "run", "score": 0.6, "segment": [0.0, 10.0]},
                          {"label": "jump", "score": 0.3, "segment": [0.0, 10.0]}]}
    agnostic = postprocess_detections([det], ["v1"], ["run", "jump"], method="nms", class_aware=False)
    assert [e["label"] for e in agnostic["v1"]] == ["run"]
    top1 = postprocess_detections([det], ["v1"], ["run", "jump"], method="none", top_k=2)
    assert [e["score"] for e in top1["v1"]] == [0.6, 0.5]
