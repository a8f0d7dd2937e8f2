"""What detection and proposal evaluation share: protocols, tIoU, blocked videos, GT columns."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lofi.annotations import AnnotationError, AnnotationSet, Detections

# np.linspace, as the official ActivityNet code and the THUMOS ports write them, so a
# threshold compares against exactly the same float as there.
PROTOCOLS: dict[str, tuple[float, ...]] = {
    "anet": tuple(np.linspace(0.5, 0.95, 10).tolist()),
    "thumos": tuple(np.linspace(0.3, 0.7, 5).tolist()),
}


def tiou_thresholds(protocol: str = "anet", tiou: Iterable[float] | None = None) -> np.ndarray:
    """The thresholds of a protocol, or an explicit list (which wins) checked to lie in (0, 1]."""
    if tiou is not None and len(values := [float(t) for t in tiou]):
        bad = [t for t in values if not 0.0 < t <= 1.0]
        if bad:
            raise AnnotationError([f"tIoU thresholds must lie in (0, 1], got {bad}; e.g. --tiou 0.5,0.75,0.95"])
        return np.asarray(values, dtype=np.float64)
    if protocol not in PROTOCOLS:
        raise AnnotationError([f"protocol {protocol!r} is unknown; use one of {', '.join(PROTOCOLS)} or --tiou"])
    return np.asarray(PROTOCOLS[protocol], dtype=np.float64)


def read_blocked(path: str | Path) -> frozenset[str]:
    """Video ids to leave out: a JSON list, or one id per line (blank lines and # comments skipped)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise AnnotationError([f"{path}: blocked-video file does not exist; check the path"]) from None
    if text.lstrip().startswith("["):
        try:
            ids = json.loads(text)
        except json.JSONDecodeError as err:
            raise AnnotationError(
                [f"{path}: line {err.lineno}, column {err.colno}: not valid JSON: {err.msg}"]) from None
        if not all(isinstance(i, str) for i in ids):
            raise AnnotationError([f"{path}: a JSON blocked list must hold video id strings"])
        return frozenset(ids)
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return frozenset(line for line in lines if line)


def segment_tiou(p_start: np.ndarray, p_end: np.ndarray, g_start: np.ndarray, g_end: np.ndarray,
                 degenerate: float) -> np.ndarray:
    """Elementwise tIoU of predicted and ground-truth segments.

    The union is written as the official code writes it (gt length + prediction length -
    intersection) so the floats agree bit for bit. Two zero-length segments give 0/0, NaN
    there; `degenerate` is what that pair becomes here (detection: +inf, which like the
    official NaN passes every threshold and ranks first; proposals: NaN, never a match).
    """
    intersection = np.clip(np.minimum(p_end, g_end) - np.maximum(p_start, g_start), 0.0, None)
    union = (g_end - g_start) + (p_end - p_start) - intersection
    out = np.full(intersection.shape, degenerate, dtype=np.float64)
    np.divide(intersection, union, out=out, where=union != 0)
    return out


@dataclass(frozen=True, eq=False)
class GroundTruthColumns:
    """Every ground-truth segment of an AnnotationSet as columns, in file order."""

    video_id: np.ndarray  # object
    start_sec: np.ndarray
    end_sec: np.ndarray
    label: np.ndarray  # object
    video_ids: frozenset[str]  # every evaluated video, with or without segments

    @classmethod
    def build(cls, ann: AnnotationSet, blocked: frozenset[str] = frozenset()) -> GroundTruthColumns:
        rows = [(v.video_id, s.start_sec, s.end_sec, s.label)
                for v in ann.videos if v.video_id not in blocked for s in v.segments]
        vids, starts, ends, labels = zip(*rows) if rows else ((), (), (), ())
        return cls(np.array(vids, dtype=object), np.array(starts, dtype=np.float64), np.array(ends, dtype=np.float64),
                   np.array(labels, dtype=object), frozenset(v.video_id for v in ann.videos) - blocked)


def isin(values: np.ndarray, members: Iterable[str]) -> np.ndarray:
    """Hash-based membership: np.isin compares object arrays pairwise, minutes at 500k rows."""
    return pd.Series(values, dtype=object).isin(set(members)).to_numpy()


def drop_blocked(det: Detections, blocked: frozenset[str]) -> Detections:
    return det.select(~isin(det.video_id, blocked)) if blocked else det


def rank_order(score: np.ndarray, *group_keys: np.ndarray) -> np.ndarray:
    """Indices sorted by the group keys (first = major), then score descending.

    Equal scores come in reverse file order: the official code ranks with
    `argsort()[::-1]`, which for a stable sort reverses ties.
    """
    position = np.arange(len(score))
    return np.lexsort((-position, -score, *reversed(group_keys)))
