"""Loading ground truth with validation, and writing it back as ActivityNet JSON.

Rules (each problem names the file, the video id and the field, and says the fix):
- a video needs a known subset (`training`/`validation`/`testing`; the spellings in
  `SUBSET_ALIASES` such as `Validation`, `Test`, `val` are accepted and normalised), a unique
  id and a positive duration (from the file, or from `metadata`, which wins when given
  because it describes the video files actually decoded);
- a segment needs two finite times (numbers or numeric strings) and a non-empty label that
  is known when a vocabulary is given (`labels=`, or the taxonomy the file declares);
- start >= 0 and start <= end;
- "suspect" segments: zero length (end == start), or past the video's end by more than the
  tolerance `max(1 s, 1% of the duration)`, or starting at/after the end. Ends past the
  duration within the tolerance are clipped to the duration (rounding in annotation tools
  and container durations differ by a frame or two).

By default every problem, suspect ones included, is collected and raised at once as one
`AnnotationError`. `skip_invalid=True` drops the bad segments (or whole videos, for video
problems) instead and records how many in `AnnotationSet.warnings`. `lenient=True` keeps
suspect segments exactly as written, without clipping: the official ActivityNet evaluator
scores ground truth that way, and the real ActivityNet-1.3 validation and THUMOS14 test
ground truth both contain such segments (see the tests).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from lofi.annotations import sources
from lofi.annotations.types import SUBSET_ALIASES, SUBSETS, AnnotationError, AnnotationSet, LabelVocab, Segment, Video

log = logging.getLogger("lofi.annotations")


@contextlib.contextmanager
def quiet_annotation_log() -> Iterator[None]:
    """Silence the loader's log while a caller reports the same warnings itself (`lofi eval`, detect)."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)

END_TOLERANCE_SEC = 1.0
END_TOLERANCE_FRACTION = 0.01

Format = Literal["auto", "activitynet", "prediction", "thumos_csv", "kinetics_csv"]
LENIENT_HINT = "(or pass --lenient to keep it as written, as the official evaluator does)"
FORMATS = ("auto", "activitynet", "prediction", "thumos_csv", "kinetics_csv")


def end_tolerance_sec(duration_sec: float) -> float:
    """How far a segment may end past the video's duration and still be clipped, not rejected."""
    return max(END_TOLERANCE_SEC, END_TOLERANCE_FRACTION * duration_sec)


def _number(value: Any) -> float | None:
    """A finite float from a number or a numeric string (segments are stored as strings in the wild)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass
class _Checks:
    """Problems of one file in file order: errors always block, suspects block unless lenient."""

    path: Path
    lenient: bool
    metadata_path: Path | None = None
    problems: list[tuple[str, bool]] = field(default_factory=list)  # (message, is_suspect)
    num_errors: int = 0
    clipped: int = 0

    def say(self, video_id: str, where: str, what: str, fix: str, suspect: bool = False) -> None:
        self.problems.append((f"{self.path}: video {video_id!r}: {where}: {what}; {fix}", suspect))
        self.num_errors += not suspect

    @property
    def suspects(self) -> list[str]:
        return [m for m, suspect in self.problems if suspect]

    @property
    def blocking(self) -> list[str]:
        return [m for m, suspect in self.problems if not (suspect and self.lenient)]


def _check_video_fields(raw: sources.RawVideo, meta: dict | None,
                        checks: _Checks) -> tuple[str | None, float | None, float | None]:
    """(subset, duration_sec, fps); a None subset or duration means a video-level problem was reported."""
    before, vid = checks.num_errors, raw.video_id
    if raw.problem:
        where, _, what = raw.problem.partition(": ")
        checks.say(vid, where, what, "fix the entry")
    if raw.duplicate_of_earlier:
        checks.say(vid, "id", "the same video id appears again",
                   "keep one entry per video (the first is kept with --skip-invalid)")
    if not vid.strip():
        checks.say(vid, "id", "empty video id", "give every video an id")
    subset = SUBSET_ALIASES.get(raw.subset.lower()) if isinstance(raw.subset, str) else None
    if raw.subset is None:
        checks.say(vid, "subset", "no subset", f"add one ({', '.join(SUBSETS)}), or pass --assign-subset NAME "
                   "(assign_subset=) for a format without subsets")
    elif subset is None:
        checks.say(vid, "subset", f"unknown subset {raw.subset!r}", f"use one of {', '.join(SUBSETS)}")
    meta_row = sources.metadata_for(meta, vid) if meta is not None else None
    duration_raw, fps_raw = raw.duration, raw.fps
    if meta_row is not None:
        duration_raw, fps_raw = meta_row[0], meta_row[1] if meta_row[1] not in (None, "") else raw.fps
    duration = _number(duration_raw)
    if duration_raw is None:
        checks.say(vid, "duration", "no duration", "add it to the file or pass a --metadata CSV that lists the video")
    elif duration is None or duration <= 0:
        source = f"video-duration in {checks.metadata_path}" if meta_row is not None else "duration"
        checks.say(vid, source, f"{duration_raw!r} is not a positive number of seconds", "fix the value")
        duration = None
    fps = _number(fps_raw) if fps_raw not in (None, "") else None
    if fps_raw not in (None, "") and (fps is None or fps <= 0):
        checks.say(vid, "fps", f"{fps_raw!r} is not a positive number", "fix or remove it")
    if checks.num_errors > before:
        subset = None  # any video-level problem drops the whole video under skip_invalid
    return subset, duration, fps


def _check_segment(vid: str, raw: sources.RawSegment, duration: float | None, known: frozenset[str] | None,
                   checks: _Checks) -> Segment | None:
    """The segment, or None when it must be dropped; suspect segments come back too (kept if lenient)."""
    errors_before, problems_before = checks.num_errors, len(checks.problems)
    label = raw.label
    if not isinstance(label, str) or not label.strip():
        checks.say(vid, raw.label_field, f"empty or missing label {label!r}", "give the class name")
    elif known is not None and label not in known:
        checks.say(vid, raw.label_field, f"unknown label {label!r}",
                   f"use one of the {len(known)} known class names (check the spelling)")
    times_before = checks.num_errors
    pair = raw.segment if isinstance(raw.segment, (list, tuple)) and len(raw.segment) == 2 else None
    start, end = (_number(pair[0]), _number(pair[1])) if pair else (None, None)
    if start is None or end is None:
        checks.say(vid, raw.segment_field, f"{raw.segment!r} is not [start, end] in seconds", "write two numbers")
        return None
    if start < 0:
        checks.say(vid, raw.segment_field, f"negative start {start}",
                   "times are seconds from the start of the video; fix the start")
    if end < start:
        checks.say(vid, raw.segment_field, f"end {end} is before start {start}", "swap or fix the times")
    elif end == start:
        checks.say(vid, raw.segment_field, f"zero-length segment at {start} s",
                   f"give it a positive length {LENIENT_HINT}", suspect=True)
    if duration is not None and checks.num_errors == times_before and end != start:
        if start >= duration or end > duration + end_tolerance_sec(duration):
            checks.say(vid, raw.segment_field, f"[{start}, {end}] runs past the video's duration {duration} s "
                       f"(tolerance {end_tolerance_sec(duration):.3g} s)",
                       f"fix the segment or the duration {LENIENT_HINT}", suspect=True)
        elif end > duration and not checks.lenient:
            checks.clipped += 1
            end = duration
    if checks.num_errors > errors_before:
        return None
    if len(checks.problems) > problems_before and not checks.lenient:
        return None
    return Segment(start, end, label)


def _read_labels(labels: Iterable[str] | str | Path | None) -> frozenset[str] | None:
    if labels is None:
        return None
    if isinstance(labels, (str, Path)):
        path = Path(labels)
        if not path.is_file():
            raise AnnotationError([f"{path}: label file does not exist; check the path"])
        data = sources.read_json(path) if path.suffix == ".json" else path.read_text().splitlines()
        if isinstance(data, dict):
            data = list(data)
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise AnnotationError([f"{path}: a label file is a JSON list of class names or one name per line"])
        labels = [x.strip() for x in data if x.strip()]
    return frozenset(labels)


def _read_raw(path: Path, fmt: str, assign_subset: str | None, has_metadata: bool) -> sources.RawFile:
    if fmt not in FORMATS:
        raise AnnotationError([f"format {fmt!r} is unknown; use one of {', '.join(FORMATS)}"])
    if fmt == "kinetics_csv" or (fmt == "auto" and path.suffix.lower() == ".csv" and sources.is_kinetics_csv(path)):
        return sources.read_kinetics_csv(path)
    if fmt == "thumos_csv" or (fmt == "auto" and path.suffix.lower() == ".csv"):
        return sources.read_thumos_csv(path, assign_subset)
    data = sources.read_json(path)
    if fmt == "auto":
        if not isinstance(data, dict) or not ({"database", "results"} & set(data)):
            raise AnnotationError([f"{path}: neither 'database' (ActivityNet ground truth) nor 'results' "
                                   "(prediction format) at the top level; is this an annotation file?"])
        fmt = "activitynet" if "database" in data else "prediction"
    if fmt == "activitynet":
        return sources.read_activitynet(path, data)
    if not has_metadata:
        raise AnnotationError([f"{path}: ground truth in the prediction format has no durations; "
                               "pass --metadata CSV (metadata=...) with filename and video-duration columns"])
    return sources.read_prediction_as_gt(path, data, assign_subset or "validation")


def load_annotations(path: str | Path, *, metadata: str | Path | None = None, skip_invalid: bool = False,
                     fmt: Format = "auto", labels: Iterable[str] | str | Path | None = None,
                     lenient: bool = False, assign_subset: str | None = None) -> AnnotationSet:
    """Read and validate ground truth (rules in the module docstring).

    fmt "auto": `.csv` with youtube_id/time_start/time_end columns -> Kinetics-style trimmed
    clips (one video per row, `sources.read_kinetics_csv`); other `.csv` -> THUMOS TSP CSV; JSON with `database` -> ActivityNet; JSON with
    `results` -> prediction-format ground truth (needs `metadata` for durations). The
    formats without subsets put their videos in `assign_subset` (prediction format:
    default "validation"; THUMOS CSV: inferred from `video_test_*`/`video_validation_*`).
    `labels`: known class names (a list, or a JSON list / text file); without it the
    file's taxonomy is used when present, else every non-empty label is accepted.
    The vocabulary is the sorted known names, or the sorted labels found.
    """
    path = Path(path)
    raw = _read_raw(path, fmt, assign_subset, metadata is not None)
    meta, meta_problems = sources.read_metadata(Path(metadata)) if metadata is not None else (None, [])
    known = _read_labels(labels)
    known = known if known is not None else raw.taxonomy_labels
    checks = _Checks(path, lenient, Path(metadata) if metadata is not None else None)
    videos, dropped_segments, dropped_videos = [], 0, 0
    for rv in raw.videos:
        subset, duration, fps = _check_video_fields(rv, meta, checks)
        segments = [_check_segment(rv.video_id, rs, duration, known, checks) for rs in rv.segments]
        if subset is None or duration is None:
            dropped_videos += 1
            continue
        kept = tuple(s for s in segments if s is not None)
        dropped_segments += len(segments) - len(kept)
        videos.append(Video(rv.video_id, subset, duration, fps, kept))
    problems = meta_problems + checks.blocking
    if problems and not skip_invalid:
        raise AnnotationError(problems, header=f"{path}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"
                              " (fix them, or pass --skip-invalid to drop the bad entries)")
    warnings = _warnings(checks, problems, dropped_segments, dropped_videos)
    for line in warnings:
        if not line.startswith(" "):  # headlines only; the per-entry lines stay in .warnings
            log.warning("%s", line)
    names = known if known is not None else {s.label for v in videos for s in v.segments}
    return AnnotationSet(tuple(videos), LabelVocab.from_names(names), tuple(warnings))


def _warnings(checks: _Checks, problems: list[str], dropped_segments: int, dropped_videos: int) -> list[str]:
    out = []
    if problems:
        out.append(f"{checks.path}: dropped {dropped_segments} segment(s) and {dropped_videos} video(s) "
                   f"with {len(problems)} problem(s) (--skip-invalid):")
        out += [f"  dropped: {p}" for p in problems]
    if checks.lenient and checks.suspects:
        out.append(f"{checks.path}: kept {len(checks.suspects)} suspect segment(s) as written (lenient):")
        out += [f"  kept: {p.replace(' ' + LENIENT_HINT, '')}" for p in checks.suspects]
    if checks.clipped:
        out.append(f"{checks.path}: clipped the end of {checks.clipped} segment(s) to the video duration "
                   "(they ended past it by less than the tolerance)")
    return out


def save_activitynet(ann: AnnotationSet, path: str | Path) -> None:
    """Write ActivityNet v1.3 ground truth; `fps` is written only where known.

    The taxonomy lists the vocabulary as leaf nodes under one root, so the labels survive a
    round trip even for classes without segments.
    """
    taxonomy = [{"nodeId": 0, "nodeName": "Root", "parentId": None, "parentName": None}] if len(ann.labels) else []
    taxonomy += [{"nodeId": i + 1, "nodeName": name, "parentId": 0, "parentName": "Root"}
                 for i, name in enumerate(ann.labels)]
    database = {}
    for video in ann.videos:
        entry: dict[str, Any] = {"subset": video.subset, "duration": video.duration_sec}
        if video.fps is not None:
            entry["fps"] = video.fps
        entry["annotations"] = [{"segment": [s.start_sec, s.end_sec], "label": s.label} for s in video.segments]
        database[video.video_id] = entry
    Path(path).write_text(json.dumps({"version": "VERSION 1.3", "taxonomy": taxonomy, "database": database}))
