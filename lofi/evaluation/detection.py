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

from lofi.annotations import AnnotationError, AnnotationSet, Detections
from lofi.evaluation.common import (PROTOCOLS, GroundTruthColumns, drop_blocked, factorize, isin, lookup, regroup,
                                    score_order, segment_tiou, tiou_thresholds as check_thresholds)


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


def _best_candidate_first(pair_p: np.ndarray, pair_g: np.ndarray, tiou: np.ndarray) -> np.ndarray:
    """Order of the pairs: by prediction, then highest tIoU first, equal tIoUs the later ground truth first.

    Pairs arrive in prediction order, so only predictions with several candidates need a
    sort; at ActivityNet scale that is a small share of the pairs.
    """
    order = np.arange(len(pair_p))
    multi = np.flatnonzero(np.bincount(pair_p)[pair_p] > 1) if len(pair_p) else order
    # A prediction's pairs are contiguous, so sorting the subset and writing it back into
    # the same positions leaves every single-candidate pair where it is.
    order[multi] = multi[np.lexsort((-pair_g[multi], -tiou[multi], pair_p[multi]))]
    return order


def greedy_match(p_group: np.ndarray, p_start: np.ndarray, p_end: np.ndarray, g_group: np.ndarray,
                 g_start: np.ndarray, g_end: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """True-positive flags (T, N) of the official greedy assignment.

    Predictions must be sorted by group and, within a group, in rank order; ground truth
    sorted by group (file order within a group). A group is one class in one video.
    """
    num_t, n, m = len(thresholds), len(p_group), len(g_group)
    pair_p, pair_g = _pairs(p_group, g_group)
    tiou = segment_tiou(p_start[pair_p], p_end[pair_p], g_start[pair_g], g_end[pair_g], degenerate=np.inf)
    order = _best_candidate_first(pair_p, pair_g, tiou)
    pair_p, pair_g, tiou = pair_p[order], pair_g[order], tiou[order]
    selected = [np.flatnonzero(tiou >= t) for t in thresholds]
    t_of = np.repeat(np.arange(num_t, dtype=np.int64), [len(s) for s in selected])
    pick = np.concatenate(selected) if selected else np.zeros(0, np.int64)
    # p_group is sorted: a new code wherever it changes.
    group_codes = np.cumsum(np.diff(p_group, prepend=p_group[:1]) != 0)
    num_groups = int(group_codes[-1]) + 1 if n else 1
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


@dataclass(frozen=True, eq=False)
class Grouped:
    """Scored predictions and ground truth keyed by group (class * num_videos + video).

    `p_order` sorts the kept predictions by group, rank order within a group (what
    `greedy_match` needs); `by_class` sorts them by class, rank order within a class (what
    AP needs); `g_order` sorts the ground truth by group, file order within a group.
    """

    classes: tuple[str, ...]
    g_cls: np.ndarray
    g_group: np.ndarray
    g_order: np.ndarray
    known: np.ndarray  # indices of the predictions whose label is one of `classes`
    p_cls: np.ndarray  # class of each kept prediction
    p_group: np.ndarray
    p_order: np.ndarray
    by_class: np.ndarray
    unknown: dict[str, int]  # left-out labels -> count


def group(gt: GroundTruthColumns, det: Detections, vocabulary: Any) -> Grouped:
    """Class and video codes by hash lookups, then the sort orders, with no per-group Python step."""
    present = set(gt.label.tolist())
    classes = tuple(name for name in vocabulary if name in present)
    if not classes:
        raise AnnotationError(["the ground truth has no segments to score against; check --subset and the file"])
    class_index = {name: k for k, name in enumerate(classes)}
    g_cls, p_cls_all = lookup(gt.label, class_index), lookup(det.label, class_index)
    unknown = Counter(det.label[p_cls_all < 0].tolist())
    known = np.flatnonzero(p_cls_all >= 0)
    p_cls = p_cls_all[known]
    videos = factorize(np.concatenate([gt.video_id, det.video_id[known]]))
    g_vid, p_vid = videos[:len(gt.video_id)], videos[len(gt.video_id):]
    num_videos_coded = int(videos.max()) + 1 if len(videos) else 1
    g_group = g_cls * num_videos_coded + g_vid
    p_group = p_cls * num_videos_coded + p_vid
    by_score = score_order(det.score[known])
    return Grouped(classes, g_cls, g_group, np.argsort(g_group, kind="stable"), known, p_cls, p_group,
                   regroup(by_score, p_cls, p_vid), regroup(by_score, p_cls),
                   dict(sorted(unknown.items())))


def match(grouped: Grouped, gt: GroundTruthColumns, det: Detections, thresholds: np.ndarray) -> np.ndarray:
    """True-positive flags (T, N) of the kept predictions, columns in `by_class` order."""
    p_order, g_order = grouped.p_order, grouped.g_order
    chosen = grouped.known[p_order]
    tp_grouped = greedy_match(grouped.p_group[p_order], det.start_sec[chosen], det.end_sec[chosen],
                              grouped.g_group[g_order], gt.start_sec[g_order], gt.end_sec[g_order], thresholds)
    # Column j of tp_grouped is prediction p_order[j]; one gather puts them in by_class order.
    position = np.empty_like(p_order)
    position[p_order] = np.arange(len(p_order))
    return tp_grouped[:, position[grouped.by_class]]


def class_ap(grouped: Grouped, tp: np.ndarray) -> np.ndarray:
    """AP (T, K): each class's slice of the by_class-ordered flags, against its ground-truth count."""
    num_classes = len(grouped.classes)
    bounds = np.searchsorted(grouped.p_cls[grouped.by_class], np.arange(num_classes + 1))
    positives = np.bincount(grouped.g_cls, minlength=num_classes)
    return np.stack([interpolated_ap(tp[:, bounds[k]:bounds[k + 1]], positives[k]) for k in range(num_classes)],
                    axis=1)


def evaluate_detection(ground_truth: AnnotationSet, detections: Detections, tiou_thresholds: Any = PROTOCOLS["anet"],
                       blocked: frozenset[str] = frozenset()) -> DetectionResult:
    """Score detections against every video of `ground_truth` (select a subset first).

    Predictions whose label has no ground truth here are counted in `unknown_labels` and
    left out; predictions on videos without ground truth of their class are false positives.
    The phases (`group`, `match`, `class_ap`) are public so that bench/eval_speed.py can time each.
    """
    thresholds = check_thresholds(tiou=tiou_thresholds)
    gt = GroundTruthColumns.build(ground_truth, blocked)
    det = drop_blocked(detections, blocked)
    grouped = group(gt, det, ground_truth.labels)
    ap = class_ap(grouped, match(grouped, gt, det, thresholds))
    outside = int((~isin(det.video_id, gt.video_ids)).sum())
    return DetectionResult(thresholds, grouped.classes, ap, len(gt.video_ids), len(gt.video_id), len(det),
                           grouped.unknown, outside)
