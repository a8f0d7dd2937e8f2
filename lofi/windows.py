"""Sliding windows over fixed-stride snippet features (THUMOS14-style long videos), pure numpy.

A fixed-stride level (lofi/sampling.py) gives a video of `duration_sec` T = ceil(duration_sec /
stride_sec) snippets, snippet t spanning [t * stride_sec, (t + 1) * stride_sec). A head is built
for one grid of W snippets, so a long video is cut into windows of W snippets:

- `window_starts`: the first snippet of each window. Windows step by
  `window_step(W, overlap)` = round(W * (1 - overlap)) snippets; the last window is aligned to
  the end of the video (start T - W), so no window but a short video's has padding and every
  snippet is seen. A video with T <= W is one window starting at 0, zero-padded to W snippets
  (`cut_window` returns how many of its rows are real).
- Window w starting at snippet s0 is the head's whole "video": W snippets of stride_sec, i.e.
  `window_sec = W * stride_sec` seconds from `s0 * stride_sec`. Its targets come from
  `window_ground_truth`: every segment clipped to the window's time span and shifted to the
  window's start, kept only when at least `min_kept_fraction` (default `MIN_KEPT_FRACTION`,
  one half) of its length lies inside. A half-seen action is still mostly that action; a
  sliver cut by the window edge would teach the head a boundary where the action has none.
  (With overlap 1/2 every action up to W / 2 snippets lies whole in some window.)
- `merge_window_detections`: the decoded detections of a video's windows (seconds from each
  window's start) -> video time: shifted by the window's start, those whose centre lies past
  the window's valid end (the padding of a short video, or time past the video's end) dropped,
  the rest clipped to it; optionally only each window's `max_per_window` best kept (the
  candidates of a long video's many windows would make its Soft-NMS slow: top_k passes over
  all of them; feature-based toolkits cap candidates before NMS likewise); all windows
  concatenated and suppressed once per video with
  lofi.postprocess (Soft-NMS or NMS, class-aware, top_k). Overlapping windows see an action
  twice; the one suppression per video merges the copies.
"""

from __future__ import annotations

import numpy as np

from lofi.postprocess import suppress

MIN_KEPT_FRACTION = 0.5


def window_step(window_snippets: int, overlap: float) -> int:
    """Snippets between two window starts: round(W * (1 - overlap)), at least 1."""
    if window_snippets < 1:
        raise ValueError(f"window_snippets must be >= 1, got {window_snippets}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"window overlap must be in [0, 1), got {overlap}")
    return max(1, int(round(window_snippets * (1.0 - overlap))))


def window_starts(num_snippets: int, window_snippets: int, overlap: float) -> np.ndarray:
    """First snippet of every window (int64, increasing): 0, step, 2 * step, ... and T - W last."""
    step = window_step(window_snippets, overlap)
    if num_snippets < 1:
        raise ValueError(f"num_snippets must be >= 1, got {num_snippets}")
    last = max(0, num_snippets - window_snippets)
    starts = list(range(0, last, step)) + [last]
    return np.asarray(starts, dtype=np.int64)


def cut_window(features: np.ndarray, start: int, window_snippets: int) -> tuple[np.ndarray, int]:
    """Rows [start, start + W) of a video's (T, D) features, zero-padded to (W, D), and the
    number of real rows (the head sees zeros in the padding; `merge_window_detections` drops
    what it detects there)."""
    part = features[start:start + window_snippets]  # (<=W, D)
    out = np.zeros((window_snippets, features.shape[1]), dtype=np.float32)
    out[:len(part)] = part
    return out, len(part)


def window_ground_truth(segments_sec: np.ndarray, label_ids: np.ndarray, start_sec: float, window_sec: float,
                        min_kept_fraction: float = MIN_KEPT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """The segments (N, 2) of a video seen by the window [start_sec, start_sec + window_sec):
    clipped to it, kept when they keep >= min_kept_fraction of their length (a zero-length
    segment: when it lies inside), in seconds from the window's start -> ((M, 2), (M,))."""
    if not 0.0 < min_kept_fraction <= 1.0:
        raise ValueError(f"min_kept_fraction must be in (0, 1], got {min_kept_fraction}")
    segs = np.asarray(segments_sec, dtype=np.float64).reshape(-1, 2)
    labels = np.asarray(label_ids, dtype=np.int64).reshape(-1)
    end_sec = start_sec + window_sec
    clipped = np.clip(segs, start_sec, end_sec)
    length, kept = segs[:, 1] - segs[:, 0], clipped[:, 1] - clipped[:, 0]
    inside = (segs[:, 0] >= start_sec) & (segs[:, 0] < end_sec)
    # a tiny tolerance: a segment exactly half inside must count as half despite float rounding
    keep = np.where(length > 0, (kept > 0) & (kept >= min_kept_fraction * length - 1e-9), inside)
    return clipped[keep] - start_sec, labels[keep]


def merge_window_detections(detections: list[dict[str, np.ndarray]], starts_sec: list[float],
                            valid_ends_sec: list[float], method: str = "soft_nms", top_k: int = 100,
                            sigma: float = 0.5, iou_threshold: float = 0.5, class_aware: bool = True,
                            max_per_window: int | None = None) -> dict[str, np.ndarray]:
    """One video's window detections (dicts of `segments_sec` (N, 2) in seconds from the window's
    start, `scores` (N,), `label_ids` (N,), e.g. `decode_detections`' output) -> its detections in
    video time, suppressed once (`lofi.postprocess.suppress`) and at most top_k, best first.

    `starts_sec[i]`: window i's start in the video; `valid_ends_sec[i]`: where its real snippets
    end, in video time (min(window end, video duration)). A detection whose centre lies at or past
    it is dropped (it sits in padding or past the video); the rest are clipped to
    [start, valid end]. `max_per_window`: keep only each window's best that many (by score) of those."""
    if not len(detections) == len(starts_sec) == len(valid_ends_sec):
        raise ValueError(f"{len(detections)} windows' detections, {len(starts_sec)} starts, "
                         f"{len(valid_ends_sec)} valid ends: give one of each per window")
    segments, scores, labels = [np.zeros((0, 2))], [np.zeros(0)], [np.zeros(0, dtype=np.int64)]
    for det, start, end in zip(detections, starts_sec, valid_ends_sec):
        seg = np.asarray(det["segments_sec"], dtype=np.float64).reshape(-1, 2) + start
        score = np.asarray(det["scores"], dtype=np.float64).reshape(-1)
        keep = np.flatnonzero(seg.mean(axis=1) < end)
        if max_per_window is not None:
            keep = keep[np.argsort(-score[keep], kind="stable")[:max_per_window]]
        segments.append(np.clip(seg[keep], start, end))
        scores.append(score[keep])
        labels.append(np.asarray(det["label_ids"], dtype=np.int64).reshape(-1)[keep])
    merged = {"segments_sec": np.concatenate(segments), "scores": np.concatenate(scores),
              "label_ids": np.concatenate(labels)}
    seg, sc, idx = suppress(merged, method=method, top_k=top_k, sigma=sigma, iou_threshold=iou_threshold,
                            class_aware=class_aware)
    return {"segments_sec": seg, "scores": sc, "label_ids": merged["label_ids"][idx]}
