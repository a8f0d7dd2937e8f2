"""The two manifests as typed records: `ShardManifest`, the OUT/manifest.json that `lofi prepare`
writes (layout and commit protocol: pipelines/data/shards.py), and `FeaturesManifest`, the
features_manifest.json that `lofi extract` writes (pipelines/data/features.py).

`from_dict` reads a manifest's JSON object; `to_dict` gives back the object the writers write,
key for key and in their order: `lofi prepare` and `lofi extract` write the bytes they wrote
before these types (a `FeatureWriter` told a few source fields writes them in this order, and a
`level_config` told in part with the other keys null).
Optional keys are written only when set: a level's `spacing_snippets`, the shard manifest's
`tuning`, and the features manifest's source fields a writer was not told (`FeatureWriter` in
tests and small tools writes a few of them; `lofi extract` all). Readers stay as tolerant as they
have always been: keys of other lofi versions are ignored and keys that older or hand-written
files lack take their defaults; only a level without its grid is refused. The schema version is
checked by the readers (`shards.read_manifest`), not here. No code outside this module looks a
manifest key up by its string.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from lofi.errors import LofiError

MANIFEST = "manifest.json"  # a shard folder's, beside its levels' folders
_OPTIONAL = "lofi.optional"  # field metadata: the key is written only when the value is set (not its default)


def _optional(default: Any = None) -> Any:
    return field(default=default, metadata={_OPTIONAL: True})


def _known(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The entries of `data` that are fields of `cls`; every field without a default must be there."""
    if not isinstance(data, Mapping):
        raise LofiError(f"{what}: expected a JSON object, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise LofiError(f"{what} has no {', '.join(missing)}: the file was not written by `lofi prepare`; "
                        "rerun `lofi prepare --overwrite` to rewrite the folder")
    names = {f.name for f in fields}
    return {key: value for key, value in data.items() if key in names}


def _plain(value: Any) -> Any:
    """A value as JSON data: records as objects, tuples as lists; containers copied."""
    if dataclasses.is_dataclass(value):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _record_dict(record: Any) -> dict[str, Any]:
    """`record` as a JSON object in field order, optional fields left out while unset."""
    out = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if not (f.metadata.get(_OPTIONAL) and value == f.default):
            out[f.name] = _plain(value)
    return out


# The shard manifest (`lofi prepare`) ---------------------------------------------------------

_WRITTEN = ("videos", "rows", "frames", "bytes", "bytes_per_video", "shards")  # a level's totals, not its config


@dataclass(frozen=True, kw_only=True)
class ShardLevel:
    """One entry of the shard manifest's `levels`: the level as resolved (PrepareConfig.resolved_levels),
    then what was written of it."""

    name: str
    num_snippets: int | None  # T of a grid level; None: a fixed-stride level (every video its own T)
    snippet_stride_sec: float | None = None
    frames_per_snippet: int
    size_px: int
    storage: str = "uint8"  # uint8 | jpeg
    jpeg_quality: int = 90
    spacing_snippets: int = _optional(0)  # frames spaced as at this T; 0 (absent from the file): they fill it
    snippets_per_row: int | None = None  # Tc: snippets per Parquet row
    videos: int = 0  # videos written (every level has the same)
    rows: int = 0
    frames: int = 0
    bytes: int = 0
    bytes_per_video: float = 0.0
    shards: tuple[str, ...] = ()  # the level's Parquet files, relative to OUT

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardLevel:
        known = _known(cls, data, "a level of the shard manifest")
        return cls(**{**known, "shards": tuple(known.get("shards", ()))})

    def to_dict(self) -> dict[str, Any]:
        return _record_dict(self)

    def resolved(self) -> dict[str, Any]:
        """The level as `lofi prepare` resolved it, without the totals: what its Parquet files record."""
        return {key: value for key, value in self.to_dict().items() if key not in _WRITTEN}


@dataclass(frozen=True, kw_only=True)
class ShardCounts:
    videos_total: int = 0
    videos_ok: int = 0
    videos_failed: int = 0
    videos_processed_this_run: int = 0
    frames: int = 0
    bytes: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardCounts:
        return cls(**_known(cls, data, "the shard manifest's counts"))

    def to_dict(self) -> dict[str, Any]:
        return _record_dict(self)


@dataclass(frozen=True, kw_only=True)
class ShardTuning:
    """The tuning split (lofi.splits.TuningSplit's fields, then the subset and the videos moved to it)."""

    fraction: float = 0.0
    seed: int = 0
    source: str = "training"
    subset: str = "tuning"
    video_ids: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardTuning:
        known = _known(cls, data, "the shard manifest's tuning")
        return cls(**{**known, "video_ids": tuple(known.get("video_ids", ()))})

    def to_dict(self) -> dict[str, Any]:
        return _record_dict(self)


@dataclass(frozen=True, kw_only=True)
class ShardManifest:
    """OUT/manifest.json of a shard folder, written last by `lofi prepare` (shards.build_manifest)."""

    schema_version: int | None = None  # shards.SCHEMA_VERSION; shards.read_manifest refuses other versions
    config: dict[str, Any] = field(default_factory=dict)  # the prepare config as written, levels resolved
    labels: tuple[str, ...] = ()  # class names; segment_label_id indexes them
    levels: tuple[ShardLevel, ...] = ()
    counts: ShardCounts = field(default_factory=ShardCounts)
    wall_time_sec: float = 0.0
    videos_per_sec: float = 0.0
    decode_sec: float = 0.0
    errors: tuple[dict[str, Any], ...] = ()  # per failed video: video_id, path, stage, error
    tuning: ShardTuning | None = _optional()

    @classmethod
    def from_parts(cls, parts: list[dict[str, Any]], schema_version: int, config: dict[str, Any],
                   levels: list[dict[str, Any]], labels: Iterable[str], list_errors: list[dict[str, str]], total: int,
                   wall_time_sec: float, processed: int) -> ShardManifest:
        """The manifest of a folder from its committed part records (shards.committed_parts); `levels`
        resolved, `list_errors` found by the driver before decoding."""
        ok = sum(len(p["video_ids"]) for p in parts)
        errors = list_errors + sorted((e for p in parts for e in p["errors"]), key=lambda e: e["video_id"])
        entries = []
        for level in levels:
            written = [p["levels"][level["name"]] for p in parts if level["name"] in p["levels"]]
            size = sum(w["bytes"] for w in written)
            entries.append(ShardLevel(**level, videos=ok, rows=sum(w["rows"] for w in written),
                                      frames=sum(w["frames"] for w in written), bytes=size,
                                      bytes_per_video=size / ok if ok else 0.0,
                                      shards=tuple(sorted(w["file"] for w in written))))
        counts = ShardCounts(videos_total=total, videos_ok=ok, videos_failed=len(errors),
                             videos_processed_this_run=processed, frames=sum(e.frames for e in entries),
                             bytes=sum(e.bytes for e in entries))
        return cls(schema_version=schema_version, config=config, labels=tuple(labels), levels=tuple(entries),
                   counts=counts, wall_time_sec=wall_time_sec,
                   videos_per_sec=processed / wall_time_sec if wall_time_sec else 0.0,
                   decode_sec=sum(p["decode_sec"] for p in parts), errors=tuple(errors))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardManifest:
        known = _known(cls, data, "the shard manifest")
        known["labels"] = tuple(known.get("labels", ()))
        known["levels"] = tuple(ShardLevel.from_dict(entry) for entry in known.get("levels", ()))
        known["counts"] = ShardCounts.from_dict(known.get("counts", {}))
        known["errors"] = tuple(known.get("errors", ()))
        if known.get("tuning") is not None:
            known["tuning"] = ShardTuning.from_dict(known["tuning"])
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return _record_dict(self)

    def level(self, name: str) -> ShardLevel | None:
        return next((entry for entry in self.levels if entry.name == name), None)

    def annotations(self) -> str:
        """The annotation file the shards were prepared from (the config's input.annotations)."""
        return self.config["input"]["annotations"]

    def summary_lines(self, out_dir: str) -> list[str]:
        """The end-of-run summary: videos ok/failed, frames, bytes, seconds, videos/s, per level, errors."""
        c = self.counts
        lines = [f"lofi prepare: {c.videos_ok} videos ok, {c.videos_failed} failed (of {c.videos_total}); "
                 f"{c.videos_processed_this_run} processed in {self.wall_time_sec:.1f} s "
                 f"({self.videos_per_sec:.2f} videos/s)",
                 f"  wrote {out_dir}: {c.frames} frames, {c.bytes / 2**20:.1f} MiB"]
        for lv in self.levels:
            grid = f"T={lv.num_snippets}" if lv.num_snippets else f"stride {lv.snippet_stride_sec:g} s"
            if lv.spacing_snippets:
                grid += f" (frames spaced as at T={lv.spacing_snippets})"
            lines.append(f"  level {lv.name}: {grid} F={lv.frames_per_snippet} S={lv.size_px} {lv.storage}: "
                         f"{lv.rows} rows, {lv.bytes_per_video / 2**10:.1f} KiB/video, {len(lv.shards)} shard files")
        for e in self.errors[:20]:
            lines.append(f"  error {e['video_id']} [{e['stage']}] {e['path']}: {e['error']}")
        if len(self.errors) > 20:
            lines.append(f"  ... and {len(self.errors) - 20} more errors in {out_dir}/{MANIFEST}")
        return lines


# The features manifest (`lofi extract`) ------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class FeaturesLevel:
    """The features manifest's `level_config`: the grid of the shard level the features come from."""

    num_snippets: int | None = None  # None: a fixed-stride level
    snippet_stride_sec: float | None = None
    frames_per_snippet: int | None = None
    size_px: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeaturesLevel:
        return cls(**_known(cls, data, "the features manifest's level_config"))

    @classmethod
    def of(cls, level: ShardLevel) -> FeaturesLevel:
        return cls(num_snippets=level.num_snippets, snippet_stride_sec=level.snippet_stride_sec,
                   frames_per_snippet=level.frames_per_snippet, size_px=level.size_px)

    def to_dict(self) -> dict[str, Any]:
        return _record_dict(self)


@dataclass(frozen=True, kw_only=True)
class FeaturesCounts:
    videos: int = 0
    per_subset: dict[str, int] = field(default_factory=dict)  # subset -> videos, sorted by subset

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeaturesCounts:
        return cls(**_known(cls, data, "the features manifest's counts"))

    def to_dict(self) -> dict[str, Any]:
        return _record_dict(self)


@dataclass(frozen=True, kw_only=True)
class FeaturesManifest:
    """features_manifest.json: first what the writer was told of the features' source (optional: a
    `FeatureWriter` may be told only some of it), then what the folder holds (features.features_manifest)."""

    encoder: dict[str, Any] | None = _optional()  # the encoder config, checkpoint, checkpoint_sha1, origin
    shards: str | None = _optional()  # the shard folder (URI) extracted from
    level: str | None = _optional()  # its level's name
    level_config: FeaturesLevel | None = _optional()
    fixed_grid: bool | None = _optional()  # every video the same T (a grid level); false: fixed stride
    labels: tuple[str, ...] | None = _optional()  # class names; segment_label_id indexes them
    annotations: str | None = _optional()  # the annotation file of the shards
    seconds: float | None = _optional()  # the extraction's wall time
    schema_version: int | None = None
    feature_dim: int = 0  # D
    num_snippets: int = 0  # T of every row (the longest video's at a fixed stride: rows zero-padded)
    files: tuple[str, ...] = ()  # the Parquet parts, relative to the folder: the only ones that belong to it
    npy: bool = False  # npy/<video_id>.npy written beside them
    counts: FeaturesCounts = field(default_factory=FeaturesCounts)
    npy_dir: str | None = _optional()  # object stores: the npy folder of the committed attempt

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeaturesManifest:
        known = _known(cls, data, "the features manifest")
        if known.get("level_config") is not None:
            known["level_config"] = FeaturesLevel.from_dict(known["level_config"])
        if known.get("labels") is not None:
            known["labels"] = tuple(known["labels"])
        known["files"] = tuple(known.get("files", ()))
        known["counts"] = FeaturesCounts.from_dict(known.get("counts", {}))
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return _record_dict(self)

    def check_subset(self, subset: str, where: Any) -> None:
        """Refuse a subset the folder holds no video of (`where`: the manifest's path, for the message)."""
        known = sorted(self.counts.per_subset)
        if subset not in known:
            raise LofiError(f"{where}: no video of subset {subset!r}; subsets there: {', '.join(known) or 'none'}; "
                            "check data.train_subset / data.val_subset")

    def encoder_origin(self) -> dict[str, Any] | None:
        """Where the encoder's weights came from (pipelines.stages.provenance); None in older folders."""
        return (self.encoder or {}).get("origin")
