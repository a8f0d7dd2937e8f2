"""Post-processing of temporal proposals/detections: tIoU, Gaussian Soft-NMS, hard NMS,
top-k per video, and the ActivityNet prediction format.

Soft-NMS (Bodla et al., 2017) as BMN and G-TAD apply it to 1D segments: repeatedly take the
highest-scoring remaining segment, then multiply the score of every other remaining segment by
``exp(-tiou**2 / sigma)``. Reference settings:

- BMN (official code, and mmaction2's BMN config): ``sigma`` (their ``alpha``) = 0.4, decay only
  where ``tiou > low + (high - low) * width`` with low = 0.5, high = 0.9 and ``width`` the kept
  segment's length as a fraction of the video, top 100 per video (ActivityNet).
- G-TAD (official code): ``sigma`` = 0.46 on THUMOS14, decay wherever tiou > 0, top 200.

Our default ``sigma`` = 0.5 with no threshold (decay wherever the segments overlap); pass
``sigma=0.4, low_threshold=0.5, high_threshold=0.9, duration_sec=...`` to reproduce BMN.

Class-aware suppression (``labels=``) lets a segment suppress only segments of its own class.
Use it for detections where one proposal is emitted once per top class (as
`lofi.heads.common.decode_detections` does): class-agnostic suppression would let the copy with
the best class wipe out the copies with the other classes (their tIoU is 1).

Segments are ``(N, 2)`` arrays of ``[start, end]`` in any unit (seconds for detections).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np


def temporal_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise tIoU of segments `a` (N, 2) and `b` (M, 2) -> (N, M); 0 where the union is 0."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 2)
    # (N, 1) against (1, M) broadcasts every pair at once
    inter = np.clip(
        np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0.0, None
    )
    union = (a[:, None, 1] - a[:, None, 0]) + (b[None, :, 1] - b[None, :, 0]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _check(segments: np.ndarray, scores: np.ndarray, labels: np.ndarray | None) -> tuple:
    segments = np.asarray(segments, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(segments) != len(scores):
        raise ValueError(f"{len(segments)} segments but {len(scores)} scores")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(scores):
            raise ValueError(f"{len(labels)} labels but {len(scores)} scores")
    return segments, scores, labels


def soft_nms(
    segments: np.ndarray,
    scores: np.ndarray,
    sigma: float = 0.5,
    top_k: int = 100,
    labels: np.ndarray | None = None,
    low_threshold: float = 0.0,
    high_threshold: float = 0.0,
    duration_sec: float | None = None,
    min_score: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian Soft-NMS: returns the kept segments (K, 2), their decayed scores (K,) in the
    order they were picked (non-increasing) and their indices into the input (K,).

    A remaining segment's score is multiplied by exp(-tiou**2 / sigma) each time a segment it
    overlaps with tiou > low + (high - low) * width / duration_sec is picked (`labels`: only a
    segment of the same label). Picking stops after `top_k` segments or when the best remaining
    score is <= `min_score`.
    """
    segments, scores, labels = _check(segments, scores, labels)
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if high_threshold != low_threshold and not duration_sec:
        raise ValueError("width-dependent thresholds (high_threshold != low_threshold) need duration_sec")
    current = scores.copy()
    alive = np.ones(len(scores), dtype=bool)
    keep: list[int] = []
    kept_scores: list[float] = []
    while len(keep) < top_k and alive.any():
        best = int(np.argmax(np.where(alive, current, -np.inf)))
        if current[best] <= min_score:
            break
        keep.append(best)
        kept_scores.append(float(current[best]))
        alive[best] = False
        others = np.flatnonzero(alive)
        if labels is not None:
            others = others[labels[others] == labels[best]]
        if len(others) == 0:
            continue
        iou = temporal_iou(segments[best : best + 1], segments[others])[0]
        threshold = low_threshold
        if high_threshold != low_threshold:
            width = (segments[best, 1] - segments[best, 0]) / duration_sec
            threshold = low_threshold + (high_threshold - low_threshold) * width
        decay = np.where(iou > threshold, np.exp(-np.square(iou) / sigma), 1.0)
        current[others] *= decay
    idx = np.asarray(keep, dtype=np.int64)
    return segments[idx], np.asarray(kept_scores, dtype=np.float64), idx


def nms(
    segments: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float = 0.5,
    top_k: int = 100,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hard NMS: keep the best segment, drop every remaining one with tiou > `iou_threshold`
    (`labels`: of the same label), repeat; at most `top_k`. Returns (segments, scores, indices)."""
    segments, scores, labels = _check(segments, scores, labels)
    order = np.argsort(-scores, kind="stable")
    alive = np.ones(len(scores), dtype=bool)
    keep: list[int] = []
    for i in order:
        if len(keep) >= top_k:
            break
        if not alive[i]:
            continue
        keep.append(int(i))
        alive[i] = False
        others = np.flatnonzero(alive)
        if labels is not None:
            others = others[labels[others] == labels[i]]
        if len(others):
            iou = temporal_iou(segments[i : i + 1], segments[others])[0]
            alive[others[iou > iou_threshold]] = False
    idx = np.asarray(keep, dtype=np.int64)
    return segments[idx], scores[idx], idx


def to_activitynet_entries(
    segments_sec: np.ndarray,
    scores: np.ndarray,
    label_ids: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    duration_sec: float | None = None,
) -> list[dict[str, Any]]:
    """One video's results as ActivityNet prediction entries `{"label", "score", "segment"}`
    (no "label" for class-agnostic proposals, `label_ids=None`). Segments are clipped to
    [0, duration_sec] when it is given."""
    segments_sec = np.asarray(segments_sec, dtype=np.float64).reshape(-1, 2)
    if duration_sec is not None:
        segments_sec = np.clip(segments_sec, 0.0, duration_sec)
    entries = []
    for i, (start, end) in enumerate(segments_sec):
        entry: dict[str, Any] = {}
        if label_ids is not None:
            label = int(label_ids[i])
            entry["label"] = class_names[label] if class_names is not None else str(label)
        entry["score"] = float(scores[i])
        entry["segment"] = [float(start), float(end)]
        entries.append(entry)
    return entries


def suppress(
    detections: dict[str, np.ndarray],
    method: str = "soft_nms",
    class_aware: bool = True,
    top_k: int = 100,
    sigma: float = 0.5,
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One video's detections (`segments_sec` (N, 2), `scores` (N,), optionally `label_ids` (N,))
    suppressed by `method` ("soft_nms", "nms" or "none": top-k by score only), class-aware when
    `class_aware` and labels are given -> (segments (K, 2), scores (K,), indices into the input)."""
    if method not in ("soft_nms", "nms", "none"):
        raise ValueError(f"method must be soft_nms, nms or none, got {method!r}")
    labels = detections.get("label_ids") if class_aware else None
    seg, sc = detections["segments_sec"], detections["scores"]
    if method == "soft_nms":
        return soft_nms(seg, sc, sigma=sigma, top_k=top_k, labels=labels)
    if method == "nms":
        return nms(seg, sc, iou_threshold=iou_threshold, top_k=top_k, labels=labels)
    idx = np.argsort(-np.asarray(sc), kind="stable")[:top_k]
    return np.asarray(seg, dtype=np.float64).reshape(-1, 2)[idx], np.asarray(sc, dtype=np.float64)[idx], idx


def postprocess_detections(
    detections: Iterable[dict[str, np.ndarray]],
    video_ids: Sequence[str],
    class_names: Sequence[str] | None,
    durations_sec: Sequence[float] | None = None,
    method: str = "soft_nms",
    class_aware: bool = True,
    top_k: int = 100,
    sigma: float = 0.5,
    iou_threshold: float = 0.5,
) -> dict[str, list[dict[str, Any]]]:
    """Per-video detections (dicts with `segments_sec` (N, 2), `scores` (N,) and optionally
    `label_ids` (N,), the output of `decode_detections`) -> `{video_id: [entries]}`, ready to
    write under "results" of an ActivityNet prediction file.

    `method` is "soft_nms", "nms" or "none" (top-k by score only)."""
    if method not in ("soft_nms", "nms", "none"):  # also with no video to process
        raise ValueError(f"method must be soft_nms, nms or none, got {method!r}")
    results: dict[str, list[dict[str, Any]]] = {}
    for i, (video_id, det) in enumerate(zip(video_ids, detections, strict=True)):
        label_ids = det.get("label_ids")
        seg, sc, idx = suppress(det, method=method, class_aware=class_aware, top_k=top_k, sigma=sigma,
                                iou_threshold=iou_threshold)
        kept_labels = None if label_ids is None else np.asarray(label_ids)[idx]
        duration = None if durations_sec is None else durations_sec[i]
        results[video_id] = to_activitynet_entries(seg, sc, kept_labels, class_names, duration)
    return results


def detection_entries(out: Any, video_ids: Sequence[str], durations_sec: Sequence[float], class_names: Sequence[str],
                      top_k_classes: int, top_k: int, sigma: float) -> dict[str, list[dict[str, Any]]]:
    """A head's output for a batch of videos -> {video_id: ActivityNet entries}: candidates decoded
    (`top_k_classes` per proposal), class-aware Soft-NMS, the best `top_k` kept. What `lofi detect`
    and stage 2's validation pass both do, so the two mAPs are computed alike."""
    from lofi.heads.common import decode_detections  # torch: only where a head's output is decoded

    detections = decode_detections(out, list(durations_sec), top_k_classes)
    return postprocess_detections(detections, list(video_ids), class_names, list(durations_sec), method="soft_nms",
                                  class_aware=True, top_k=top_k, sigma=sigma)
