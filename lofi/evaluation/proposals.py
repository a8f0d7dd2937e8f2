"""Proposal evaluation: average recall vs average number of proposals per video (AR@AN).

Reproduces ActivityNet's Evaluation/eval_proposal.py: each video keeps its top-scored
proposals in proportion to the file's overall count (`max_avg_proposals` per video on
average); then for 100 fractions of that budget a ground truth is recalled at a threshold
when any kept proposal within the fraction reaches that tIoU. Recall is averaged over the
thresholds; the AUC is the trapezoid area under AR vs AN divided by the largest AN (a
fraction in [0, 1]; the official script prints it times 100). Only videos with ground
truth count, as there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lofi.annotations import AnnotationError, AnnotationSet, Detections
from lofi.evaluation.common import PROTOCOLS, GroundTruthColumns, drop_blocked, lookup, rank_order, segment_tiou
from lofi.evaluation.common import tiou_thresholds as check_thresholds

AR_AT = (1, 5, 10, 100)


@dataclass(frozen=True, eq=False)
class ProposalResult:
    tiou_thresholds: np.ndarray  # (T,)
    average_num_proposals: np.ndarray  # (100,) AN at each point of the curve
    recall: np.ndarray  # (T, 100)
    num_videos: int
    num_ground_truth: int
    num_proposals: int

    @property
    def average_recall(self) -> np.ndarray:
        return self.recall.mean(axis=0)

    @property
    def auc(self) -> float:
        if self.average_num_proposals[-1] <= 0:
            return 0.0
        return float(np.trapezoid(self.average_recall, self.average_num_proposals) / self.average_num_proposals[-1])

    def recall_at(self, num_proposals: float) -> float:
        """AR at AN = num_proposals, read off the curve (its end value beyond the curve's end)."""
        return float(np.interp(num_proposals, self.average_num_proposals, self.average_recall))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tiou_thresholds": [round(float(t), 6) for t in self.tiou_thresholds], "AUC": self.auc}
        out.update({f"AR@{k}": self.recall_at(k) for k in AR_AT})
        out.update({
            "average_num_proposals": [float(x) for x in self.average_num_proposals],
            "average_recall": [float(x) for x in self.average_recall],
            "num_videos": self.num_videos,
            "num_ground_truth": self.num_ground_truth,
            "num_proposals": self.num_proposals,
        })
        return out


def _kept_per_video(codes: np.ndarray, num_videos: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(proposals per video, how many of them are kept) — int(count * ratio), as the official code."""
    counts = np.bincount(codes, minlength=num_videos)
    kept = np.minimum((counts * ratio).astype(np.int64), counts)
    return counts, kept


def evaluate_proposals(ground_truth: AnnotationSet, proposals: Detections, tiou_thresholds: Any = PROTOCOLS["anet"],
                       max_avg_proposals: float = 100, blocked: frozenset[str] = frozenset()) -> ProposalResult:
    """AR@AN of class-agnostic proposals (labels ignored) against every video of `ground_truth`."""
    thresholds = check_thresholds(tiou=tiou_thresholds)
    gt = GroundTruthColumns.build(ground_truth, blocked)
    props = drop_blocked(proposals, blocked)
    video_names, g_vid = np.unique(gt.video_id.astype(str), return_inverse=True)
    num_videos = len(video_names)
    if num_videos == 0:
        raise AnnotationError(["the ground truth has no segments to recall; check --subset and the file"])
    p_vid = lookup(props.video_id, {name: k for k, name in enumerate(video_names.tolist())})
    ratio = max_avg_proposals * float(num_videos) / len(props) if len(props) else 0.0
    inside = p_vid >= 0
    order = rank_order(props.score[inside], p_vid[inside])
    p_code = p_vid[inside][order]
    p_start, p_end = props.start_sec[inside][order], props.end_sec[inside][order]
    counts, kept = _kept_per_video(p_code, num_videos, ratio)
    total_kept = int(kept.sum())
    rank = np.arange(len(p_code)) - np.repeat(np.cumsum(counts) - counts, counts)
    keep = rank < kept[p_code]
    p_code, p_start, p_end, rank = p_code[keep], p_start[keep], p_end[keep], rank[keep]
    # first_hit[t, g]: best rank of a kept proposal reaching threshold t on ground truth g.
    first_hit = np.full((len(thresholds), len(g_vid)), np.iinfo(np.int64).max)
    g_order = np.argsort(g_vid, kind="stable")
    lo = np.searchsorted(g_vid[g_order], p_code, "left")
    n_pairs = np.searchsorted(g_vid[g_order], p_code, "right") - lo
    pair_p = np.repeat(np.arange(len(p_code)), n_pairs)
    pair_g = g_order[np.repeat(lo, n_pairs) + np.arange(len(pair_p)) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)]
    tiou = segment_tiou(p_start[pair_p], p_end[pair_p], gt.start_sec[pair_g], gt.end_sec[pair_g], degenerate=np.nan)
    for t, threshold in enumerate(thresholds):
        hit = tiou >= threshold
        np.minimum.at(first_hit[t], pair_g[hit], rank[pair_p[hit]])
    fractions = np.arange(1, 101) / 100.0 * (max_avg_proposals * float(num_videos) / total_kept if total_kept else 0.0)
    # A video without proposals is one all-zero column officially: width 1, never a hit.
    width = np.where(counts > 0, kept, 1)
    budget = np.minimum((width[:, None] * fractions[None, :]).astype(np.int64), width[:, None])  # (V, 100)
    recalled = first_hit[:, :, None] < budget[g_vid][None, :, :]  # (T, G, 100)
    recall = recalled.sum(axis=1) / len(g_vid)
    an = fractions * (float(total_kept) / num_videos)
    return ProposalResult(thresholds, an, recall, num_videos, len(g_vid), len(props))
