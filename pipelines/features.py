"""Feature shards: what `lofi extract` writes and `lofi train-head` / `lofi detect` read.

Layout of a features folder (`<run>/features/`, see pipelines/config.py):

    features_manifest.json        written last: encoder (checkpoint, its sha1, name, width),
                                  shards folder and level, feature_dim D, num_snippets T,
                                  fixed_grid, counts per subset, label names, files, wall time
    part-<nnnnn>.parquet          one row per video (videos in order of completion; readers sort)
    npy/<video_id>.npy            optional (extract.write_npy): float32 (T, D) per video, the
                                  layout feature-based TAL toolkits (BMN, G-TAD, ActionFormer) read

A run writes into a sibling `features.tmp-<id>` folder and renames it into place at the end,
so a killed extraction never leaves a half-written features folder behind.

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
    read_features_manifest(dir) -> dict
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lofi.errors import LofiError
from pipelines.shards import write_json_atomic

FEATURES_SCHEMA_VERSION = 1
FEATURES_MANIFEST = "features_manifest.json"
NPY_DIR = "npy"
# Fixed-shape numeric columns: what `iter_torch_batches` can stack into tensors.
NUMERIC_FEATURE_COLUMNS = ("features", "num_snippets", "duration_sec")
SEGMENT_COLUMNS = ("segment_start_sec", "segment_end_sec", "segment_label", "segment_label_id")


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


def file_sha1(path: str | Path) -> str:
    """Content hash of a checkpoint: tells a rerun whether its features are still current."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FeatureWriter:
    """Collects whole videos' features and writes them as Parquet parts (+ npy) into a temp folder.

    `commit(manifest)` writes the manifest and renames the folder into place, replacing an
    older one; `abort()` removes the temp folder.
    """

    def __init__(self, out_dir: str | Path, num_snippets: int, feature_dim: int, write_npy: bool = False,
                 videos_per_file: int = 256) -> None:
        self.out_dir = Path(out_dir)
        self.tmp = self.out_dir.with_name(f"{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.tmp.mkdir(parents=True)
        if write_npy:
            (self.tmp / NPY_DIR).mkdir()
        self.schema = features_schema(num_snippets, feature_dim)
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
        if self.write_npy:
            np.save(self.tmp / NPY_DIR / f"{meta['video_id']}.npy", features.astype(np.float32, copy=False))
        self.pending.append((meta, features))
        self.counts[meta["subset"]] = self.counts.get(meta["subset"], 0) + 1
        if len(self.pending) >= self.videos_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        metas = [m for m, _ in self.pending]
        padded = np.zeros((len(metas), self.num_snippets, self.feature_dim), dtype=np.float32)
        for i, (_, feats) in enumerate(self.pending):
            padded[i, : feats.shape[0]] = feats  # rows past num_snippets stay zero (stride levels)
        columns = {name: [m[name] for m in metas] for name in self.schema.names if name != "features"}
        columns["features"] = pa.FixedShapeTensorArray.from_numpy_ndarray(padded)
        table = pa.table([columns[name] for name in self.schema.names], schema=self.schema)
        name = f"part-{len(self.files):05d}.parquet"
        pq.write_table(table, self.tmp / name, compression="zstd")
        self.files.append(name)
        self.pending = []

    def commit(self, manifest: dict[str, Any]) -> Path:
        self.flush()
        manifest = {**manifest, "schema_version": FEATURES_SCHEMA_VERSION, "feature_dim": self.feature_dim,
                    "num_snippets": self.num_snippets, "files": self.files, "npy": self.write_npy,
                    "counts": {"videos": sum(self.counts.values()), "per_subset": dict(sorted(self.counts.items()))}}
        write_json_atomic(self.tmp / FEATURES_MANIFEST, manifest)
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self.tmp.rename(self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def read_features_manifest(features_dir: str | Path) -> dict[str, Any]:
    path = Path(features_dir) / FEATURES_MANIFEST
    if not path.is_file():
        raise LofiError(f"{path} does not exist: run `lofi extract` (same --config / run.name) to completion first")
    return json.loads(path.read_text())


def _check_subset(manifest: dict[str, Any], subset: str, features_dir: str | Path) -> None:
    known = sorted(manifest["counts"]["per_subset"])
    if subset not in known:
        raise LofiError(f"{Path(features_dir) / FEATURES_MANIFEST}: no video of subset {subset!r}; "
                        f"subsets there: {', '.join(known) or 'none'}; check data.train_subset / data.val_subset")


def feature_files(features_dir: str | Path) -> list[str]:
    manifest = read_features_manifest(features_dir)
    return [str(Path(features_dir) / name) for name in manifest["files"]]


def read_features(features_dir: str | Path, subset: str | None = None, columns: Iterable[str] | None = None) -> pa.Table:
    """All (or one subset's) feature rows with plain pyarrow, sorted by video_id."""
    manifest = read_features_manifest(features_dir)
    files = feature_files(features_dir)
    schema = features_schema(manifest["num_snippets"], manifest["feature_dim"])
    table = pa.concat_tables([pq.read_table(f, schema=schema) for f in files]) if files else schema.empty_table()
    if subset is not None:
        _check_subset(manifest, subset, features_dir)
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


def features_dataset(features_dir: str | Path, subset: str | None = None, columns: Iterable[str] | None = None):
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
    ds = ray.data.read_parquet(files)
    if subset is not None:
        _check_subset(read_features_manifest(features_dir), subset, features_dir)
        ds = ds.filter(expr=col("subset") == subset)
    return ds if columns is None else ds.select_columns(list(columns))
