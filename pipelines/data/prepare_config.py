"""`lofi prepare`'s config: the levels, the input videos and annotations, the output; what defines
the data's bytes (`PrepareConfig.data_key`) and what a rerun may change. Shared by the driver
(pipelines.data.prepare) and its Ray tasks (pipelines.data.prepare_tasks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from lofi.config import from_dict, to_dict
from lofi.fidelity import PRESETS
from lofi.splits import TuningSplit
from pipelines.cluster import RayConfig
from pipelines.storage import Location, location, uri_problem


COMPRESSIONS = ("none", "snappy", "lz4", "zstd", "gzip", "brotli")
# Config fields that change no byte of the data (or name the output itself): a rerun may change them.
_RUNTIME_FIELDS = ("output", "num_workers", "videos_per_part", "decode_threads", "max_error_fraction", "overwrite",
                   "retry_failed", "ray")


@dataclass(frozen=True)
class LevelSpec:
    """One fidelity level: a preset name and/or explicit fields (explicit fields win)."""

    name: str = ""  # folder and `fidelity` column; defaults to the preset name
    preset: str = ""  # one of lofi.fidelity.PRESETS: full, s_lofi, t_lofi, st_lofi
    num_snippets: int | None = None  # T snippets covering the video (the paper's grid)
    snippet_stride_sec: float | None = None  # or: snippets of this many seconds, T = ceil(duration / stride)
    frames_per_snippet: int | None = None  # F (default 8)
    size_px: int | None = None  # S: frames are S x S (default 224)
    # grid levels: a snippet's F frames are spaced as on a grid of this many snippets, centred on the snippet
    # (e.g. the full level's T at T-LoFi: fewer snippets, not sparser frames; lofi.sampling); 0: they fill it
    spacing_snippets: int = 0
    storage: Literal["uint8", "jpeg"] = "uint8"
    jpeg_quality: int = 90
    snippets_per_row: int | None = None  # Tc; default: whole video if it fits max_row_mib

    def __post_init__(self) -> None:
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"preset {self.preset!r} is not one of {sorted(PRESETS)}")
        level = self.filled()
        name = level["name"]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"name {name!r}: give each level a name of letters, digits, '_', '.', '-' (or a preset)")
        if (level["num_snippets"] is None) == (self.snippet_stride_sec is None):
            raise ValueError(f"level {name}: set exactly one of num_snippets and snippet_stride_sec")
        for key in ("num_snippets", "frames_per_snippet", "size_px", "snippets_per_row", "snippet_stride_sec"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"level {name}: {key} must be > 0, got {getattr(self, key)}")
        if self.spacing_snippets and (level["num_snippets"] is None or self.spacing_snippets < level["num_snippets"]):
            raise ValueError(f"level {name}: spacing_snippets {self.spacing_snippets} needs a grid level (num_snippets) "
                             f"with num_snippets <= spacing_snippets; 0 lets the frames fill each snippet")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"level {name}: jpeg_quality must be in 1..100, got {self.jpeg_quality}")

    def filled(self) -> dict[str, Any]:
        """The level with the preset's and the default values filled in (snippets_per_row aside)."""
        base = PRESETS.get(self.preset)
        snippets = self.num_snippets
        if snippets is None and self.snippet_stride_sec is None and base is not None:
            snippets = base.num_snippets
        frames, size = (base.frames_per_snippet, base.size_px) if base else (8, 224)
        filled = {"name": self.name or self.preset, "num_snippets": snippets,
                  "snippet_stride_sec": self.snippet_stride_sec,
                  "frames_per_snippet": frames if self.frames_per_snippet is None else self.frames_per_snippet,
                  "size_px": size if self.size_px is None else self.size_px,
                  "storage": self.storage, "jpeg_quality": self.jpeg_quality}
        if self.spacing_snippets and self.spacing_snippets != snippets:  # absent otherwise: older data keys still match
            filled["spacing_snippets"] = self.spacing_snippets
        return filled

    def resolved(self, max_row_bytes: int) -> dict[str, Any]:
        """Every field filled in, as sent to workers and written to the manifest."""
        level = self.filled()
        level["snippets_per_row"] = self.snippets_per_row or _auto_snippets_per_row(level, max_row_bytes)
        return level


def _auto_snippets_per_row(level: dict[str, Any], max_row_bytes: int) -> int:
    """Largest row that fits: all T (or a divisor of T, so no row is padded); 32 for strides."""
    snippet_bytes = level["frames_per_snippet"] * level["size_px"] ** 2 * 3
    fit = max(1, max_row_bytes // snippet_bytes)
    total = level["num_snippets"]
    if total is None:
        return int(min(fit, 32))
    return max(d for d in range(1, total + 1) if total % d == 0 and d <= fit)


@dataclass(frozen=True)
class InputConfig:
    annotations: str  # annotation file (ActivityNet JSON, THUMOS CSV, ...; see lofi.annotations)
    videos: str  # folder or pyarrow filesystem URI holding <video_id>.<ext> or v_<video_id>.<ext>
    metadata: str = ""  # metadata CSV for annotation formats without durations
    subsets: tuple[str, ...] = ()  # only these subsets; empty: all
    limit: int = 0  # only the first N videos (sorted by id); 0: all
    # invalid annotation entries: "raise" (every problem at once), "skip" (drop them, warn), or "keep"
    # (suspect segments kept as written, as the official evaluator does; the real ActivityNet and
    # THUMOS14 files hold a few zero-length or past-the-end segments)
    annotation_errors: Literal["raise", "skip", "keep"] = "raise"
    # the tuning split (lofi.splits): this share of the training videos is written as subset "tuning" (drawn
    # per tuning_seed; the ids go into the manifest), held out for choosing levels, recipes and sweeps
    tuning_fraction: float = 0.0
    tuning_seed: int = 0

    def __post_init__(self) -> None:
        self.tuning_split()  # checks the fraction

    def tuning_split(self) -> TuningSplit:
        return TuningSplit(self.tuning_fraction, self.tuning_seed)

    def annotation_options(self) -> dict[str, Any]:
        """load_annotations keywords for `annotation_errors`."""
        return {"metadata": self.metadata or None, "skip_invalid": self.annotation_errors == "skip",
                "lenient": self.annotation_errors == "keep"}


@dataclass(frozen=True)
class PrepareConfig:
    input: InputConfig
    output: str  # folder (shared by all nodes) or object-store URI (s3://bucket/prefix) to write the dataset into
    # preset names or LevelSpec sections (typed Any so that a bad section reports its own error,
    # which lofi.config's union coercion would replace by "matches none of")
    levels: tuple[Any, ...] = ("full",)
    resize: Literal["short_side_crop", "squash"] = "short_side_crop"
    max_row_mib: float = 64.0  # rows above this are split into chunks of snippets
    compression: str = "zstd"  # Parquet codec of every column but uint8 `frames` (stored uncompressed: raw bytes)
    duration_tolerance_sec: float = 1.0  # a video may be this much shorter than its annotation
    num_workers: int = 2  # decode+write tasks at once (TaskPoolStrategy size)
    videos_per_part: int = 8  # videos per commit: the granularity of resuming
    decode_threads: int = 1  # decord threads per worker (0: ffmpeg's choice)
    max_error_fraction: float = 0.05  # exit non-zero when more videos than this fail
    overwrite: bool = False  # delete what a previous run wrote and start over
    retry_failed: bool = False  # decode only the videos listed in the previous manifest's errors
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        specs = []  # normalised to LevelSpec: preset names and plain sections alike
        for i, item in enumerate(self.levels):
            if isinstance(item, str):
                if item not in PRESETS:
                    raise ValueError(f"levels[{i}]: {item!r} is not a preset ({', '.join(PRESETS)}); "
                                     "write a level section instead")
                item = LevelSpec(preset=item)
            elif isinstance(item, dict):
                item = from_dict(LevelSpec, item, prefix=f"levels[{i}].")
            elif not isinstance(item, LevelSpec):
                raise ValueError(f"levels[{i}]: {item!r} is neither a preset name nor a level section")
            specs.append(item)
        object.__setattr__(self, "levels", tuple(specs))
        names = [spec.name or spec.preset for spec in specs]
        if not specs or len(set(names)) != len(names):
            raise ValueError(f"levels: need at least one level and unique names, got {names}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression {self.compression!r} is not one of {list(COMPRESSIONS)}")
        for key in ("num_workers", "videos_per_part"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.max_error_fraction <= 1 or self.max_row_mib <= 0:
            raise ValueError("max_error_fraction must be in [0, 1] and max_row_mib > 0")
        if self.overwrite and self.retry_failed:
            raise ValueError("overwrite and retry_failed: --overwrite deletes the failures that --retry-failed would "
                             "retry; pass one of them")
        problem = uri_problem(self.output)
        if problem:
            raise ValueError(f"output: {problem}")

    def output_location(self) -> Location:
        """The output folder: a local path or an object-store URI (never Ray job's temp folder)."""
        return location(self.output, "output", output=True)

    def resolved_levels(self) -> list[dict[str, Any]]:
        max_row_bytes = int(self.max_row_mib * 2**20)
        return [spec.resolved(max_row_bytes) for spec in self.levels]

    def data_key(self) -> dict[str, Any]:
        """The fields that define the written data, levels resolved: what a rerun must match."""
        data = {k: v for k, v in to_dict(self).items() if k not in _RUNTIME_FIELDS}
        data["levels"] = self.resolved_levels()
        if not self.input.tuning_fraction:  # absent without a split: older data keys still match
            for key in ("tuning_fraction", "tuning_seed"):
                data["input"].pop(key)
        return data


@dataclass(frozen=True)
class PrepareResult:
    out_dir: str
    manifest_path: str
    videos_total: int
    videos_ok: int
    videos_failed: int
    videos_skipped: int  # committed by an earlier run, not redone
    errors: tuple[dict[str, str], ...]
    wall_time_sec: float
    error_fraction: float
    max_error_fraction: float

    @property
    def too_many_errors(self) -> bool:
        return self.error_fraction > self.max_error_fraction
