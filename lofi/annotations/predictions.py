"""Reading and writing ActivityNet-format prediction (and proposal) files as `Detections`."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
from collections.abc import Iterator
from itertools import chain, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from lofi.annotations import sources
from lofi.annotations.types import AnnotationError, Detections

log = logging.getLogger("lofi.annotations")

FIX = "fix the entry or pass --skip-invalid to drop it"


def _entry_problem(entry: Any) -> str:
    """Why one `results` entry could not be read (only called on the slow path)."""
    if not isinstance(entry, dict):
        return f"must be an object with segment, score and label, got {type(entry).__name__}"
    segment = entry.get("segment")
    if not isinstance(segment, (list, tuple)) or len(segment) != 2:
        return f"segment {segment!r} is not [start, end]"
    for name, value in (("segment[0]", segment[0]), ("segment[1]", segment[1]), ("score", entry.get("score"))):
        try:
            float(value)
        except (TypeError, ValueError):
            return f"{name} {value!r} is not a number"
    return f"label {entry.get('label')!r} is not a string"


def _read_rows(path: Path, results: dict[str, Any]) -> tuple[list, list[str]]:
    vids, starts, ends, scores, labels, problems = [], [], [], [], [], []
    for video_id, entries, duplicate in sources.entries(results):
        if duplicate:
            problems.append(f"{path}: video {video_id!r}: results: the same video id appears again; merge the lists")
            continue
        if not isinstance(entries, list):
            problems.append(f"{path}: video {video_id!r}: results: must be a list, got {type(entries).__name__}; {FIX}")
            continue
        for i, entry in enumerate(entries):
            try:
                # Fast path: one try around the common case, details only when it fails.
                segment = entry["segment"]
                start, end, score = float(segment[0]), float(segment[1]), float(entry["score"])
                label = entry.get("label", "")
                if type(label) is not str or len(segment) != 2:
                    raise TypeError
            except (TypeError, ValueError, KeyError, IndexError):
                problems.append(f"{path}: video {video_id!r}: results[{i}]: {_entry_problem(entry)}; {FIX}")
                continue
            if not (math.isfinite(start) and math.isfinite(end) and math.isfinite(score)) or end < start:
                problems.append(f"{path}: video {video_id!r}: results[{i}]: segment [{start}, {end}] with score "
                                f"{score} must be finite numbers with start <= end; {FIX}")
                continue
            vids.append(video_id)
            starts.append(start)
            ends.append(end)
            scores.append(score)
            labels.append(label)
    return [vids, starts, ends, scores, labels], problems


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic GC while a prediction file becomes objects and columns.

    Half a million small dicts and lists trigger a collection every few hundred
    allocations, each one walking everything allocated so far: that was half the load time.
    Nothing built here forms a cycle, so pausing changes only the speed.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _fast_columns(results: dict[str, Any]) -> list | None:
    """The columns in one pass of C-level maps when every entry is well formed, else None.

    Well formed: a list per video, entries with a numeric [start, end] segment and score
    (no strings: those go through float() on the checked path), string labels, finite
    values, start <= end, no repeated video id. Anything else returns None and
    `_read_rows` reads the file entry by entry, naming each problem.
    """
    lists = list(results.values())
    if getattr(results, "duplicates", None) or not all(type(v) is list for v in lists):
        return None
    rows = list(chain.from_iterable(lists))
    if not rows:
        return [[], [], [], [], []]
    try:
        segment = np.array(list(map(itemgetter("segment"), rows)))
        score = np.array(list(map(itemgetter("score"), rows)))
        labels = list(map(dict.get, rows, repeat("label"), repeat("")))
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    numeric = segment.dtype.kind in "biuf" and score.dtype.kind in "biuf"
    if not numeric or segment.shape != (len(rows), 2) or score.shape != (len(rows),):
        return None
    segment, score = segment.astype(np.float64, copy=False), score.astype(np.float64, copy=False)
    start, end = segment[:, 0], segment[:, 1]
    if not (np.isfinite(segment).all() and np.isfinite(score).all() and (start <= end).all()):
        return None
    if set(map(type, labels)) != {str}:
        return None
    video_id = np.repeat(np.array(list(results), dtype=object), [len(v) for v in lists])
    return [video_id, start, end, score, labels]


def _columns(path: Path, results: dict[str, Any]) -> tuple[list, list[str]]:
    fast = _fast_columns(results)
    return (fast, []) if fast is not None else _read_rows(path, results)


def load_predictions(path: str | Path, *, skip_invalid: bool = False) -> Detections:
    """Read `{version, external_data, results: {video_id: [{label, score, segment}]}}`.

    Rows keep file order. Segments and scores may be numbers or numeric strings; a missing
    label (proposal files) reads as "". Every bad entry is reported at once; with
    `skip_invalid` they are dropped instead.
    """
    path = Path(path)
    with _gc_paused():
        columns, problems = _read_file(path)
    if problems and not skip_invalid:
        raise AnnotationError(problems, header=f"{path}: {len(problems)} bad prediction(s)")
    if problems:
        log.warning("%s: dropped %d bad prediction(s) (--skip-invalid):\n  %s",
                    path, len(problems), "\n  ".join(problems))
    return _detections(columns)


def _read_file(path: Path) -> tuple[list, list[str]]:
    # A function of its own so that the parsed tree is freed on return, while the GC is still
    # paused: re-enabled first, it would walk all of it once more.
    data = sources.read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise AnnotationError([f"{path}: no top-level 'results' mapping video ids to lists of "
                               "{label, score, segment}; is this a prediction file?"])
    return _columns(path, data["results"])


def detections_from_results(results: dict[str, Any]) -> Detections:
    """The `results` mapping of a prediction file, held in memory (e.g. a validation pass), as Detections."""
    columns, problems = _columns(Path("<in-memory results>"), results)
    if problems:
        raise AnnotationError(problems, header=f"{len(problems)} bad prediction(s)")
    return _detections(columns)


def _detections(columns: list) -> Detections:
    vids, starts, ends, scores, labels = columns
    return Detections(np.array(vids, dtype=object), np.array(starts, dtype=np.float64),
                      np.array(ends, dtype=np.float64), np.array(scores, dtype=np.float64),
                      np.array(labels, dtype=object))


def save_predictions(det: Detections, path: str | Path, version: str = "VERSION 1.3",
                     external_data: dict[str, Any] | None = None) -> None:
    """Write ActivityNet-format predictions; videos in order of first appearance, rows in order.

    Empty labels (proposals) are written without a `label` key, as proposal files are.
    """
    import pandas as pd  # here only: reading and scoring do not need pandas' import time

    codes, uniques = pd.factorize(pd.Series(det.video_id, dtype=object), sort=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    starts, ends = det.start_sec.tolist(), det.end_sec.tolist()
    scores, labels = det.score.tolist(), det.label.tolist()
    results: dict[str, list[dict[str, Any]]] = {}
    for k, video_id in enumerate(uniques):
        rows = []
        for i in order[bounds[k]:bounds[k + 1]].tolist():
            row: dict[str, Any] = {"label": labels[i]} if labels[i] else {}
            row["score"], row["segment"] = scores[i], [starts[i], ends[i]]
            rows.append(row)
        results[str(video_id)] = rows
    payload = {"version": version, "external_data": external_data or {}, "results": results}
    Path(path).write_text(json.dumps(payload))
