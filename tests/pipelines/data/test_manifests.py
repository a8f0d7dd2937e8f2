"""The typed manifests read and write the JSON the writers have always written, and older files still load.

The golden key orders and the features manifest's bytes follow the writers before the typed
manifests (a dict literal per writer, dumped with `json.dumps(..., indent=1)`), not the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from lofi.config import from_dict
from lofi.errors import LofiError
from lofi.fidelity import FidelityLevel
from pipelines.data import shards
from pipelines.data.feature_windows import uses_windows
from pipelines.data.features import FEATURES_MANIFEST, FeatureWriter, read_features_manifest
from pipelines.data.manifests import FeaturesManifest, ShardManifest
from pipelines.data.prepare import PrepareConfig, run
from pipelines.stages.provenance import external_data

MANIFEST_KEYS = ["schema_version", "config", "labels", "levels", "counts", "wall_time_sec", "videos_per_sec",
                 "decode_sec", "errors", "tuning"]
LEVEL_KEYS = ["name", "num_snippets", "snippet_stride_sec", "frames_per_snippet", "size_px", "storage", "jpeg_quality",
              "snippets_per_row", "videos", "rows", "frames", "bytes", "bytes_per_video", "shards"]
COUNTS_KEYS = ["videos_total", "videos_ok", "videos_failed", "videos_processed_this_run", "frames", "bytes"]
TUNING_KEYS = ["fraction", "seed", "source", "subset", "video_ids"]

# what `lofi extract` tells the writer (pipelines/stages/extract.py), in its order
EXTRACT_SOURCE = {
    "encoder": {"name": "tsm_resnet18", "width": 8, "checkpoint": "/runs/r/train/encoder.pt", "checkpoint_sha1": "ab" * 20,
                "origin": {"external": False, "details": "encoder trained from random initialisation"}},
    "shards": "/data/prepared", "level": "stride",
    "level_config": {"num_snippets": None, "snippet_stride_sec": 2.0, "frames_per_snippet": 2, "size_px": 32},
    "fixed_grid": False, "labels": ["jump", "swim"], "annotations": "/data/annotations.json", "seconds": 1.5,
}
META = {"duration_sec": 8.0, "segment_start_sec": [1.0], "segment_end_sec": [3.0], "segment_label": ["jump"],
        "segment_label_id": [0]}


@pytest.fixture(scope="module")
def prepared(ray_cluster, synth_small, tmp_path_factory):
    """A real `lofi prepare` output with every kind of level entry, failed videos and a tuning split."""
    out = tmp_path_factory.mktemp("manifests") / "out"
    levels = [{"name": "full", "num_snippets": 8, "frames_per_snippet": 2, "size_px": 32},
              {"name": "sparse", "num_snippets": 2, "frames_per_snippet": 2, "size_px": 32, "spacing_snippets": 8},
              {"name": "stride", "snippet_stride_sec": 4.0, "frames_per_snippet": 2, "size_px": 32, "storage": "jpeg"}]
    cfg = from_dict(PrepareConfig, {
        "input": {"annotations": str(synth_small / "annotations.json"), "videos": str(synth_small / "videos"),
                  "tuning_fraction": 0.5, "tuning_seed": 7},
        "output": str(out), "levels": levels, "num_workers": 2, "videos_per_part": 3, "max_error_fraction": 1.0})
    run(cfg, verbose=False)
    return cfg, out


@pytest.mark.ray
def test_a_prepared_shard_manifest_round_trips_key_for_key(prepared):
    cfg, out = prepared
    written = json.loads((out / shards.MANIFEST).read_text())
    manifest = ShardManifest.from_dict(written)
    assert manifest.to_dict() == written and ShardManifest.from_dict(manifest.to_dict()) == manifest
    assert shards.read_manifest(out) == manifest
    # the order the writer has always used; spacing_snippets only where it is set
    assert list(written) == MANIFEST_KEYS
    assert list(written["counts"]) == COUNTS_KEYS and list(written["tuning"]) == TUNING_KEYS
    full, sparse, stride = written["levels"]
    assert list(full) == list(stride) == LEVEL_KEYS
    assert list(sparse) == LEVEL_KEYS[:7] + ["spacing_snippets"] + LEVEL_KEYS[7:]
    assert written["errors"] and written["tuning"]["video_ids"]
    # each entry without its totals is the level as resolved, which its Parquet files record too
    for entry, level in zip(manifest.levels, cfg.resolved_levels()):
        assert entry.resolved() == level
        schema = pq.read_schema(out / entry.shards[0])
        assert json.loads(schema.metadata[b"lofi.level"]) == level


def test_a_features_manifest_is_written_as_before_and_round_trips(tmp_path):
    writer = FeatureWriter(tmp_path / "features", num_snippets=4, feature_dim=3, write_npy=True)
    writer.add({"video_id": "a", "subset": "training", "num_snippets": 4, **META}, np.ones((4, 3), np.float32))
    writer.add({"video_id": "b", "subset": "validation", "num_snippets": 3, **META}, np.ones((3, 3), np.float32))
    folder = writer.commit(FeaturesManifest.from_dict(EXTRACT_SOURCE))
    # what the writer wrote before the typed manifest: the source, then what the folder holds
    before = {**EXTRACT_SOURCE, "schema_version": 1, "feature_dim": 3, "num_snippets": 4,
              "files": ["part-00000.parquet"], "npy": True,
              "counts": {"videos": 2, "per_subset": {"training": 1, "validation": 1}}}
    assert (folder / FEATURES_MANIFEST).read_text() == json.dumps(before, indent=1)
    manifest = read_features_manifest(folder)
    assert manifest.to_dict() == before and FeaturesManifest.from_dict(manifest.to_dict()) == manifest
    # an object store's manifest names the committed attempt's npy folder last
    on_store = {**before, "files": ["attempt-1/part-00000.parquet"], "npy_dir": "attempt-1/npy"}
    assert list(FeaturesManifest.from_dict(on_store).to_dict()) == list(on_store)
    assert FeaturesManifest.from_dict(on_store).to_dict() == on_store


def test_older_shard_manifests_load_and_other_versions_are_refused(tmp_path):
    # before the tuning split and spacing_snippets: neither key is there, and none is added
    entry = {"name": "lo", "num_snippets": 3, "snippet_stride_sec": None, "frames_per_snippet": 2, "size_px": 4,
             "storage": "uint8", "jpeg_quality": 90, "snippets_per_row": 2, "videos": 1, "rows": 2, "frames": 6,
             "bytes": 100, "bytes_per_video": 100.0, "shards": ["lo/part-0.parquet"]}
    older = {"schema_version": 2, "config": {"input": {"annotations": "/a.json"}}, "labels": ["jump"], "levels": [entry],
             "counts": {"videos_total": 1, "videos_ok": 1, "videos_failed": 0, "videos_processed_this_run": 1,
                        "frames": 6, "bytes": 100},
             "wall_time_sec": 2.0, "videos_per_sec": 0.5, "decode_sec": 1.0, "errors": []}
    (tmp_path / shards.MANIFEST).write_text(json.dumps(older))
    manifest = shards.read_manifest(tmp_path)
    assert manifest.tuning is None and manifest.to_dict() == older
    assert shards.grid_level(manifest.levels[0]) == FidelityLevel("lo", 3, 2, 4)
    assert manifest.annotations() == "/a.json"
    # a hand-written manifest with only what its reader needs loads too
    (tmp_path / shards.MANIFEST).write_text(json.dumps({"schema_version": 2, "labels": ["a", "b"], "levels": []}))
    assert shards.read_manifest(tmp_path).labels == ("a", "b")
    (tmp_path / shards.MANIFEST).write_text(json.dumps({**older, "schema_version": 1}))
    with pytest.raises(LofiError, match="schema version 1.*lofi prepare --overwrite"):
        shards.read_manifest(tmp_path)


def test_older_features_manifests_load_without_origin_or_source_fields():
    # `lofi extract` before encoder origins were recorded: detections declare external data as unknown
    before_origin = {**EXTRACT_SOURCE, "encoder": {"checkpoint": None, "checkpoint_sha1": None}, "schema_version": 1,
                     "feature_dim": 3, "num_snippets": 4, "files": ["part-0.parquet"], "npy": False,
                     "counts": {"videos": 1, "per_subset": {"training": 1}}}
    manifest = FeaturesManifest.from_dict(before_origin)
    assert manifest.to_dict() == before_origin
    assert manifest.encoder_origin() is None and external_data(manifest)["used"] is True
    # a FeatureWriter told only level, grid and labels: the other source keys stay absent
    minimal = {"level": "full", "fixed_grid": True, "labels": ["jump"], **{k: before_origin[k] for k in
               ("schema_version", "feature_dim", "num_snippets", "files", "npy", "counts")}}
    manifest = FeaturesManifest.from_dict(minimal)
    assert manifest.to_dict() == minimal and manifest.level_config is None and not uses_windows(manifest)
    # no fixed_grid at all: a whole-video grid, as the window code has always read it
    assert not uses_windows(FeaturesManifest.from_dict({k: v for k, v in minimal.items() if k != "fixed_grid"}))
