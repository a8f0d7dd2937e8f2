"""Reference evaluators: plain loops that follow the official ActivityNet algorithms step by step.

Written for this project as a readable transcription of the procedure in
activitynet/ActivityNet Evaluation/eval_detection.py and eval_proposal.py (one Python step
per prediction, per threshold, per candidate). They are slow on purpose: the tests check
the vectorised evaluator in lofi.evaluation against them, and bench/eval_speed.py times both.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def segment_iou(target: tuple[float, float], candidates: np.ndarray) -> np.ndarray:
    """tIoU of one segment with (N, 2) candidates; 0/0 stays NaN, as in the official code."""
    inter = np.clip(np.minimum(target[1], candidates[:, 1]) - np.maximum(target[0], candidates[:, 0]), 0, None)
    union = (candidates[:, 1] - candidates[:, 0]) + (target[1] - target[0]) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter.astype(float) / union


def interpolated_prec_rec(prec: np.ndarray, rec: np.ndarray) -> float:
    """All-point interpolated AP: sentinels, precision made monotone right to left, sum over recall steps."""
    mprec = np.concatenate([[0.0], prec, [0.0]])
    mrec = np.concatenate([[0.0], rec, [1.0]])
    for i in range(len(mprec) - 2, -1, -1):
        mprec[i] = max(mprec[i], mprec[i + 1])
    steps = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mprec[steps]))


def average_precision(gt: list[tuple], preds: list[tuple], thresholds: list[float]) -> list[float]:
    """AP per threshold of one class. gt: (video, start, end); preds: (video, start, end, score)."""
    if not preds:
        return [0.0] * len(thresholds)
    gt_by_video: dict[str, list[int]] = defaultdict(list)
    for index, (video, _, _) in enumerate(gt):
        gt_by_video[video].append(index)
    lock = [[-1] * len(gt) for _ in thresholds]
    order = np.argsort(np.array([p[3] for p in preds]), kind="stable")[::-1]
    tp = np.zeros((len(thresholds), len(preds)))
    fp = np.zeros((len(thresholds), len(preds)))
    for rank, i in enumerate(order):
        video, start, end, _ = preds[i]
        if video not in gt_by_video:
            fp[:, rank] = 1
            continue
        candidates = gt_by_video[video]
        tiou = segment_iou((start, end), np.array([[gt[j][1], gt[j][2]] for j in candidates]))
        by_tiou = np.argsort(tiou, kind="stable")[::-1]
        for t, threshold in enumerate(thresholds):
            for j in by_tiou:
                if tiou[j] < threshold:
                    fp[t, rank] = 1
                    break
                if lock[t][candidates[j]] >= 0:
                    continue
                tp[t, rank] = 1
                lock[t][candidates[j]] = rank
                break
            if tp[t, rank] == 0 and fp[t, rank] == 0:
                fp[t, rank] = 1
    tp_cum, fp_cum = np.cumsum(tp, axis=1), np.cumsum(fp, axis=1)
    recall = tp_cum / len(gt)
    precision = tp_cum / (tp_cum + fp_cum)
    return [interpolated_prec_rec(precision[t], recall[t]) for t in range(len(thresholds))]


def detection_ap(gt_rows: list[tuple], pred_rows: list[tuple], thresholds: list[float]) -> dict[str, list[float]]:
    """{label: AP per threshold} for every label of the ground truth.

    gt_rows: (video, start, end, label); pred_rows: (video, start, end, label, score), file order.
    Predictions with a label outside the ground truth are left out.
    """
    gt_by_label: dict[str, list[tuple]] = defaultdict(list)
    for video, start, end, label in gt_rows:
        gt_by_label[label].append((video, start, end))
    pred_by_label: dict[str, list[tuple]] = defaultdict(list)
    for video, start, end, label, score in pred_rows:
        if label in gt_by_label:
            pred_by_label[label].append((video, start, end, score))
    return {label: average_precision(gt, pred_by_label[label], thresholds) for label, gt in gt_by_label.items()}


def average_recall(gt_rows: list[tuple], prop_rows: list[tuple], thresholds: list[float],
                   max_avg_proposals: float = 100) -> tuple[np.ndarray, np.ndarray]:
    """(average recall (100,), average number of proposals (100,)) as the official AR@AN.

    gt_rows: (video, start, end); prop_rows: (video, start, end, score).
    """
    videos = list(dict.fromkeys(v for v, _, _ in gt_rows))
    gt_by_video: dict[str, list[tuple]] = defaultdict(list)
    for video, start, end in gt_rows:
        gt_by_video[video].append((start, end))
    props_by_video: dict[str, list[tuple]] = defaultdict(list)
    for video, start, end, score in prop_rows:
        props_by_video[video].append((start, end, score))
    ratio = max_avg_proposals * float(len(videos)) / len(prop_rows)
    scores, total_kept = [], 0
    for video in videos:
        truth = np.array(gt_by_video[video])
        props = props_by_video.get(video, [])
        if not props:
            scores.append(np.zeros((len(truth), 1)))
            continue
        order = np.argsort(np.array([p[2] for p in props]), kind="stable")[::-1]
        ranked = np.array([[props[i][0], props[i][1]] for i in order])
        kept = min(int(len(ranked) * ratio), len(ranked))
        total_kept += kept
        tiou = np.empty((len(truth), kept))
        for col in range(kept):
            tiou[:, col] = segment_iou(tuple(ranked[col]), truth)
        scores.append(tiou)
    if total_kept == 0:  # the official code divides by zero here; report an empty curve instead
        return np.zeros(100), np.zeros(100)
    fractions = np.arange(1, 101) / 100.0 * (max_avg_proposals * float(len(videos)) / total_kept)
    recall = np.empty((len(thresholds), len(fractions)))
    for t, threshold in enumerate(thresholds):
        matches = np.zeros((len(videos), len(fractions)))
        positives = np.zeros(len(videos))
        for i, tiou in enumerate(scores):
            positives[i] = tiou.shape[0]
            hits = tiou >= threshold
            budgets = np.minimum((tiou.shape[1] * fractions).astype(int), tiou.shape[1])
            for j, budget in enumerate(budgets):
                matches[i, j] = np.count_nonzero(hits[:, :budget].sum(axis=1))
        recall[t] = matches.sum(axis=0) / positives.sum()
    return recall.mean(axis=0), fractions * (float(total_kept) / len(videos))
