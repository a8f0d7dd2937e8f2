"""Readers that turn each file format into raw records, without judging the values.

Every format ends in the same `RawVideo` records so that one validator (load.py) applies
the same rules, and the same error wording, to ActivityNet JSON, prediction-format ground
truth and THUMOS CSV alike. Only problems that stop reading altogether (unparsable JSON,
missing top-level keys or CSV columns) are raised here.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lofi.annotations.types import AnnotationError


@dataclass
class RawSegment:
    segment_field: str  # where the times are, e.g. "annotations[2].segment" or "line 17 t-start/t-end"
    label_field: str
    segment: Any  # expected: [start, end], numbers or numeric strings
    label: Any


@dataclass
class RawVideo:
    video_id: str
    subset: Any
    duration: Any
    fps: Any = None
    segments: list[RawSegment] = field(default_factory=list)
    duplicate_of_earlier: bool = False  # same id as an earlier entry of the file
    problem: str | None = None  # a structural problem of the entry itself (field: what is wrong)


@dataclass
class RawFile:
    path: Path
    videos: list[RawVideo]
    taxonomy_labels: frozenset[str] | None = None  # leaf class names, when the file declares them


class _DuplicateKeys(dict):
    """A JSON object whose keys repeat: keeps the first value, remembers the later ones."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__()
        self.duplicates: list[tuple[str, Any]] = []
        for key, value in pairs:
            if key in self:
                self.duplicates.append((key, value))
            else:
                self[key] = value


def _object_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.load would silently keep the last of two equal keys; a duplicate video id must be reported.
    plain = dict(pairs)
    return plain if len(plain) == len(pairs) else _DuplicateKeys(pairs)


def read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise AnnotationError([f"{path}: file does not exist; check the path"]) from None
    except UnicodeDecodeError as err:
        raise AnnotationError([f"{path}: not a UTF-8 text file ({err.reason}); "
                               "give an annotation JSON or CSV"]) from None
    except OSError as err:
        raise AnnotationError([f"{path}: cannot be read ({err.strerror}); give a readable file"]) from None
    try:
        return json.loads(text, object_pairs_hook=_object_hook)
    except json.JSONDecodeError as err:
        raise AnnotationError(
            [f"{path}: line {err.lineno}, column {err.colno}: not valid JSON: {err.msg}; fix the file there"]
        ) from None


def entries(mapping: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    """(key, value, is_duplicate) in file order, duplicates after the first occurrences."""
    out = [(k, v, False) for k, v in mapping.items()]
    return out + [(k, v, True) for k, v in getattr(mapping, "duplicates", [])]


def _require_mapping(data: Any, key: str, path: Path, fix: str) -> dict[str, Any]:
    if not isinstance(data, dict) or key not in data:
        raise AnnotationError([f"{path}: no top-level {key!r} key; {fix}"])
    value = data[key]
    if not isinstance(value, dict):
        raise AnnotationError([f"{path}: {key!r} must map video ids to entries, got {type(value).__name__}"])
    return value


def _taxonomy_leaves(taxonomy: Any) -> frozenset[str] | None:
    """Leaf node names of an ActivityNet taxonomy, or None when the file declares none."""
    if not isinstance(taxonomy, list) or not taxonomy:
        return None
    nodes = [n for n in taxonomy if isinstance(n, dict) and isinstance(n.get("nodeName"), str)]
    if not nodes:
        return None
    parent_ids = {n.get("parentId") for n in nodes}
    return frozenset(n["nodeName"] for n in nodes if n.get("nodeId") is None or n.get("nodeId") not in parent_ids)


def _raw_segment(where: str, entry: Any) -> RawSegment:
    if not isinstance(entry, dict):
        return RawSegment(f"{where}.segment", f"{where}.label", entry, None)
    return RawSegment(f"{where}.segment", f"{where}.label", entry.get("segment"), entry.get("label"))


def read_activitynet(path: Path, data: Any) -> RawFile:
    """ActivityNet v1.3 / HACS ground truth, and the THUMOS14 JSON variants built like it."""
    database = _require_mapping(data, "database", path, "an ActivityNet ground truth has {database: {id: {...}}}")
    videos = []
    for video_id, entry, duplicate in entries(database):
        if not isinstance(entry, dict):
            problem = f"entry: must be an object with subset, duration and annotations, got {type(entry).__name__}"
            videos.append(RawVideo(video_id, None, None, None, [], duplicate, problem))
            continue
        anns = entry.get("annotations", [])
        problem = None
        if not isinstance(anns, list):
            problem, anns = f"annotations: must be a list of {{segment, label}}, got {type(anns).__name__}", []
        segments = [_raw_segment(f"annotations[{i}]", a) for i, a in enumerate(anns)]
        videos.append(RawVideo(video_id, entry.get("subset"), entry.get("duration"), entry.get("fps"),
                               segments, duplicate, problem))
    return RawFile(path, videos, _taxonomy_leaves(data.get("taxonomy")))


def read_prediction_as_gt(path: Path, data: Any, subset: str) -> RawFile:
    """Ground truth written in the prediction format (scores ignored); durations come from metadata."""
    results = _require_mapping(data, "results", path, "a prediction file has {results: {id: [...]}}")
    videos = []
    for video_id, rows, duplicate in entries(results):
        problem = None
        if not isinstance(rows, list):
            problem, rows = f"results: must be a list of {{segment, label, score}}, got {type(rows).__name__}", []
        segments = [_raw_segment(f"results[{i}]", e) for i, e in enumerate(rows)]
        videos.append(RawVideo(video_id, subset, None, None, segments, duplicate, problem))
    return RawFile(path, videos)


THUMOS_COLUMNS = ("video-name", "t-start", "t-end", "action-label")


def _read_csv_rows(path: Path, required: tuple[str, ...], what: str) -> list[tuple[int, dict[str, str]]]:
    try:
        handle = path.open(newline="")
    except FileNotFoundError:
        raise AnnotationError([f"{path}: file does not exist; check the path"]) from None
    except OSError as err:
        raise AnnotationError([f"{path}: cannot be read ({err.strerror}); give a readable file"]) from None
    with handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise AnnotationError([f"{path}: {what} CSV lacks column(s) {', '.join(missing)}; "
                                   f"found {', '.join(reader.fieldnames or []) or 'no header'}"])
        return [(reader.line_num, row) for row in reader]


def subset_from_thumos_name(video_id: str) -> str | None:
    if "_validation_" in video_id:
        return "validation"
    if "_test_" in video_id:
        return "testing"
    return None


def read_thumos_csv(path: Path, subset: str | None) -> RawFile:
    """TSP-style THUMOS14 CSV: one row per temporal region; only `Action` rows are actions."""
    rows = _read_csv_rows(path, THUMOS_COLUMNS, "THUMOS")
    videos: dict[str, RawVideo] = {}
    for line, row in rows:
        video_id = row["video-name"]
        video = videos.get(video_id)
        if video is None:
            # THUMOS names carry the split (video_validation_*, video_test_*); `subset` overrides.
            video = videos[video_id] = RawVideo(video_id, subset or subset_from_thumos_name(video_id),
                                                row.get("video-duration"), row.get("fps"))
        region = row.get("temporal-region-label")
        if region is not None and region.strip() != "Action":
            continue
        video.segments.append(RawSegment(f"line {line} t-start/t-end", f"line {line} action-label",
                                         [row["t-start"], row["t-end"]], row["action-label"]))
    return RawFile(path, list(videos.values()))


KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")


def kinetics_clip_id(youtube_id: str, time_start: Any, time_end: Any) -> str:
    """`<youtube_id>_<start:06d>_<end:06d>`: the file stem the Kinetics download tools write
    for a trimmed clip (times in whole seconds)."""
    return f"{youtube_id}_{int(float(time_start)):06d}_{int(float(time_end)):06d}"


def is_kinetics_csv(path: Path) -> bool:
    """Whether a CSV's header names the Kinetics columns (cheap: reads the first line only)."""
    try:
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError):
        return False
    return {"youtube_id", "time_start", "time_end"} <= {h.strip() for h in header}


def read_kinetics_csv(path: Path) -> RawFile:
    """Kinetics-style trimmed clips: one row per clip, `label,youtube_id,time_start,time_end,split`.

    Each row is a video of its own, the trimmed file `<youtube_id>_<start:06d>_<end:06d>.<ext>`,
    whose whole span (duration `time_end - time_start`, from 0 in the file) is one segment of
    `label`. `split` takes the subset spellings (train/val/test). Extra columns (is_cc) are ignored.
    """
    rows = _read_csv_rows(path, KINETICS_COLUMNS, "Kinetics")
    videos: dict[str, RawVideo] = {}
    for line, row in rows:
        start, end = row["time_start"], row["time_end"]
        try:
            video_id = kinetics_clip_id(row["youtube_id"], start, end)
            duration: Any = float(end) - float(start)
        except ValueError:
            video_id, duration = f"{row['youtube_id']}_line{line}", None
        raw = RawVideo(video_id, row["split"], duration)
        if duration is None:
            raw.problem = f"line {line} time_start/time_end: {start!r}, {end!r} are not numbers of seconds"
        raw.segments.append(RawSegment(f"line {line} time_start/time_end", f"line {line} label",
                                       [0.0, duration if duration is not None else 0.0], row["label"]))
        if video_id in videos:
            raw.duplicate_of_earlier = True
            videos[f"{video_id}#line{line}"] = raw
            continue
        videos[video_id] = raw
    return RawFile(path, list(videos.values()))


def read_metadata(path: Path) -> tuple[dict[str, tuple[str, str | None]], list[str]]:
    """Per-video (duration, fps) strings keyed by file stem, and any duplicate-row problems.

    The TSP metadata names files `v_<id>.mp4` (ActivityNet) or `<id>.mp4` (THUMOS); lookup
    tries the id and then `v_<id>` (see `metadata_for`).
    """
    rows = _read_csv_rows(path, ("filename", "video-duration"), "metadata")
    table: dict[str, tuple[str, str | None]] = {}
    problems = []
    for line, row in rows:
        stem = Path(row["filename"]).stem
        if stem in table:
            problems.append(f"{path}: line {line}: file {row['filename']!r} is listed twice; keep one row per video")
            continue
        table[stem] = (row["video-duration"], row.get("fps"))
    return table, problems


def metadata_for(table: dict[str, tuple[str, str | None]], video_id: str) -> tuple[str, str | None] | None:
    return table.get(video_id) or table.get(f"v_{video_id}")
