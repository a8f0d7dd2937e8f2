"""What detection and proposal evaluation share: protocols, tIoU, blocked videos, GT columns."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np

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


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first index, length) of every run of equal neighbours."""
    head = np.ones(len(values), dtype=bool)
    head[1:] = values[1:] != values[:-1]
    starts = np.flatnonzero(head)
    return starts, np.diff(starts, append=len(values))


def lookup(values: np.ndarray, index: dict[str, int]) -> np.ndarray:
    """`index[value]` for every element (int64, -1 where absent), one dict lookup per run.

    A run is a stretch of equal neighbours: prediction columns come grouped by video, so a
    video-id column costs one lookup per video, not per row. No pandas: importing it costs
    more than `lofi eval` spends here.
    """
    starts, lengths = _runs(values)
    found = np.fromiter(map(index.get, values[starts].tolist(), repeat(-1)), dtype=np.int64, count=len(starts))
    return np.repeat(found, lengths)


def factorize(values: np.ndarray) -> np.ndarray:
    """Codes 0, 1, ... in order of first appearance (as pandas.factorize), one dict step per run."""
    starts, lengths = _runs(values)
    seen: dict[str, int] = {}
    codes = np.fromiter((seen.setdefault(v, len(seen)) for v in values[starts].tolist()),
                        dtype=np.int64, count=len(starts))
    return np.repeat(codes, lengths)


def isin(values: np.ndarray, members: Iterable[str]) -> np.ndarray:
    """Hash-based membership: np.isin compares object arrays pairwise, minutes at 500k rows."""
    return lookup(values, dict.fromkeys(members, 0)) >= 0


def drop_blocked(det: Detections, blocked: frozenset[str]) -> Detections:
    return det.select(~isin(det.video_id, blocked)) if blocked else det


def score_order(score: np.ndarray) -> np.ndarray:
    """Indices by score descending, equal scores in reverse file order.

    The official code ranks with `argsort()[::-1]`; over a stable sort that reverses ties.
    """
    return np.argsort(score, kind="stable")[::-1]


def rank_order(score: np.ndarray, *group_keys: np.ndarray) -> np.ndarray:
    """Indices sorted by the group keys (first = major), then in `score_order` within a group."""
    return regroup(score_order(score), *group_keys)


def regroup(order: np.ndarray, *group_keys: np.ndarray) -> np.ndarray:
    """`order` stably re-sorted by the group keys (first = major), keeping it within a group.

    One score sort then serves several groupings, each a stable sort of integer keys.
    """
    for key in reversed(group_keys):
        order = order[np.argsort(_narrow(key[order]), kind="stable")]
    return order


def _narrow(key: np.ndarray) -> np.ndarray:
    """The smallest integer type that holds the keys: numpy's stable sort is a radix sort up to 16 bits."""
    if len(key) and key.min() >= np.iinfo(np.int16).min and key.max() <= np.iinfo(np.int16).max:
        return key.astype(np.int16)
    return key
