"""Label assignment: ground-truth segments in seconds -> training targets on the snippet grid.

The grid (lofi/fidelity.py): a video of `duration_sec` is cut into T = `num_snippets` equal
snippets of `dl = duration_sec / T` seconds; snippet t spans [t * dl, (t + 1) * dl). In
*snippet units* a time x_sec sits at x_sec / dl, so snippet t spans [t, t + 1) and the whole
video is [0, T]. `segments_to_snippets` is the one place that converts seconds to this grid;
every target below is computed from its output, and decoding (lofi/heads/common.py) goes
back with the same `dl`.

Conventions every head shares:
- A proposal is a pair of snippets (s, e = s + d), d = 0 .. D - 1 ("duration index"); it
  covers snippet units [s, e + 1), i.e. seconds [s * dl, (e + 1) * dl). Proposal maps are
  (D, T) "duration x start": cell [d, s]. Cells with s + d >= T run past the video: invalid.
- The *start* of snippet t is its left edge (unit t); the *end* of snippet t is its right
  edge (unit t + 1). So start[s] should fire when a gt action starts near s * dl and end[e]
  when one ends near (e + 1) * dl, which is exactly what the proposal (s, e) covers.
- Boundary targets (BMN's match scores): each gt boundary b (snippet units) gets a boundary
  region [b - w/2, b + w/2] (w = `region_snippets`, default 1 snippet); the start target of
  snippet t is the fraction of the unit-length anchor centred on its start edge,
  [t - 1/2, t + 1/2), that the region covers (max over gts); the end target uses the anchor
  centred on its end edge, [t + 1/2, t + 3/2). With w = 1 this is a tent,
  start[t] = max(0, 1 - |b - t|): a boundary on a grid edge gives one snippet 1.0, one
  between edges splits linearly between the two nearest. BMN's official code uses w = 3
  snippets (at T = 100); at T = 25 that is 12% of the video, hence our default of 1.
- Class targets: snippet t is positive for class k when its centre t + 1/2 lies inside
  a class-k segment [start, end]; a segment too short to contain any centre still marks
  the snippet holding its midpoint, so no annotated action is invisible to the classifier.
- Segments are clipped to the video; one with no length left (it lies wholly outside
  [0, duration_sec]) is ignored by every target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lofi.errors import LofiError


class TargetError(LofiError, ValueError):
    """Inputs to label assignment are inconsistent (shape, duration, label id)."""


def snippet_length_sec(duration_sec: float, num_snippets: int) -> float:
    """Seconds per snippet, dl = duration_sec / num_snippets (37.3 s at T = 25: 1.492 s)."""
    if not duration_sec > 0:
        raise TargetError(f"duration_sec must be > 0, got {duration_sec!r}; check the video's duration field")
    if num_snippets < 1:
        raise TargetError(f"num_snippets must be >= 1, got {num_snippets}")
    return float(duration_sec) / num_snippets


def _as_segments(segments_sec: np.ndarray) -> np.ndarray:
    segs = np.asarray(segments_sec, dtype=np.float64)
    if segs.size == 0:
        return segs.reshape(0, 2)
    if segs.ndim != 2 or segs.shape[1] != 2:
        raise TargetError(f"segments_sec must have shape (N, 2) of [start, end] seconds, got {segs.shape}")
    if not np.all(np.isfinite(segs)):
        raise TargetError("segments_sec holds NaN or infinite times; fix the annotation")
    return segs


def segments_to_snippets(segments_sec: np.ndarray, duration_sec: float, num_snippets: int) -> np.ndarray:
    """Seconds (N, 2) -> continuous snippet units (N, 2) float, clipped to [0, T].

    Unit x means x snippets from the video start: 5.0 s in a 37.3 s video at T = 25
    (dl = 1.492 s) is 5.0 / 1.492 = 3.351, i.e. 35% into snippet 3.
    """
    segs = _as_segments(segments_sec)
    dl = snippet_length_sec(duration_sec, num_snippets)
    return np.clip(segs / dl, 0.0, float(num_snippets))


def _kept_units(segments_sec: np.ndarray, duration_sec: float, num_snippets: int) -> np.ndarray:
    """Snippet-unit segments that keep some length after clipping; (M, 2), M <= N."""
    units = segments_to_snippets(segments_sec, duration_sec, num_snippets)
    return units[units[:, 1] > units[:, 0]]


def _anchor_coverage(boundaries: np.ndarray, anchor_lo: np.ndarray, region_snippets: float) -> np.ndarray:
    """(T,) max over boundaries of |[lo, lo+1) ∩ [b - w/2, b + w/2]| (anchors are 1 unit long)."""
    if boundaries.size == 0:
        return np.zeros_like(anchor_lo)
    half = region_snippets / 2.0
    lo = np.maximum(anchor_lo[:, None], boundaries[None, :] - half)  # (T, M)
    hi = np.minimum(anchor_lo[:, None] + 1.0, boundaries[None, :] + half)
    return np.clip(hi - lo, 0.0, 1.0).max(axis=1)


def boundary_targets(
    segments_sec: np.ndarray, duration_sec: float, num_snippets: int, region_snippets: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Start and end match scores per snippet, each (T,) in [0, 1] (see the module docstring)."""
    if not region_snippets > 0:
        raise TargetError(f"region_snippets must be > 0, got {region_snippets!r}")
    units = _kept_units(segments_sec, duration_sec, num_snippets)
    t = np.arange(num_snippets, dtype=np.float64)
    start = _anchor_coverage(units[:, 0], t - 0.5, region_snippets)
    end = _anchor_coverage(units[:, 1], t + 0.5, region_snippets)
    return start, end


def iou_map_targets(segments_sec: np.ndarray, duration_sec: float, num_snippets: int, max_duration: int) -> np.ndarray:
    """(D, T): [d, s] = max tIoU of snippet units [s, s + d + 1) with any gt; 0 where s + d >= T."""
    if not 1 <= max_duration <= num_snippets:
        raise TargetError(f"max_duration must be in [1, num_snippets={num_snippets}], got {max_duration}")
    units = _kept_units(segments_sec, duration_sec, num_snippets)
    out = np.zeros((max_duration, num_snippets), dtype=np.float64)
    if units.size == 0:
        return out
    d = np.arange(max_duration, dtype=np.float64)[:, None, None]
    s = np.arange(num_snippets, dtype=np.float64)[None, :, None]
    gt_lo, gt_hi = units[None, None, :, 0], units[None, None, :, 1]
    inter = np.clip(np.minimum(s + d + 1.0, gt_hi) - np.maximum(s, gt_lo), 0.0, None)  # (D, T, M)
    union = (d + 1.0) + (gt_hi - gt_lo) - inter
    out = (inter / union).max(axis=2)
    valid = (np.arange(max_duration)[:, None] + np.arange(num_snippets)[None, :]) < num_snippets
    return np.where(valid, out, 0.0)


def class_targets(
    segments_sec: np.ndarray, label_ids: np.ndarray, num_classes: int, duration_sec: float, num_snippets: int
) -> np.ndarray:
    """(K, T) multi-hot: 1 where a snippet's centre lies in a segment of that class (see docstring)."""
    segs = _as_segments(segments_sec)
    labels = np.asarray(label_ids, dtype=np.int64).reshape(-1)
    if labels.shape[0] != segs.shape[0]:
        raise TargetError(f"{segs.shape[0]} segments but {labels.shape[0]} label ids; give one label per segment")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise TargetError(
            f"label ids {sorted(set(bad.tolist()))} are outside [0, num_classes={num_classes}); "
            "set num_classes to the size of the label map"
        )
    units = segments_to_snippets(segs, duration_sec, num_snippets)
    keep = units[:, 1] > units[:, 0]
    units, labels = units[keep], labels[keep]
    out = np.zeros((num_classes, num_snippets), dtype=np.float64)
    centres = np.arange(num_snippets) + 0.5
    for (lo, hi), k in zip(units, labels):
        out[k, (centres >= lo) & (centres <= hi)] = 1.0
        out[k, min(int((lo + hi) / 2.0), num_snippets - 1)] = 1.0
    return out


@dataclass
class TALTargets:
    """Batched float32 targets: start/end (B, T), iou_map (B, D, T), classes (B, K, T)."""

    start: torch.Tensor
    end: torch.Tensor
    iou_map: torch.Tensor
    classes: torch.Tensor

    def to(self, device: torch.device | str) -> "TALTargets":
        return TALTargets(*(x.to(device) for x in (self.start, self.end, self.iou_map, self.classes)))


def make_targets(
    videos: list[tuple[np.ndarray, np.ndarray, float]],
    num_snippets: int,
    max_duration: int,
    num_classes: int,
    region_snippets: float = 1.0,
) -> TALTargets:
    """Targets for a batch of videos, each given as (segments_sec (N, 2), label_ids (N,), duration_sec)."""
    if not videos:
        raise TargetError("make_targets needs at least one video")
    starts, ends, maps, classes = [], [], [], []
    for segments_sec, label_ids, duration_sec in videos:
        start, end = boundary_targets(segments_sec, duration_sec, num_snippets, region_snippets)
        starts.append(start)
        ends.append(end)
        maps.append(iou_map_targets(segments_sec, duration_sec, num_snippets, max_duration))
        classes.append(class_targets(segments_sec, label_ids, num_classes, duration_sec, num_snippets))

    def stack(arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays).astype(np.float32))

    return TALTargets(start=stack(starts), end=stack(ends), iou_map=stack(maps), classes=stack(classes))
