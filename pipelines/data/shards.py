"""Shard layout, schema, writer and readers of the dataset `lofi prepare` writes.

Layout of an output folder OUT (a local folder or an object-store URI: pipelines.storage):

    OUT/manifest.json                  written (atomically) at the end of every run (manifests.ShardManifest):
                                       resolved config, levels, labels, counts, shard files, errors, wall time
    OUT/prepare_config.json            the config fields that define the data; a rerun must match
    OUT/_parts/part-<hash>.json        commit record of one part (a group of videos): ids written,
                                       ids failed with their errors, rows/bytes/file per level
    OUT/<level>/part-<hash>.parquet    one Parquet file per part and level
    OUT/.tmp/                          writes in flight (local OUT); removed when a run starts

Local OUT: a part is written under OUT/.tmp, its files renamed into OUT/<level>/, and only
then its record renamed into OUT/_parts/. Object store (no rename; one upload is atomic): a
part is written to a scratch folder on the worker, each file uploaded to its final name
OUT/<level>/part-<hash>.parquet, and only then the record uploaded. Either way the record is
the commit point and the manifest is written last: readers take the files named by records
(the manifest lists the same), so a killed run never exposes half a part; files without a
record are deleted by the next run, which skips the committed videos. `<hash>` is a hash of
the part's video ids, so a retried task rewrites the same part (the same object names).

One row = one video x level x chunk of snippets. Columns (every file of a level has the
same schema; the schema metadata holds `lofi.schema_version` and the level as JSON):

    video_id, subset, fidelity            string
    duration_sec                          float64  annotated duration; the snippet grid covers it
    fps, num_frames                       float64, int64  of the source video (decord's count)
    num_snippets                          int32    T of the whole video
    chunk_index, num_chunks               int32    rows of one video are chunks 0..num_chunks-1
    snippet_start                         int32    index of the row's first snippet in the video
    num_valid_snippets                    int32    < snippets_per_row only in the zero-padded
                                                   last chunk of a fixed-stride level
    timestamps_sec                        tensor float64 (Tc, F): times of the frames sampled
                                                   (frame index / fps); NaN in padding
    frame_indices                         tensor int64 (Tc, F); -1 in padding
    frames                                fixed_size_binary: the row's uint8 (Tc, F, S, S, 3)
                                                   RGB channels-last array in C order; the field
                                                   metadata `lofi.shape` holds [Tc, F, S, S, 3]
      or frames_jpeg                      list<binary> of Tc * F JPEG images in (t, f) order
    segment_start_sec, segment_end_sec    list<float64>  the video's ground-truth segments
    segment_label, segment_label_id       list<string>, list<int32> (ids index manifest "labels")

Why bytes (schema version 2; version 1 stored Arrow's `arrow.fixed_shape_tensor`): Parquet
has no 8-bit type, so a uint8 tensor became 4-byte INT32 values, whose widening and compression
cost ~30% of decode time. `frames` is written PLAIN, uncompressed, without dictionary or
statistics: writing it is a copy. `read_level_table` (plain pyarrow) and `read_level_dataset`
(Ray Data, for `iter_torch_batches`) hand `frames` out as `arrow.fixed_shape_tensor` uint8
(Tc, F, S, S, 3) without copying (`with_frames_tensor`); `frames_array` gives (N, Tc, F, S, S,
3) uint8 from any storage (docs/architecture.md "Shards": with pyarrow alone). Tc =
`snippets_per_row` (manifest, per level): the whole video when its frames fit `max_row_mib`,
else the largest divisor of T that does (32 snippets for fixed-stride levels), so rows stay
well under Ray's 128 MiB blocks. Readers and a resuming `lofi prepare` refuse a folder of
another schema version, naming the fix (`lofi prepare --overwrite`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lofi.errors import LofiError
from lofi.fidelity import FidelityLevel
from pipelines.data.manifests import MANIFEST, ShardLevel, ShardManifest
from pipelines.data.tensors import SHAPE_KEY, binary_values, decode_jpeg_batch, fixed_tensor, with_frames_tensor
from pipelines.storage import Location, location, read_parquet

SCHEMA_VERSION = 2  # 2: frames stored as fixed_size_binary (1: uint8 tensor as Parquet INT32)
CONFIG_RECORD = "prepare_config.json"
PARTS_DIR = "_parts"
TMP_DIR = ".tmp"
# Fixed-shape numeric columns: what `iter_torch_batches` can stack into tensors.
NUMERIC_COLUMNS = ("frames", "timestamps_sec", "frame_indices", "duration_sec", "fps", "num_snippets",
                   "chunk_index", "snippet_start", "num_valid_snippets")

# What decode workers hand to the writer: one row per video x level x chunk (flat payloads,
# since levels differ in shape), or one row per failed video with `stage` and `error` set.
STAGING_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("subset", pa.string()), ("path", pa.string()),
    ("duration_sec", pa.float64()), ("fps", pa.float64()), ("num_frames", pa.int64()),
    ("segment_start_sec", pa.list_(pa.float64())), ("segment_end_sec", pa.list_(pa.float64())),
    ("segment_label", pa.list_(pa.string())), ("segment_label_id", pa.list_(pa.int32())),
    ("fidelity", pa.string()), ("num_snippets", pa.int32()), ("chunk_index", pa.int32()),
    ("num_chunks", pa.int32()), ("snippet_start", pa.int32()), ("num_valid_snippets", pa.int32()),
    ("timestamps_sec", pa.list_(pa.float64())), ("frame_indices", pa.list_(pa.int64())),
    ("frames", pa.large_binary()), ("frames_jpeg", pa.list_(pa.binary())),
    ("stage", pa.string()), ("error", pa.string()), ("decode_sec", pa.float64()),
])
_META_COLUMNS = ("video_id", "subset", "fidelity", "duration_sec", "fps", "num_frames", "num_snippets",
                 "chunk_index", "num_chunks", "snippet_start", "num_valid_snippets")
_SEGMENT_COLUMNS = ("segment_start_sec", "segment_end_sec", "segment_label", "segment_label_id")


def level_schema(level: dict[str, Any]) -> pa.Schema:
    """The Parquet schema of one level; `level` is a resolved level as a dict (see prepare)."""
    rows, frames = level["snippets_per_row"], level["frames_per_snippet"]
    fields = [STAGING_SCHEMA.field(name) for name in _META_COLUMNS]
    fields += [pa.field("timestamps_sec", pa.fixed_shape_tensor(pa.float64(), [rows, frames])),
               pa.field("frame_indices", pa.fixed_shape_tensor(pa.int64(), [rows, frames]))]
    if level["storage"] == "uint8":
        shape = frames_shape(level)
        shape_meta = {SHAPE_KEY: json.dumps(shape).encode()}
        fields.append(pa.field("frames", pa.binary(int(np.prod(shape))), metadata=shape_meta))
    else:
        fields.append(pa.field("frames_jpeg", pa.list_(pa.binary())))
    fields += [STAGING_SCHEMA.field(name) for name in _SEGMENT_COLUMNS]
    meta = {b"lofi.schema_version": str(SCHEMA_VERSION).encode(), b"lofi.level": json.dumps(level).encode()}
    return pa.schema(fields, metadata=meta)


def frames_shape(level: dict[str, Any]) -> list[int]:
    """[Tc, F, S, S, 3]: the shape of one row's frames at `level`."""
    return [level["snippets_per_row"], level["frames_per_snippet"], level["size_px"], level["size_px"], 3]


def staging_to_level(rows: pa.Table, level: dict[str, Any]) -> pa.Table:
    """Staging rows of one level -> a table in that level's shard schema."""
    schema = level_schema(level)
    tc, f, s = level["snippets_per_row"], level["frames_per_snippet"], level["size_px"]
    n = rows.num_rows
    columns = {name: rows.column(name) for name in _META_COLUMNS + _SEGMENT_COLUMNS}
    times = np.asarray(rows.column("timestamps_sec").combine_chunks().flatten(), dtype=np.float64)
    columns["timestamps_sec"] = fixed_tensor(times, [tc, f], pa.float64())
    indices = np.asarray(rows.column("frame_indices").combine_chunks().flatten(), dtype=np.int64)
    columns["frame_indices"] = fixed_tensor(indices, [tc, f], pa.int64())
    if level["storage"] == "uint8":
        pixels = binary_values(rows.column("frames").combine_chunks())
        width = tc * f * s * s * 3
        if pixels.size != n * width:
            raise ValueError(f"level {level['name']}: frame payload of {pixels.size} bytes does not match {n} rows")
        # the staging bytes become the column's data buffer as they are (no copy)
        columns["frames"] = pa.Array.from_buffers(pa.binary(width), n, [None, pa.py_buffer(pixels)])
    else:
        columns["frames_jpeg"] = rows.column("frames_jpeg")
    return pa.table([columns[name] for name in schema.names], schema=schema)


def parquet_options(schema: pa.Schema, compression: str) -> dict[str, Any]:
    """Writer options for a level's shards: `compression` for every column but `frames`, which is
    written PLAIN with no compression, dictionary or statistics (pixels gain little from them and
    each costs a pass over every byte). Version 2 data pages keep repetition levels uncompressed.
    """
    # per-column compression names Parquet leaf paths: a list or tensor column's values are at "<name>.list.element"
    lists = _SEGMENT_COLUMNS + ("timestamps_sec", "frame_indices", "frames_jpeg")
    leaves = {name: f"{name}.list.element" if name in lists else name for name in schema.names}
    codecs = {leaf: compression for name, leaf in leaves.items() if name != "frames"}
    options: dict[str, Any] = {"compression": {**codecs, "frames": "none"} if "frames" in leaves else codecs,
                               "use_dictionary": False, "data_page_version": "2.0",
                               "write_statistics": list(_META_COLUMNS)}
    if "frames" in leaves:
        options["column_encoding"] = {"frames": "PLAIN"}
    return options


def part_name(video_ids: Iterable[str]) -> str:
    digest = hashlib.sha1("\n".join(sorted(video_ids)).encode()).hexdigest()[:16]
    return f"part-{digest}"


def shards_location(out_dir: str | Path | Location, key: str = "data.shards") -> Location:
    """A shard folder as a Location (a path, a URI, or one already)."""
    return out_dir if isinstance(out_dir, Location) else location(str(out_dir), key)


def write_json_atomic(path: str | Path | Location, data: Any) -> None:
    """The whole file or nothing: renamed into place locally, one upload to an object store."""
    shards_location(path).write_json(data)


class PartWriter:
    """Writes the staging rows of one part to per-level Parquet files and commits them."""

    def __init__(self, out_dir: str | Path | Location, levels: list[dict[str, Any]], compression: str) -> None:
        self.out = shards_location(out_dir, "output")
        self.levels = {level["name"]: level for level in levels}
        self.compression = compression
        # local OUT: beside the final files (so commit is a rename); an object store: the worker's disk
        scratch = self.out.local_path() / TMP_DIR if self.out.is_local else Path(tempfile.gettempdir()) / "lofi-parts"
        self.tmp = scratch / uuid.uuid4().hex
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.rows = {name: 0 for name in self.levels}
        self.frames = {name: 0 for name in self.levels}
        self.ok_ids: set[str] = set()
        self.chunks: dict[tuple[str, str], tuple[int, set[int]]] = {}  # (video, level) -> (num_chunks, seen)
        self.errors: list[dict[str, str]] = []
        self.decode_sec = 0.0

    def add(self, staging: pa.Table) -> None:
        """Append a block of staging rows; rows of one video must all come in one part."""
        pc = pa.compute
        ok = pc.is_null(staging.column("error"))
        meta = staging.select(["video_id", "path", "stage", "error", "fidelity"])  # no frames: filters stay cheap
        self.errors += meta.filter(pc.invert(ok)).drop_columns(["fidelity"]).to_pylist()
        self.decode_sec += float(pc.sum(staging.column("decode_sec")).as_py() or 0.0)
        for name in set(meta.filter(ok).column("fidelity").to_pylist()):
            mask = pc.and_(ok, pc.fill_null(pc.equal(staging.column("fidelity"), name), False))
            # one level and no failures (the common block): its frames go to the writer uncopied
            rows = staging if pc.all(mask).as_py() else staging.filter(mask)
            table = staging_to_level(rows, self.levels[name])
            if name not in self.writers:
                self.tmp.mkdir(parents=True, exist_ok=True)
                self.writers[name] = pq.ParquetWriter(self.tmp / f"{name}.parquet", table.schema,
                                                      **parquet_options(table.schema, self.compression))
            self.writers[name].write_table(table)
            self.rows[name] += table.num_rows
            valid = pa.compute.sum(table.column("num_valid_snippets")).as_py()
            self.frames[name] += valid * self.levels[name]["frames_per_snippet"]
            ids, chunks, counts = (rows.column(c).to_pylist() for c in ("video_id", "chunk_index", "num_chunks"))
            for vid, chunk, count in zip(ids, chunks, counts):
                self.ok_ids.add(vid)
                self.chunks.setdefault((vid, name), (count, set()))[1].add(chunk)

    def commit(self) -> dict[str, Any]:
        """Move the files into place, then write the part record that makes them count."""
        for writer in self.writers.values():
            writer.close()
        failed_ids = sorted({e["video_id"] for e in self.errors} - self.ok_ids)
        for vid in self.ok_ids:  # a video counts as written only with every chunk of every level
            for level in self.levels:
                count, got = self.chunks.get((vid, level), (1, set()))
                if got != set(range(count)):
                    raise RuntimeError(f"part holds chunks {sorted(got)} of {count} of video {vid} at level {level}: "
                                       "its rows were split across write tasks (decode and write not fused)")
        name = part_name(sorted(self.ok_ids) + failed_ids)
        record_path = self.out / PARTS_DIR / f"{name}.json"
        record: dict[str, Any] = {"part": name, "schema_version": SCHEMA_VERSION, "video_ids": sorted(self.ok_ids),
                                  "failed_ids": failed_ids, "errors": self.errors, "decode_sec": self.decode_sec,
                                  "levels": {}}
        try:
            if record_path.exists():  # a retried task: the first attempt already committed this part
                return record_path.read_json()
            for level in self.writers:
                rel, scratch = f"{level}/{name}.parquet", self.tmp / f"{level}.parquet"
                record["levels"][level] = {"file": rel, "rows": self.rows[level], "frames": self.frames[level],
                                           "bytes": scratch.stat().st_size}
                if self.out.is_local:
                    (self.out.local_path() / level).mkdir(exist_ok=True)
                    os.replace(scratch, self.out.local_path() / rel)
                else:
                    (self.out / rel).upload(scratch)
            record_path.write_json(record)  # the commit point: written last
            return record
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def committed_parts(out_dir: str | Path | Location) -> list[dict[str, Any]]:
    """Records of the parts that finished writing, sorted by part name; refuses older layouts.

    A resumed run must not add parts of this layout to a level of another (one level, one
    schema); records before version 2 carry no version.
    """
    parts = [part.read_json() for part in (shards_location(out_dir) / PARTS_DIR).files("part-*.json")]
    for part in parts:
        _check_version(part.get("schema_version", 1), shards_location(out_dir) / PARTS_DIR / f"{part['part']}.json")
    return parts


def _check_version(version: Any, path: Location) -> None:
    if version != SCHEMA_VERSION:
        raise LofiError(f"{path}: shards of schema version {version}; this lofi reads and writes version "
                        f"{SCHEMA_VERSION} (frames as fixed-size binary since version 2): rerun `lofi prepare "
                        "--overwrite` with the same config to rewrite the folder")


def remove_uncommitted(out_dir: str | Path | Location, level_names: Iterable[str]) -> int:
    """Delete writes a killed run left behind; return how many shard files went.

    A record whose files are gone (a task that outlived its killed driver and committed
    while the next run was cleaning up) is dropped too, so its videos are redone.
    """
    out = shards_location(out_dir)
    (out / TMP_DIR).delete()
    for part in committed_parts(out):
        if not all((out / info["file"]).is_file() for info in part["levels"].values()):
            (out / PARTS_DIR / f"{part['part']}.json").delete()
    kept = {info["file"] for part in committed_parts(out) for info in part["levels"].values()}
    removed = 0
    for level in level_names:
        for path in (out / level).files("part-*.parquet"):
            if f"{level}/{path.name}" not in kept:
                path.delete()
                removed += 1
    return removed


def read_manifest(out_dir: str | Path | Location) -> ShardManifest:
    path = shards_location(out_dir) / MANIFEST
    if not path.is_file():
        raise LofiError(f"{path} does not exist: run `lofi prepare` with output {out_dir} to completion first")
    manifest = ShardManifest.from_dict(path.read_json())
    _check_version(manifest.schema_version, path)
    return manifest


def level_files(out_dir: str | Path | Location, level: str) -> tuple[ShardLevel, list[str]]:
    """The manifest entry of `level` and the absolute paths (or URIs) of its shard files."""
    manifest = read_manifest(out_dir)
    entry = manifest.level(level)
    if entry is None:
        raise LofiError(f"{shards_location(out_dir) / MANIFEST}: no level {level!r}; levels: "
                        f"{', '.join(e.name for e in manifest.levels)}")
    return entry, [str(shards_location(out_dir) / rel) for rel in entry.shards]


def grid_level(entry: ShardLevel) -> FidelityLevel:
    """The FidelityLevel a grid level's manifest entry holds (`spacing_snippets` 0: frames fill the snippet)."""
    return FidelityLevel(entry.name, entry.num_snippets, entry.frames_per_snippet, entry.size_px,
                         entry.spacing_snippets)


def read_level_table(out_dir: str | Path, level: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of one level with plain pyarrow (no Ray), sorted by video id and chunk."""
    entry, files = level_files(out_dir, level)
    if not files:
        empty = with_frames_tensor(level_schema(entry.resolved()).empty_table())
        return empty if columns is None else empty.select(columns)
    need = None if columns is None else sorted(set(columns) | {"video_id", "chunk_index"})
    table = pa.concat_tables([read_parquet(f, columns=need) for f in files])
    table = with_frames_tensor(table.sort_by([("video_id", "ascending"), ("chunk_index", "ascending")]))
    return table if columns is None else table.select(columns)


def read_level_dataset(out_dir: str | Path, level: str, columns: tuple[str, ...] | None = NUMERIC_COLUMNS):
    """A Ray Dataset of one level for training: JPEG decoded to `frames`, `columns` selected.

    The default columns are the fixed-shape numeric ones, which `iter_torch_batches`
    stacks into tensors; pass `columns=None` to keep all (segments are ragged lists).
    """
    import ray.data

    entry, files = level_files(out_dir, level)
    if not files:
        raise LofiError(f"{out_dir}: level {level!r} has no rows (every video failed?); see errors in the manifest")
    if entry.storage == "jpeg":
        ds = ray.data.read_parquet(files)
        ds = ds.map_batches(decode_jpeg_batch, fn_kwargs={"level": entry.resolved()}, batch_format="pyarrow")
        return ds if columns is None else ds.select_columns(list(columns))
    ds = ray.data.read_parquet(files, columns=None if columns is None else list(columns))
    if columns is None or "frames" in columns:
        # whole blocks (batch_size=None): a batch of rows would concatenate, i.e. copy, the frames
        shape = frames_shape(entry.resolved())
        ds = ds.map_batches(with_frames_tensor, fn_kwargs={"shape": shape}, batch_format="pyarrow", batch_size=None)
    return ds


def build_manifest(out_dir: str | Path, config: dict[str, Any], levels: list[dict[str, Any]], labels: Iterable[str],
                   list_errors: list[dict[str, str]], total: int, wall_time_sec: float,
                   processed: int) -> ShardManifest:
    """The manifest of OUT from its committed parts; `levels` resolved, `list_errors` found by the driver."""
    return ShardManifest.from_parts(committed_parts(out_dir), SCHEMA_VERSION, config, levels, labels, list_errors,
                                    total=total, wall_time_sec=wall_time_sec, processed=processed)
