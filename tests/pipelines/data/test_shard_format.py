"""The on-disk shard format (schema version 2): frames as plain bytes, readable three ways.

Frames here are random bytes the test made, so every reader is checked against its own input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lofi.errors import LofiError
from pipelines.data import shards, tensors
from pipelines.data.decode import staging_table

# 3 snippets, 2 per row: two rows per video, the last one half padding
LEVEL = {"name": "lo", "num_snippets": 3, "snippet_stride_sec": None, "frames_per_snippet": 2, "size_px": 4,
         "storage": "uint8", "jpeg_quality": 90, "snippets_per_row": 2}
ROW_SHAPE = (2, 2, 4, 4, 3)  # (Tc, F, S, S, 3)


def staged_rows(video_id: str, frames: np.ndarray) -> list[dict]:
    """Staging rows of one video as decode_item gives them: (chunks, Tc, F, S, S, 3) frames."""
    base = {"video_id": video_id, "subset": "training", "path": f"/v/{video_id}.mp4", "duration_sec": 3.0,
            "fps": 2.0, "num_frames": 6, "segment_start_sec": [0.5], "segment_end_sec": [1.5],
            "segment_label": ["jump"], "segment_label_id": [0], "fidelity": "lo", "num_snippets": 3,
            "num_chunks": len(frames), "decode_sec": 0.1}
    return [{**base, "chunk_index": c, "snippet_start": 2 * c, "num_valid_snippets": min(2, 3 - 2 * c),
             "timestamps_sec": [0.25] * 4, "frame_indices": [0] * 4, "frames": frames[c]} for c in range(len(frames))]


@pytest.fixture()
def written(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """A committed part of two videos and a failed one, with its manifest; video id -> frames."""
    rng = np.random.default_rng(0)
    frames = {vid: rng.integers(0, 256, (2, *ROW_SHAPE), dtype=np.uint8) for vid in ("a", "b")}
    failed = {"video_id": "bad", "path": "/v/bad.mp4", "stage": "open", "error": "not a video", "duration_sec": 1.0}
    writer = shards.PartWriter(tmp_path, [LEVEL], "zstd")
    writer.add(staging_table(staged_rows("a", frames["a"]) + [failed]))  # the null frames of an error row
    writer.add(staging_table(staged_rows("b", frames["b"])))
    writer.commit()
    manifest = shards.build_manifest(tmp_path, {}, [LEVEL], ["jump"], [], total=3, wall_time_sec=1.0, processed=3)
    (tmp_path / shards.MANIFEST).write_text(json.dumps(manifest.to_dict()))
    return tmp_path, frames


def expected(frames: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([frames["a"], frames["b"]])  # rows sorted by video id, then chunk


def test_frames_are_stored_as_plain_uncompressed_bytes_and_other_columns_compressed(written):
    out, _ = written
    meta = pq.ParquetFile(next((out / "lo").glob("part-*.parquet"))).metadata
    columns = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i)
               for i in range(meta.num_columns)}
    frames = columns["frames"]
    assert frames.physical_type == "FIXED_LEN_BYTE_ARRAY" and frames.compression == "UNCOMPRESSED"
    assert not frames.is_stats_set and not frames.has_dictionary_page and "PLAIN" in frames.encodings
    assert columns["video_id"].compression == "ZSTD" and columns["timestamps_sec.list.element"].compression == "ZSTD"
    schema = pq.read_schema(next((out / "lo").glob("part-*.parquet")))
    assert schema.metadata[b"lofi.schema_version"] == str(shards.SCHEMA_VERSION).encode() == b"2"


def test_plain_pyarrow_reads_the_frames_as_the_doc_says(written):
    out, frames = written
    # the recipe of docs/architecture.md "Shards", with pyarrow and numpy only
    path = next((out / "lo").glob("part-*.parquet"))
    t = pq.read_table(path)
    col = t.column("frames").combine_chunks()
    shape = json.loads(t.schema.field("frames").metadata[b"lofi.shape"])
    array = np.frombuffer(col.buffers()[1], np.uint8).reshape(-1, *shape)[col.offset:][:len(col)]
    assert shape == list(ROW_SHAPE) and np.array_equal(array, expected(frames))


def test_read_level_table_gives_tensor_frames_and_frames_array_the_input(written):
    out, frames = written
    table = shards.read_level_table(out, "lo")
    assert str(table.schema.field("frames").type).startswith("extension<arrow.fixed_shape_tensor")
    assert table.column("video_id").to_pylist() == ["a", "a", "b", "b"]
    assert np.array_equal(tensors.frames_array(table), expected(frames))
    only = shards.read_level_table(out, "lo", ["frames"])  # frames alone, still sorted by video and chunk
    assert only.column_names == ["frames"] and np.array_equal(tensors.frames_array(only), expected(frames))


@pytest.mark.ray
def test_ray_data_hands_training_the_same_uint8_frames(ray_cluster, written):
    out, frames = written
    batches = list(shards.read_level_dataset(out, "lo").iter_torch_batches(batch_size=3))
    got = {}
    for batch in batches:
        assert str(batch["frames"].dtype) == "torch.uint8" and tuple(batch["frames"].shape[1:]) == ROW_SHAPE
        for i in range(len(batch["frames"])):
            got[(int(batch["snippet_start"][i]), batch["frames"][i].numpy().tobytes())] = True
    want = {(2 * c, frames[v][c].tobytes()) for v in ("a", "b") for c in range(2)}
    assert set(got) == want
    rows = shards.read_level_dataset(out, "lo", columns=("chunk_index",)).take_all()  # no frames read
    assert sorted(r["chunk_index"] for r in rows) == [0, 0, 1, 1]


def test_a_folder_of_the_old_layout_is_refused_with_the_fix(written):
    out, _ = written
    manifest = json.loads((out / shards.MANIFEST).read_text())
    (out / shards.MANIFEST).write_text(json.dumps({**manifest, "schema_version": 1}))
    with pytest.raises(LofiError, match=r"schema version 1.*lofi prepare --overwrite"):
        shards.read_level_table(out, "lo")
    # a resumed prepare: records of version 1 carry no version and must not be extended
    record = next((out / shards.PARTS_DIR).glob("part-*.json"))
    data = json.loads(record.read_text())
    del data["schema_version"]
    record.write_text(json.dumps(data))
    with pytest.raises(LofiError, match=r"schema version 1.*--overwrite"):
        shards.remove_uncommitted(out, ["lo"])
