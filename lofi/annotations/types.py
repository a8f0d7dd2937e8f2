"""The typed in-memory form of temporal action annotations and of detections.

Ground truth is a tree of small frozen objects (`AnnotationSet` -> `Video` -> `Segment`),
cheap to pass to a Ray worker and easy to read. Detections are columnar numpy arrays
instead, because a prediction file routinely holds 500k rows and the evaluator works on
whole columns at once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from lofi.errors import LofiError

# "tuning": training videos held out for choosing levels, recipes and sweeps (lofi.splits), so that the
# validation videos are scored only at the end
SUBSETS = ("training", "validation", "testing", "tuning")

# Spellings seen in the wild (THUMOS14 JSON conversions write "Validation"/"Test") mapped to
# the canonical ActivityNet names; matched case-insensitively.
SUBSET_ALIASES = {
    "training": "training", "train": "training",
    "validation": "validation", "val": "validation", "valid": "validation",
    "testing": "testing", "test": "testing",
    "tuning": "tuning",
}


class AnnotationError(LofiError, ValueError):
    """An annotation or prediction file is invalid; `problems` lists every problem found.

    Each problem names the file, the video id and the field, and says how to fix it.
    """

    def __init__(self, problems: Sequence[str], header: str | None = None):
        self.problems = list(problems)
        count = len(self.problems)
        if count == 1 and header is None:
            super().__init__(self.problems[0])
            return
        head = header or f"{count} problems found"
        super().__init__(head + ":\n  - " + "\n  - ".join(self.problems))


@dataclass(frozen=True)
class Segment:
    """One labelled action instance, in seconds from the start of the video."""

    start_sec: float
    end_sec: float
    label: str

    @property
    def duration_sec(self) -> float:
        return self.end_sec - self.start_sec


@dataclass(frozen=True)
class Video:
    video_id: str
    subset: str
    duration_sec: float
    fps: float | None = None
    segments: tuple[Segment, ...] = ()

    def __post_init__(self) -> None:
        if self.subset not in SUBSETS:
            raise AnnotationError([f"video {self.video_id!r}: subset {self.subset!r} "
                                   f"is not one of {', '.join(SUBSETS)}"])
        if not isinstance(self.segments, tuple):
            object.__setattr__(self, "segments", tuple(self.segments))


@dataclass(frozen=True)
class LabelVocab:
    """Class names in sorted order; a name's class id is its position.

    Sorting makes ids stable: the same set of names gives the same ids whatever file order
    or subset they were read from, so a checkpoint's classifier rows stay meaningful.
    """

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        names = tuple(self.names)
        object.__setattr__(self, "names", names)
        if list(names) != sorted(set(names)):
            raise ValueError("LabelVocab names must be sorted and unique; build it with LabelVocab.from_names(...)")

    @classmethod
    def from_names(cls, names: Iterable[str]) -> LabelVocab:
        return cls(tuple(sorted(set(names))))

    @functools.cached_property
    def _ids(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def index(self, name: str) -> int:
        try:
            return self._ids[name]
        except KeyError:
            raise AnnotationError([f"label {name!r} is not in the vocabulary of {len(self.names)} classes"]) from None

    def __contains__(self, name: object) -> bool:
        return name in self._ids

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)


@dataclass(frozen=True)
class AnnotationSet:
    """All videos of a dataset (any subsets) with one label vocabulary.

    `warnings` records what loading changed or tolerated (clipped ends, dropped entries,
    kept suspect segments); it takes no part in equality.
    """

    videos: tuple[Video, ...]
    labels: LabelVocab
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "videos", tuple(self.videos))
        problems, seen = [], set()
        for video in self.videos:
            if video.video_id in seen:
                problems.append(f"video {video.video_id!r}: duplicate video id")
            seen.add(video.video_id)
            problems += [f"video {video.video_id!r}: label {s.label!r} is not in the label vocabulary"
                         for s in video.segments if s.label not in self.labels]
        if problems:
            raise AnnotationError(problems)

    @functools.cached_property
    def _by_id(self) -> dict[str, Video]:
        return {v.video_id: v for v in self.videos}

    def get(self, video_id: str) -> Video:
        try:
            return self._by_id[video_id]
        except KeyError:
            raise AnnotationError([f"video {video_id!r} is not in this annotation set"]) from None

    def __contains__(self, video_id: object) -> bool:
        return video_id in self._by_id

    def __len__(self) -> int:
        return len(self.videos)

    def __iter__(self) -> Iterator[Video]:
        return iter(self.videos)

    @property
    def num_segments(self) -> int:
        return sum(len(v.segments) for v in self.videos)

    @property
    def video_ids(self) -> tuple[str, ...]:
        return tuple(v.video_id for v in self.videos)

    def subset(self, name: str) -> AnnotationSet:
        """The videos of one subset, with the same vocabulary (class ids do not move)."""
        canonical = SUBSET_ALIASES.get(name.lower())
        if canonical is None:
            raise AnnotationError([f"subset {name!r} is unknown; use one of {', '.join(SUBSETS)}"])
        return dataclasses.replace(self, videos=tuple(v for v in self.videos if v.subset == canonical))

    def subset_counts(self) -> dict[str, int]:
        """Videos per subset; "tuning" only when a tuning split is there (it is derived, lofi.splits)."""
        counts = {name: sum(v.subset == name for v in self.videos) for name in SUBSETS}
        if not counts["tuning"]:
            del counts["tuning"]
        return counts


def _column(values: object, dtype: type, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=dtype)
    if array.ndim != 1:
        raise ValueError(f"Detections.{name} must be one-dimensional, got shape {array.shape}")
    return array


@dataclass(frozen=True, eq=False)
class Detections:
    """Scored, labelled segments as equal-length columns, in file order.

    Proposals are Detections whose labels are empty strings.
    """

    video_id: np.ndarray  # object array of str
    start_sec: np.ndarray  # float64
    end_sec: np.ndarray  # float64
    score: np.ndarray  # float64
    label: np.ndarray  # object array of str

    def __post_init__(self) -> None:
        for name, dtype in (("video_id", object), ("start_sec", np.float64), ("end_sec", np.float64),
                            ("score", np.float64), ("label", object)):
            object.__setattr__(self, name, _column(getattr(self, name), dtype, name))
        lengths = {name: len(getattr(self, name)) for name in ("video_id", "start_sec", "end_sec", "score", "label")}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"Detections columns must have equal lengths, got {lengths}")

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.array([], object), np.array([]), np.array([]), np.array([]), np.array([], object))

    @classmethod
    def concat(cls, parts: Sequence[Detections]) -> Detections:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, name) for p in parts])
                     for name in ("video_id", "start_sec", "end_sec", "score", "label")))

    def select(self, index: np.ndarray) -> Detections:
        """Rows picked by a boolean mask or an integer index array."""
        return Detections(self.video_id[index], self.start_sec[index], self.end_sec[index],
                          self.score[index], self.label[index])

    def __len__(self) -> int:
        return len(self.score)
