"""Driver-side steps of `lofi prepare` without Ray: listing videos, the output folder, commits."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pytest

from lofi.annotations import Segment, Video
from lofi.config import from_dict
from lofi.errors import LofiError
from pipelines.data import shards, tensors
from pipelines.data.prepare import PrepareConfig, build_items, list_video_files, prepare_output, previous_errors
from pipelines.data.prepare_tasks import _TaskErrors, committed_ids, forget_failures

LEVEL = {"name": "lo", "num_snippets": 2, "snippet_stride_sec": None, "frames_per_snippet": 1, "size_px": 2,
         "storage": "uint8", "jpeg_quality": 90, "snippets_per_row": 2}


def test_files_are_found_by_id_with_or_without_v_prefix_and_missing_ones_are_errors(tmp_path):
    for name in ("a.mp4", "v_b.mkv", "c.webm", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    files = list_video_files(str(tmp_path))
    videos = [Video("a", "training", 10.0, segments=(Segment(1.0, 2.0, "jump"),)),
              Video("b", "validation", 12.0), Video("v_c", "training", 5.0), Video("d", "training", 8.0)]
    items, errors = build_items(videos, ("jump", "run"), files, str(tmp_path))
    assert {i["video_id"]: Path(i["path"]).name for i in items} == {"a": "a.mp4", "b": "v_b.mkv", "v_c": "c.webm"}
    assert items[0]["segment_label_id"] == [0] and items[0]["segment_start_sec"] == [1.0]
    assert len(errors) == 1 and errors[0]["video_id"] == "d" and errors[0]["stage"] == "list"
    assert str(tmp_path) in errors[0]["error"] and "add it" in errors[0]["error"]


def test_missing_video_folder_is_a_user_error(tmp_path):
    with pytest.raises(LofiError, match="input.videos"):
        list_video_files(str(tmp_path / "nope"))


def config(out: Path, **extra) -> PrepareConfig:
    return from_dict(PrepareConfig, {"input": {"annotations": "a.json", "videos": "v"}, "output": str(out),
                                     "levels": [{"name": "lo", "num_snippets": 2, "size_px": 2}], **extra})


def test_a_folder_that_is_not_ours_is_never_deleted(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(LofiError, match="not a `lofi prepare` output"):
            prepare_output(config(tmp_path, overwrite=overwrite))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_runtime_settings_may_change_between_runs_but_not_the_data(tmp_path):
    out = tmp_path / "out"
    assert prepare_output(config(out)) == set()
    assert prepare_output(config(out, num_workers=7, videos_per_part=3, max_error_fraction=0.5)) == set()
    with pytest.raises(LofiError, match="differs in: resize"):
        prepare_output(config(out, resize="squash"))


def staged(video_id: str) -> pa.Table:
    row = {"video_id": video_id, "subset": "training", "path": f"/v/{video_id}.mp4", "duration_sec": 2.0,
           "fps": 1.0, "num_frames": 2, "segment_start_sec": [], "segment_end_sec": [], "segment_label": [],
           "segment_label_id": [], "fidelity": "lo", "num_snippets": 2, "chunk_index": 0, "num_chunks": 1,
           "snippet_start": 0, "num_valid_snippets": 2, "timestamps_sec": [0.5, 1.5], "frame_indices": [0, 1],
           "frames": bytes(range(24)), "decode_sec": 0.1}
    failed = {"video_id": "bad", "path": "/v/bad.mp4", "stage": "open", "error": "not a video", "duration_sec": 1.0}
    return pa.Table.from_pylist([row, failed], schema=shards.STAGING_SCHEMA)


def test_only_committed_parts_count_and_leftovers_are_removed(tmp_path):
    record = shards.PartWriter(tmp_path, [LEVEL], "zstd")
    record.add(staged("a"))
    committed = record.commit()
    assert committed["video_ids"] == ["a"] and committed["failed_ids"] == ["bad"]
    # a second part killed after its file was renamed into place but before its record was written
    orphan = tmp_path / "lo" / "part-0000dead0000beef.parquet"
    orphan.write_bytes(b"half")
    (tmp_path / shards.TMP_DIR / "x").mkdir(parents=True)
    assert shards.remove_uncommitted(tmp_path, ["lo"]) == 1
    assert not orphan.exists() and not (tmp_path / shards.TMP_DIR).exists()
    assert [p["part"] for p in shards.committed_parts(tmp_path)] == [committed["part"]]
    # a record whose file vanished is dropped, so its videos are done again
    (tmp_path / committed["levels"]["lo"]["file"]).unlink()
    shards.remove_uncommitted(tmp_path, ["lo"])
    assert shards.committed_parts(tmp_path) == []


def test_part_writer_output_reads_back_as_tensors(tmp_path):
    writer = shards.PartWriter(tmp_path, [LEVEL], "zstd")
    writer.add(staged("a"))
    rec = writer.commit()
    manifest = shards.build_manifest(tmp_path, {}, [LEVEL], ["jump"], [], total=2, wall_time_sec=1.0, processed=2)
    (tmp_path / shards.MANIFEST).write_text(json.dumps(manifest.to_dict()))
    assert manifest.counts.videos_ok == 1 and manifest.counts.videos_failed == 1
    assert manifest.levels[0].shards == (rec["levels"]["lo"]["file"],)
    table = shards.read_level_table(tmp_path, "lo")
    frames = tensors.frames_array(table)
    assert frames.shape == (1, 2, 1, 2, 2, 3) and frames.ravel().tolist() == list(range(24))
    assert table.column("frame_indices").combine_chunks().to_numpy_ndarray().tolist() == [[[0], [1]]]


def test_a_part_missing_chunks_of_a_video_refuses_to_commit(tmp_path):
    table = staged("a").slice(0, 1)
    table = table.set_column(table.schema.get_field_index("num_chunks"), "num_chunks", pa.array([2], pa.int32()))
    writer = shards.PartWriter(tmp_path, [LEVEL], "zstd")
    writer.add(table)
    with pytest.raises(RuntimeError, match="split across write tasks"):
        writer.commit()
    assert shards.committed_parts(tmp_path) == []


def test_retry_failed_needs_a_previous_manifest_and_excludes_overwrite(tmp_path):
    with pytest.raises(LofiError, match="--retry-failed.*manifest.json does not exist.*without --retry-failed"):
        previous_errors(config(tmp_path / "out", retry_failed=True))
    with pytest.raises(ValueError, match="overwrite and retry_failed"):
        config(tmp_path / "out", retry_failed=True, overwrite=True)


def test_forgotten_failures_count_as_not_done_and_written_videos_stay(tmp_path):
    out = shards.shards_location(tmp_path)
    mixed = shards.PartWriter(out, [LEVEL], "zstd")
    mixed.add(staged("a"))  # "a" written, "bad" failed
    mixed = mixed.commit()
    alone = shards.PartWriter(out, [LEVEL], "zstd")
    alone.add(pa.Table.from_pylist([{"video_id": "crash", "path": "/v/crash.mp4", "stage": "decode-crash",
                                     "error": "died", "decode_sec": 0.0}], schema=shards.STAGING_SCHEMA))
    alone.commit()
    assert committed_ids(out) == {"a", "bad", "crash"}
    forget_failures(out, {"bad", "crash", "a"})  # "a" was written: not a failure, kept
    (record,) = shards.committed_parts(out)  # the failure-only record went
    assert record["part"] == mixed["part"] and record["video_ids"] == ["a"]
    assert record["failed_ids"] == [] and record["errors"] == [] and record["levels"] == mixed["levels"]
    assert committed_ids(out) == {"a"}


def test_only_dead_processes_are_retried_alone_other_task_errors_fail_the_run():
    from ray.exceptions import WorkerCrashedError

    errors, logger = _TaskErrors(), logging.getLogger("lofi-test-task-errors")
    logger.addHandler(errors)
    logger.error("a task died", exc_info=WorkerCrashedError())
    errors.raise_unless_deaths()  # a dead process: its videos are decoded again alone
    assert errors.deaths().startswith("WorkerCrashedError: ")
    logger.error("a task raised", exc_info=OSError("No space left on device"))
    with pytest.raises(OSError, match="No space left"):  # a full disk would fail every retry too
        errors.raise_unless_deaths()
    logger.removeHandler(errors)
