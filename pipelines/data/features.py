"""Feature shards: what `lofi extract` writes and `lofi train-head` / `lofi detect` read.

Layout of a features folder (`<run>/features/`, see pipelines/config.py):

    features_manifest.json        written last (pipelines/data/manifests.py: FeaturesManifest): encoder,
                                  source shards and level, D, T, fixed_grid, counts, labels, files
    part-<name>.parquet           one row per video, any order (readers sort); only the files
                                  the manifest lists belong to the folder
    npy/<video_id>.npy            optional (extract.write_npy): float32 (T, D) per video, the
                                  layout feature-based TAL toolkits (BMN, G-TAD, ActionFormer) read

Writing is a commit protocol (`temp_folder`, `write_part`, `commit_folder`): parts (and npy
files) go into a sibling `features.tmp-<id>` folder, from any process that sees it (`lofi
extract`'s Ray Data workers write there directly, with `assemble_video` and `write_videos`);
the manifest is written last and the folder renamed into place, replacing an older one, so a
killed or failed extraction never leaves a half-written features folder behind. `FeatureWriter`
is the same protocol for a single process that holds the features itself (tests, small tools).

On an object store (`run.storage` s3:// or gs://; no rename there) the same guarantee comes from
pipelines.storage's record protocol (`begin_features`, `commit_features`): workers write each part
to local scratch and upload it under its final name below `<run>/features/attempt-<id>/`; the
driver uploads features_manifest.json last, its `files` (and `npy_dir`) relative to the folder,
then deletes older attempts. Readers trust only the files a manifest lists, so a failed run's
parts are never read and the previous manifest stays valid until the new one lands.

Columns (schema metadata `lofi.features` holds the manifest's feature_dim / num_snippets):

    video_id, subset                      string
    duration_sec                          float64  the annotated duration the snippet grid covers
    num_snippets                          int32    T of this video (valid rows of `features`)
    features                              fixed-shape tensor float32 (T, D): snippet t is row t
    segment_start_sec, segment_end_sec    list<float64>  ground truth in seconds
    segment_label, segment_label_id       list<string>, list<int32> (ids index the manifest's labels)

On a fixed grid (a level with num_snippets, `fixed_grid` true) every video has the same T.
A fixed-stride level gives every video its own T; Arrow's fixed-shape tensors need one
shape per column, so rows are zero-padded to the longest video's T and `num_snippets`
says how many rows are real (`video_features` drops the padding; the npy files are never padded).

Readers for the other stages:

    read_features(dir, subset=None) -> pyarrow.Table      plain pyarrow, sorted by video_id
    features_array(table) -> np.ndarray (N, T, D)         the tensor column as numpy
    video_features(table) -> dict[video_id, (T_i, D)]     padding dropped
    features_dataset(dir, subset=None) -> ray.data.Dataset   for Ray Train: `features` arrives
        as a (B, T, D) tensor in iter_torch_batches (select numeric columns first: segments are
        ragged lists)
    read_features_manifest(dir) -> FeaturesManifest (pipelines/data/manifests.py)
    feature_parts(dir, manifest=None) -> Iterator[Table]  one Parquet part at a time (lofi export-features)

`lofi export-features` (pipelines/stages/export.py) turns a features folder into the per-video npy files,
annotation JSON and class map that ActionFormer and OpenTAD read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lofi.errors import LofiError
from pipelines.data.manifests import FeaturesCounts, FeaturesManifest
from pipelines.data.shards import part_name, write_json_atomic
from pipelines.storage import Location, location, read_parquet
from pipelines.data.tensors import ray_tensor_column, tensor_numpy

FEATURES_SCHEMA_VERSION = 1
FEATURES_MANIFEST = "features_manifest.json"
NPY_DIR = "npy"
# Fixed-shape numeric columns: what `iter_torch_batches` can stack into tensors.
NUMERIC_FEATURE_COLUMNS = ("features", "num_snippets", "duration_sec")
SEGMENT_COLUMNS = ("segment_start_sec", "segment_end_sec", "segment_label", "segment_label_id")
# Every column but `features`: what a writer needs besides the tensor.
META_COLUMNS = ("video_id", "subset", "duration_sec", "num_snippets") + SEGMENT_COLUMNS
# The shard columns (pipelines/data/shards.py) that put a video's encoded chunks back together.
CHUNK_COLUMNS = ("chunk_index", "num_chunks", "snippet_start", "num_valid_snippets")
SUMMARY_COLUMNS = ("video_id", "subset", "file")  # what `write_videos` returns per video
VIDEOS_PER_PART = 256


def features_schema(num_snippets: int, feature_dim: int) -> pa.Schema:
    """The Parquet schema of a features folder with (T, D) = (num_snippets, feature_dim)."""
    meta = {b"lofi.features": json.dumps({"schema_version": FEATURES_SCHEMA_VERSION, "num_snippets": num_snippets,
                                          "feature_dim": feature_dim}).encode()}
    return pa.schema([
        ("video_id", pa.string()), ("subset", pa.string()), ("duration_sec", pa.float64()),
        ("num_snippets", pa.int32()),
        ("features", pa.fixed_shape_tensor(pa.float32(), [num_snippets, feature_dim])),
        ("segment_start_sec", pa.list_(pa.float64())), ("segment_end_sec", pa.list_(pa.float64())),
        ("segment_label", pa.list_(pa.string())), ("segment_label_id", pa.list_(pa.int32())),
    ], metadata=meta)


def features_location(features_dir: str | Path | Location) -> Location:
    """A features folder (a path, a URI, or a Location already) as a Location."""
    return features_dir if isinstance(features_dir, Location) else location(str(features_dir), "run.storage")


def file_sha1(path: str | Path) -> str:
    """Content hash of a checkpoint (a path or an object-store URI): tells a rerun whether its
    features are still current."""
    loc = location(str(path), "encoder.checkpoint")
    digest = hashlib.sha1()
    with loc.open_input() as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_folder(out_dir: str | Path, write_npy: bool) -> Path:
    """A new, empty `<out_dir>.tmp-<id>` sibling (with npy/) that parts are written into."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    if write_npy:
        (tmp / NPY_DIR).mkdir()
    return tmp


def write_part(folder: str | Path, name: str, meta: pa.Table, padded: np.ndarray, write_npy: bool) -> None:
    """Write videos as Parquet part `name` (+ npy/<video_id>.npy) into `folder`: a local temp
    folder, or an object-store attempt prefix (`begin_features`), where each file is written to
    local scratch and then uploaded under its final name (one atomic upload per object).

    `meta` holds META_COLUMNS, one row per video; `padded` (N, T, D) float32 their features, zero
    past each num_snippets. Rewriting the same name replaces the file (a retried task). A local
    folder is never created here: a missing one means the run was aborted, or that this process
    does not see the run's filesystem.
    """
    loc = features_location(folder)
    if not loc.is_local:
        with tempfile.TemporaryDirectory(prefix="lofi-features-") as scratch:
            written = _write_part_files(Path(scratch), name, meta, padded, write_npy)
            for rel in written:
                (loc / rel).upload(Path(scratch) / rel)
        return
    folder = Path(folder)
    if not folder.is_dir():
        raise LofiError(f"{folder} does not exist here: the extraction was aborted, or run.storage is not a "
                        "filesystem every Ray node sees (use a shared folder or an s3:// URI on a multi-node cluster)")
    _write_part_files(folder, name, meta, padded, write_npy)


def _write_part_files(folder: Path, name: str, meta: pa.Table, padded: np.ndarray, write_npy: bool) -> list[str]:
    """The part's files in a local folder; their paths relative to it, the Parquet part first."""
    n, t, d = padded.shape
    schema = features_schema(t, d)
    columns = {c: meta.column(c).cast(schema.field(c).type) for c in META_COLUMNS}
    columns["features"] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(padded, dtype=np.float32))
    table = pa.table([columns[c] for c in schema.names], schema=schema)
    pq.write_table(table, folder / name, compression="zstd")
    written = [name]
    if write_npy:
        (folder / NPY_DIR).mkdir(exist_ok=True)
        lengths = meta.column("num_snippets").to_pylist()
        for i, vid in enumerate(meta.column("video_id").to_pylist()):
            np.save(folder / NPY_DIR / f"{vid}.npy", padded[i, : lengths[i]].astype(np.float32, copy=False))
            written.append(f"{NPY_DIR}/{vid}.npy")
    return written


def commit_folder(tmp: str | Path, out_dir: str | Path, manifest: FeaturesManifest) -> Path:
    """Write the manifest into `tmp` last, then move `tmp` into place (`replace_folder`)."""
    write_json_atomic(Path(tmp) / FEATURES_MANIFEST, manifest.to_dict())
    return replace_folder(tmp, out_dir)


def replace_folder(tmp: str | Path, out_dir: str | Path) -> Path:
    """Move the complete folder `tmp` into place as `out_dir`, replacing an older one: the old folder is
    renamed aside first and removed after, so `out_dir` is always the old folder, absent, or the new one."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    old = out_dir.with_name(f"{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def begin_features(out: Location, write_npy: bool) -> str:
    """Where the workers of one extraction write: a local `<out>.tmp-<id>` folder (renamed into place
    by `commit_features`), or on an object store the prefix `<out>/attempt-<id>/`, whose parts a
    reader sees only once a manifest written last lists them."""
    if out.is_local:
        return str(temp_folder(out.uri, write_npy))
    out.check_bucket()
    return str(out / f"attempt-{uuid.uuid4().hex[:8]}")


def commit_features(folder: str, out: Location, manifest: FeaturesManifest) -> Location:
    """Commit what `begin_features` started. Object stores: the manifest (its files made relative to
    `out`) is uploaded last, then every object under `out` of an older attempt is deleted."""
    if out.is_local:
        return Location(str(commit_folder(folder, out.uri, manifest)), out.key)
    attempt = features_location(folder).name
    manifest = dataclasses.replace(manifest, files=tuple(sorted(f"{attempt}/{name}" for name in manifest.files)),
                                   npy_dir=f"{attempt}/{NPY_DIR}" if manifest.npy else None)
    (out / FEATURES_MANIFEST).write_json(manifest.to_dict())
    keep = {FEATURES_MANIFEST, attempt}
    for stale in out.files(recursive=True):
        if stale.uri[len(out.uri) + 1:].split("/", 1)[0] not in keep:
            stale.delete()
    return out


def abort_features(folder: str) -> None:
    """Remove what a failed extraction wrote (the previous features stay as they were)."""
    loc = features_location(folder)
    if loc.is_local:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        try:
            loc.delete()
        except LofiError:
            pass  # best effort: no manifest lists the attempt, so readers never see it


def features_manifest(source: FeaturesManifest, num_snippets: int, feature_dim: int, files: Iterable[str],
                      write_npy: bool, counts: dict[str, int]) -> FeaturesManifest:
    """`source` (what the writer knows of encoder, level, labels) plus the fields readers rely on."""
    held = FeaturesCounts(videos=sum(counts.values()), per_subset=dict(sorted(counts.items())))
    return dataclasses.replace(source, schema_version=FEATURES_SCHEMA_VERSION, feature_dim=feature_dim,
                               num_snippets=num_snippets, files=tuple(sorted(files)), npy=write_npy, counts=held)


class FeatureWriter:
    """The commit protocol from one process: whole videos' features, added one at a time.

    `commit(source)` writes the last part and the manifest and renames the folder into place,
    replacing an older one; `abort()` removes the temp folder.
    """

    def __init__(self, out_dir: str | Path, num_snippets: int, feature_dim: int, write_npy: bool = False,
                 videos_per_file: int = 256) -> None:
        self.out_dir = Path(out_dir)
        self.tmp = temp_folder(self.out_dir, write_npy)
        self.num_snippets, self.feature_dim = num_snippets, feature_dim
        self.write_npy = write_npy
        self.videos_per_file = videos_per_file
        self.pending: list[tuple[dict[str, Any], np.ndarray]] = []
        self.files: list[str] = []
        self.counts: dict[str, int] = {}

    def add(self, meta: dict[str, Any], features: np.ndarray) -> None:
        """One video: `meta` holds the non-tensor columns, `features` is (T_i, D) float32."""
        t, d = features.shape
        if d != self.feature_dim or t > self.num_snippets or t != meta["num_snippets"]:
            raise ValueError(f"video {meta['video_id']}: features {features.shape} do not fit "
                             f"(num_snippets={meta['num_snippets']}, T<={self.num_snippets}, D={self.feature_dim})")
        self.pending.append((meta, features))
        self.counts[meta["subset"]] = self.counts.get(meta["subset"], 0) + 1
        if len(self.pending) >= self.videos_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        schema = features_schema(self.num_snippets, self.feature_dim)
        meta = pa.table({c: pa.array([m[c] for m, _ in self.pending], type=schema.field(c).type)
                         for c in META_COLUMNS})
        padded = np.zeros((len(self.pending), self.num_snippets, self.feature_dim), dtype=np.float32)
        for i, (_, feats) in enumerate(self.pending):
            padded[i, : feats.shape[0]] = feats  # rows past num_snippets stay zero (stride levels)
        name = f"part-{len(self.files):05d}.parquet"
        write_part(self.tmp, name, meta, padded, self.write_npy)
        self.files.append(name)
        self.pending = []

    def commit(self, source: FeaturesManifest | Mapping[str, Any]) -> Path:
        """`source`: the manifest's source fields (encoder, level, labels, ...), typed or as its JSON object."""
        self.flush()
        source = source if isinstance(source, FeaturesManifest) else FeaturesManifest.from_dict(source)
        return commit_folder(self.tmp, self.out_dir, features_manifest(
            source, self.num_snippets, self.feature_dim, self.files, self.write_npy, self.counts))

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# Writing from Ray Data workers (`lofi extract`) ----------------------------------------------

def assemble_video(group: pa.Table, num_snippets: int) -> pa.Table:
    """map_groups: the encoded chunk rows of one video -> one row of META_COLUMNS and its
    features (T, D) zero-padded to (num_snippets, D)."""
    vid = group.column("video_id")[0].as_py()
    group = group.sort_by("snippet_start")
    expected = group.column("num_chunks")[0].as_py()
    if sorted(group.column("chunk_index").to_pylist()) != list(range(expected)):
        raise RuntimeError(f"video {vid}: encoded chunks {sorted(group.column('chunk_index').to_pylist())}, "
                           f"expected 0..{expected - 1}")
    feats = tensor_numpy(group.column("features"))  # (chunks, Tc, D)
    valid = group.column("num_valid_snippets").to_pylist()
    video = np.concatenate([feats[i, :v] for i, v in enumerate(valid)])  # (chunks, Tc, D) -> (T_i, D)
    t = group.column("num_snippets")[0].as_py()
    if video.shape[0] != t:
        raise RuntimeError(f"video {vid}: assembled {video.shape[0]} snippets, expected {t}")
    padded = np.zeros((1, num_snippets, feats.shape[-1]), dtype=np.float32)
    padded[0, :t] = video
    return group.slice(0, 1).select(list(META_COLUMNS)).append_column("features", ray_tensor_column(padded))


def write_videos(batch: pa.Table, folder: str, write_npy: bool) -> pa.Table:
    """map_batches: whole videos -> one Parquet part in the temp folder; returns SUMMARY_COLUMNS.

    The part's name hashes its video ids, so a retried task rewrites the same file."""
    ids = batch.column("video_id").to_pylist()
    name = f"{part_name(ids)}.parquet"
    if ids:
        write_part(folder, name, batch.select(list(META_COLUMNS)), tensor_numpy(batch.column("features")), write_npy)
    return pa.table({"video_id": batch.column("video_id"), "subset": batch.column("subset"),
                     "file": pa.array([name] * len(ids), pa.string())})


def read_features_manifest(features_dir: str | Path | Location) -> FeaturesManifest:
    loc = features_location(features_dir) / FEATURES_MANIFEST
    if not loc.is_file():
        raise LofiError(f"{loc} does not exist: run `lofi extract` (same --config / run.name) to completion first")
    return FeaturesManifest.from_dict(loc.read_json())


def feature_files(features_dir: str | Path | Location) -> list[str]:
    """The Parquet parts the manifest lists (only those: an object store may hold a failed run's
    parts too), as paths or URIs."""
    return [str(features_location(features_dir) / name) for name in read_features_manifest(features_dir).files]


def feature_parts(features_dir: str | Path | Location, manifest: FeaturesManifest | None = None) -> Iterator[pa.Table]:
    """The manifest's Parquet parts one at a time (rows in file order): for readers that go through
    every video without holding all features at once (`lofi export-features`). `manifest`: the
    folder's, when the caller has read it already."""
    manifest = manifest or read_features_manifest(features_dir)
    schema = features_schema(manifest.num_snippets, manifest.feature_dim)
    for name in manifest.files:
        yield read_parquet(str(features_location(features_dir) / name), key="run.storage", schema=schema)


def read_features(features_dir: str | Path | Location, subset: str | None = None,
                  columns: Iterable[str] | None = None) -> pa.Table:
    """All (or one subset's) feature rows with plain pyarrow, sorted by video_id."""
    manifest = read_features_manifest(features_dir)
    schema = features_schema(manifest.num_snippets, manifest.feature_dim)
    tables = list(feature_parts(features_dir, manifest))
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    if subset is not None:
        manifest.check_subset(subset, features_location(features_dir) / FEATURES_MANIFEST)
        table = table.filter(pa.compute.equal(table.column("subset"), subset))
    table = table.sort_by("video_id")
    return table if columns is None else table.select(list(columns))


def features_array(table: pa.Table) -> np.ndarray:
    """The `features` column as one float32 array (N, T, D) (zero rows past each num_snippets)."""
    column = table.column("features")
    if column.num_chunks == 0:
        shape = column.type.shape
        return np.zeros((0, *shape), dtype=np.float32)
    return column.combine_chunks().to_numpy_ndarray()


def video_features(table: pa.Table) -> dict[str, np.ndarray]:
    """video_id -> its (T_i, D) features, padding dropped."""
    feats = features_array(table)
    ids, lengths = table.column("video_id").to_pylist(), table.column("num_snippets").to_pylist()
    return {vid: feats[i, :t] for i, (vid, t) in enumerate(zip(ids, lengths))}


def features_dataset(features_dir: str | Path | Location, subset: str | None = None, columns: Iterable[str] | None = None):
    """A Ray Dataset of the feature rows (one subset's, if given) for Ray Train / Ray Data.

    `features` comes out as a (B, T, D) float32 tensor from iter_torch_batches; select
    `NUMERIC_FEATURE_COLUMNS` (plus what you add with map_batches) before that, since the
    string and list columns cannot be stacked.
    """
    import ray.data
    from ray.data.expressions import col

    files = feature_files(features_dir)
    if not files:
        raise LofiError(f"{features_dir}: the features folder holds no videos; check the extraction summary")
    locs = [features_location(f) for f in files]
    # object stores: bucket/key paths with the bucket's filesystem (its endpoint and credentials)
    ds = ray.data.read_parquet(files) if locs[0].is_local else \
        ray.data.read_parquet([loc.path for loc in locs], filesystem=locs[0].fs)
    if subset is not None:
        manifest = read_features_manifest(features_dir)
        manifest.check_subset(subset, features_location(features_dir) / FEATURES_MANIFEST)
        ds = ds.filter(expr=col("subset") == subset)
    return ds if columns is None else ds.select_columns(list(columns))
