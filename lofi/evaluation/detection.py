"""Detection mAP at tIoU thresholds, reproducing ActivityNet's Evaluation/eval_detection.py.

The official algorithm, per class: rank predictions by score; at each threshold, walk them
in rank order and give each one the ground truth of its video (and class) with the highest
tIoU that no earlier prediction took, a true positive if that tIoU reaches the threshold and
a false positive otherwise (also when every candidate is taken, or its video has none). AP
is the all-point interpolated area under precision/recall (precision made monotone from
the right); mAP averages over the classes present in the ground truth; average mAP over
thresholds. Ties: equal scores rank in reverse file order, equal tIoUs prefer the later
ground truth, as `argsort()[::-1]` does over a stable sort.

Here the walk is vectorised instead of one Python step per prediction. Within one
(threshold, class, video) group, the assignment between two consecutive true positives is
frozen, so the next true positive is simply the earliest-ranked prediction that still has
a free candidate at or above the threshold, and it takes its best free one. One numpy
"round" finds that prediction for every group at once; each round retires one ground
truth per live group, so the number of rounds is the largest number of ground truths of
one class in one video. The result is exactly the official assignment (the tests compare
with a transcription of the official loops on random cases full of ties).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from lofi.annotations import AnnotationError, AnnotationSet, Detections
from lofi.evaluation.common import (PROTOCOLS, GroundTruthColumns, drop_blocked, isin, rank_order, segment_tiou,
                                    tiou_thresholds as check_thresholds)


@dataclass(frozen=True, eq=False)
class DetectionResult:
    tiou_thresholds: np.ndarray  # (T,)
    labels: tuple[str, ...]  # the K classes present in the ground truth, in vocabulary order
    ap: np.ndarray  # (T, K) fractions in [0, 1]
    num_videos: int
    num_ground_truth: int
    num_predictions: int
    unknown_labels: dict[str, int]  # predicted labels absent from the ground truth -> count (not scored)
    num_predictions_outside_videos: int  # on videos not in the ground truth: false positives, as officially

    @property
    def mAP(self) -> np.ndarray:
        return self.ap.mean(axis=1)

    @property
    def average_mAP(self) -> float:
        return float(self.mAP.mean())

    def to_json(self) -> dict[str, Any]:
        return {
            "tiou_thresholds": [round(float(t), 6) for t in self.tiou_thresholds],
            "mAP": [float(x) for x in self.mAP],
            "average_mAP": self.average_mAP,
            "per_class_ap": {label: [float(x) for x in self.ap[:, k]] for k, label in enumerate(self.labels)},
            "num_videos": self.num_videos,
            "num_ground_truth": self.num_ground_truth,
            "num_predictions": self.num_predictions,
            "unknown_labels": dict(self.unknown_labels),
            "num_predictions_outside_videos": self.num_predictions_outside_videos,
        }


def _pairs(p_group: np.ndarray, g_group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (prediction, ground truth) pair sharing a group; g_group must be sorted.

    Pairs come out in prediction order, and in ground-truth order within one prediction.
    """
    lo = np.searchsorted(g_group, p_group, side="left")
    counts = np.searchsorted(g_group, p_group, side="right") - lo
    pair_p = np.repeat(np.arange(len(p_group)), counts)
    first_pair = np.repeat(np.cumsum(counts) - counts, counts)
    pair_g = np.repeat(lo, counts) + (np.arange(len(pair_p)) - first_pair)
    return pair_p, pair_g


def greedy_match(p_group: np.ndarray, p_start: np.ndarray, p_end: np.ndarray, g_group: np.ndarray,
                 g_start: np.ndarray, g_end: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """True-positive flags (T, N) of the official greedy assignment.

    Predictions must be sorted by group and, within a group, in rank order; ground truth
    sorted by group (file order within a group). A group is one class in one video.
    """
    num_t, n, m = len(thresholds), len(p_group), len(g_group)
    pair_p, pair_g = _pairs(p_group, g_group)
    tiou = segment_tiou(p_start[pair_p], p_end[pair_p], g_start[pair_g], g_end[pair_g], degenerate=np.inf)
    # Within a prediction: highest tIoU first, equal tIoUs the later ground truth first.
    order = np.lexsort((-pair_g, -tiou, pair_p))
    pair_p, pair_g, tiou = pair_p[order], pair_g[order], tiou[order]
    selected = [np.flatnonzero(tiou >= t) for t in thresholds]
    t_of = np.repeat(np.arange(num_t, dtype=np.int64), [len(s) for s in selected])
    pick = np.concatenate(selected) if selected else np.zeros(0, np.int64)
    _, group_codes = np.unique(p_group, return_inverse=True)
    num_groups = int(group_codes.max()) + 1 if n else 1
    # Flat keys over (threshold, ...): groups never interact, so all thresholds run together.
    group = t_of * num_groups + group_codes[pair_p[pick]]
    pred_key = t_of * n + pair_p[pick]
    gt_key = t_of * m + pair_g[pick]
    tp = np.zeros(num_t * n, dtype=bool)
    taken = np.zeros(num_t * m, dtype=bool)
    while len(group):
        # Surviving pairs are all (unresolved prediction, free ground truth); the first pair of a
        # group is its earliest such prediction with its best free candidate.
        first = np.ones(len(group), dtype=bool)
        first[1:] = group[1:] != group[:-1]
        tp[pred_key[first]] = True
        taken[gt_key[first]] = True
        keep = ~(tp[pred_key] | taken[gt_key])
        group, pred_key, gt_key = group[keep], pred_key[keep], gt_key[keep]
    return tp.reshape(num_t, n)


def interpolated_ap(tp: np.ndarray, num_positives: int) -> np.ndarray:
    """All-point interpolated AP per threshold from ranked TP flags (T, N) of one class."""
    if tp.shape[1] == 0:
        return np.zeros(tp.shape[0])
    tp_cum = np.cumsum(tp, axis=1, dtype=np.float64)
    precision = tp_cum / np.arange(1, tp.shape[1] + 1)
    recall = tp_cum / num_positives
    # Precision made monotone: the best precision at this recall or any later one.
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    recall_step = np.diff(recall, axis=1, prepend=0.0)
    return np.where(tp, recall_step * envelope, 0.0).sum(axis=1)


def evaluate_detection(ground_truth: AnnotationSet, detections: Detections, tiou_thresholds: Any = PROTOCOLS["anet"],
                       blocked: frozenset[str] = frozenset()) -> DetectionResult:
    """Score detections against every video of `ground_truth` (select a subset first).

    Predictions whose label has no ground truth here are counted in `unknown_labels` and
    left out; predictions on videos without ground truth of their class are false positives.
    """
    thresholds = check_thresholds(tiou=tiou_thresholds)
    gt = GroundTruthColumns.build(ground_truth, blocked)
    det = drop_blocked(detections, blocked)
    present = set(gt.label.tolist())
    classes = tuple(name for name in ground_truth.labels if name in present)
    if not classes:
        raise AnnotationError(["the ground truth has no segments to score against; check --subset and the file"])
    class_of = pd.CategoricalDtype(list(classes))
    g_cls = pd.Categorical(gt.label, dtype=class_of).codes.astype(np.int64)
    p_cls = pd.Categorical(det.label, dtype=class_of).codes.astype(np.int64)
    unknown = Counter(det.label[p_cls < 0].tolist())
    known = np.flatnonzero(p_cls >= 0)
    videos, _ = pd.factorize(np.concatenate([gt.video_id, det.video_id[known]]))
    g_vid, p_vid = videos[:len(gt.video_id)].astype(np.int64), videos[len(gt.video_id):].astype(np.int64)
    num_videos_coded = int(videos.max()) + 1 if len(videos) else 1
    g_group = g_cls * num_videos_coded + g_vid
    g_order = np.argsort(g_group, kind="stable")
    p_group = p_cls[known] * num_videos_coded + p_vid
    score = det.score[known]
    p_order = rank_order(score, p_group)
    tp_grouped = greedy_match(p_group[p_order], det.start_sec[known][p_order], det.end_sec[known][p_order],
                              g_group[g_order], gt.start_sec[g_order], gt.end_sec[g_order], thresholds)
    tp = np.empty_like(tp_grouped)
    tp[:, p_order] = tp_grouped
    # AP needs each class in rank order over all its videos.
    by_class = rank_order(score, p_cls[known])
    tp, k_sorted = tp[:, by_class], p_cls[known][by_class]
    bounds = np.searchsorted(k_sorted, np.arange(len(classes) + 1))
    positives = np.bincount(g_cls, minlength=len(classes))
    ap = np.stack([interpolated_ap(tp[:, bounds[k]:bounds[k + 1]], positives[k]) for k in range(len(classes))], axis=1)
    outside = int((~isin(det.video_id, gt.video_ids)).sum())
    return DetectionResult(thresholds, classes, ap, len(gt.video_ids), len(gt.video_id), len(det),
                           dict(sorted(unknown.items())), outside)
