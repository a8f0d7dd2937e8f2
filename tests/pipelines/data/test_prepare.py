"""`lofi prepare` end to end on `lofi synth` videos, the shared Ray cluster and decord."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import decord
import numpy as np
import pytest
import yaml
from PIL import Image

from lofi.config import from_dict
from lofi.errors import LofiError
from lofi_cli.commands import main as lofi_main
from pipelines.data.prepare import PrepareConfig, run
from pipelines.data.shards import committed_parts, read_level_dataset, read_level_table
from pipelines.data.tensors import frames_array

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[3]
LEVELS = [
    {"name": "lo", "num_snippets": 8, "frames_per_snippet": 2, "size_px": 32},
    {"name": "hi", "num_snippets": 8, "frames_per_snippet": 2, "size_px": 48, "storage": "jpeg"},
    {"name": "stride", "snippet_stride_sec": 4.0, "frames_per_snippet": 2, "size_px": 32, "snippets_per_row": 4},
]


def config_dict(data: Path, out: Path, **extra) -> dict:
    return {"input": {"annotations": str(data / "annotations.json"), "videos": str(data / "videos")},
            "output": str(out), "levels": LEVELS, "num_workers": 2, "videos_per_part": 2, **extra}


def synth_facts(data: Path) -> tuple[dict, set[str], set[str]]:
    """Annotations as written by synth (raw JSON, not our loader), good ids, corrupt ids."""
    database = json.loads((data / "annotations.json").read_text())["database"]
    corrupt = set(json.loads((data / "synth_summary.json").read_text())["corrupt_ids"])
    return database, set(database) - corrupt, corrupt


@pytest.fixture(scope="module")
def prepared(ray_cluster, synth_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "out"
    cfg = from_dict(PrepareConfig, config_dict(synth_small, out))
    return cfg, run(cfg, verbose=False)


def test_exactly_the_corrupt_videos_fail_and_all_others_are_written(prepared, synth_small):
    cfg, result = prepared
    _, good, corrupt = synth_facts(synth_small)
    assert len(corrupt) == 3
    assert {e["video_id"] for e in result.errors} == corrupt and len(result.errors) == 3
    assert all(e["stage"] == "open" and e["error"] and e["path"].endswith(".mp4") for e in result.errors)
    assert (result.videos_total, result.videos_ok, result.videos_failed) == (9, 6, 3)
    manifest = json.loads(Path(result.manifest_path).read_text())
    assert manifest["errors"] == list(result.errors)
    for name in ("lo", "hi", "stride"):
        assert set(read_level_table(cfg.output, name, ["video_id"]).column("video_id").to_pylist()) == good
    # 3 of 9 failed: above the default max_error_fraction of 0.05
    assert result.too_many_errors


def test_rows_have_the_level_shapes_and_the_annotations(prepared, synth_small):
    cfg, _ = prepared
    database, good, _ = synth_facts(synth_small)
    labels = sorted({a["label"] for v in database.values() for a in v["annotations"]})
    for name, size, storage in (("lo", 32, "uint8"), ("hi", 48, "jpeg")):
        table = read_level_table(cfg.output, name)
        frames = frames_array(table)
        assert frames.shape == (6, 8, 2, size, size, 3) and frames.dtype == np.uint8
        assert ("frames_jpeg" in table.column_names) == (storage == "jpeg")
        for row in table.select(["video_id", "subset", "duration_sec", "fps", "segment_start_sec", "segment_end_sec",
                                 "segment_label", "segment_label_id", "fidelity"]).to_pylist():
            truth = database[row["video_id"]]
            assert row["fidelity"] == name and row["subset"] == truth["subset"]
            assert row["duration_sec"] == pytest.approx(truth["duration"]) and row["fps"] == pytest.approx(10.0)
            assert row["segment_start_sec"] == pytest.approx([a["segment"][0] for a in truth["annotations"]])
            assert row["segment_end_sec"] == pytest.approx([a["segment"][1] for a in truth["annotations"]])
            assert row["segment_label"] == [a["label"] for a in truth["annotations"]]
            assert row["segment_label_id"] == [labels.index(a["label"]) for a in truth["annotations"]]


def test_timestamps_cover_each_video_evenly(prepared):
    cfg, _ = prepared
    table = read_level_table(cfg.output, "lo")
    times = table.column("timestamps_sec").combine_chunks().to_numpy_ndarray()  # (N, T, F)
    for row_times, duration in zip(times, table.column("duration_sec").to_pylist()):
        d = duration / 8
        # snippet t's two frames are the frames nearest (t + 0.25) d and (t + 0.75) d: within half a frame
        expected = (np.arange(8)[:, None] + np.array([0.25, 0.75])[None, :]) * d
        assert np.abs(row_times - expected).max() <= 0.05 + 1e-9
        assert row_times.min() >= 0 and row_times.max() < duration


def test_stride_level_chunks_cover_every_snippet(prepared):
    cfg, _ = prepared
    table = read_level_table(cfg.output, "stride")
    for vid in set(table.column("video_id").to_pylist()):
        rows = [r for r in table.select(["video_id", "duration_sec", "num_snippets", "chunk_index", "num_chunks",
                                         "snippet_start", "num_valid_snippets"]).to_pylist() if r["video_id"] == vid]
        total = math.ceil(rows[0]["duration_sec"] / 4.0)
        assert [r["chunk_index"] for r in rows] == list(range(math.ceil(total / 4)))
        assert sum(r["num_valid_snippets"] for r in rows) == total == rows[0]["num_snippets"]
        assert [r["snippet_start"] for r in rows] == list(range(0, total, 4))


def test_frames_are_the_videos_own_frames(prepared, synth_small):
    """Every row's frames match an independent decode of its own video (no mix-ups across videos)."""
    cfg, _ = prepared
    table = read_level_table(cfg.output, "lo")
    frames = frames_array(table).reshape(len(table), 16, 32, 32, 3).astype(np.int16)
    indices = table.column("frame_indices").combine_chunks().to_numpy_ndarray().reshape(len(table), 16)
    refs = []
    for vid, idx in zip(table.column("video_id").to_pylist(), indices):
        native = decord.VideoReader(str(synth_small / "videos" / f"{vid}.mp4")).get_batch(idx.tolist()).asnumpy()
        refs.append(np.stack([np.asarray(Image.fromarray(f).resize((32, 32), Image.BILINEAR)) for f in native]))
    refs = np.stack(refs).astype(np.int16)
    for i in range(len(table)):
        errors = [np.abs(frames[i] - refs[j]).mean() for j in range(len(table))]
        assert errors[i] < 5.0 and int(np.argmin(errors)) == i, errors


def test_exit_status_follows_max_error_fraction(prepared, tmp_path):
    cfg, _ = prepared
    config = tmp_path / "prepare.yaml"
    config.write_text(yaml.safe_dump(json.loads(json.dumps(config_dict(Path(cfg.input.annotations).parent,
                                                                       Path(cfg.output))))))
    # a rerun on the finished output: nothing left to decode, only the verdict
    assert lofi_main(["prepare", "--config", str(config), "--quiet"]) == 1
    assert lofi_main(["prepare", "--config", str(config), "--quiet", "--set", "max_error_fraction=0.5"]) == 0


def test_ray_dataset_reader_feeds_torch(prepared):
    cfg, _ = prepared
    for name, size in (("lo", 32), ("hi", 48)):
        batches = list(read_level_dataset(cfg.output, name).iter_torch_batches(batch_size=4))
        assert sum(len(b["frames"]) for b in batches) == 6
        assert tuple(batches[0]["frames"].shape[1:]) == (8, 2, size, size, 3)
        assert str(batches[0]["frames"].dtype) == "torch.uint8"
        assert tuple(batches[0]["timestamps_sec"].shape[1:]) == (8, 2)


def test_shards_read_with_plain_pyarrow_without_ray(prepared):
    cfg, _ = prepared
    code = ("import sys; from pipelines.data.shards import read_level_table; from pipelines.data.tensors import frames_array; "
            f"t = read_level_table({cfg.output!r}, 'hi'); f = frames_array(t); "
            "assert f.shape == (6, 8, 2, 48, 48, 3), f.shape; "
            "assert 'ray' not in sys.modules, 'ray was imported'; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_changed_config_is_refused_and_overwrite_starts_over(prepared, synth_small, tmp_path):
    cfg, _ = prepared
    out = tmp_path / "out"
    small = {**config_dict(synth_small, out), "levels": LEVELS[:1], "input": {
        "annotations": str(synth_small / "annotations.json"), "videos": str(synth_small / "videos"), "limit": 4}}
    first = run(from_dict(PrepareConfig, small), verbose=False)
    assert first.videos_total == 4
    changed = {**small, "levels": [{**LEVELS[0], "size_px": 40}]}
    with pytest.raises(LofiError, match="different config.*levels.*--overwrite"):
        run(from_dict(PrepareConfig, changed), verbose=False)
    again = run(from_dict(PrepareConfig, {**changed, "overwrite": True}), verbose=False)
    assert again.videos_skipped == 0
    assert frames_array(read_level_table(out, "lo")).shape[-2] == 40


def wait_for_parts(out: Path, proc: subprocess.Popen, at_least: int, timeout_sec: float) -> int:
    deadline = time.monotonic() + timeout_sec
    while time.monotonic() < deadline and proc.poll() is None:
        n = len(list((out / "_parts").glob("part-*.json"))) if (out / "_parts").is_dir() else 0
        if n >= at_least:
            return n
        time.sleep(0.01)
    raise AssertionError(f"no {at_least} committed parts before the process ended (rc={proc.poll()})")


def test_killed_run_resumes_to_the_same_dataset(prepared, synth_small, tmp_path):
    import ray

    cfg, _ = prepared
    out = tmp_path / "out"
    config = tmp_path / "prepare.yaml"
    config.write_text(yaml.safe_dump(config_dict(synth_small, out, num_workers=1, videos_per_part=1)))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "lofi_cli", "prepare", "--config", str(config), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_parts(out, proc, at_least=1, timeout_sec=90)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    # Ray kills a dead driver's tasks; wait until no late commit shows up for a second
    counts = [len(committed_parts(out))]
    while len(counts) < 5 or len(set(counts[-5:])) > 1:
        time.sleep(0.25)
        counts.append(len(committed_parts(out)))
    interrupted = committed_parts(out)
    assert 1 <= len(interrupted) < 9 and not (out / "manifest.json").exists()
    resumed = run(from_dict(PrepareConfig, config_dict(synth_small, out)), verbose=False)
    assert resumed.videos_skipped == sum(len(p["video_ids"]) + len(p["failed_ids"]) for p in interrupted) >= 1
    assert {e["video_id"] for e in resumed.errors} == {e["video_id"] for e in prepared[1].errors}
    for name in ("lo", "hi", "stride"):
        a, b = read_level_table(out, name), read_level_table(cfg.output, name)
        keys = list(zip(a.column("video_id").to_pylist(), a.column("chunk_index").to_pylist()))
        assert len(keys) == len(set(keys))  # no duplicates
        # same rows, same bytes as the uninterrupted run (timestamps apart: NaN padding != NaN)
        assert a.drop_columns(["timestamps_sec"]).equals(b.drop_columns(["timestamps_sec"])), name
        np.testing.assert_array_equal(a.column("timestamps_sec").combine_chunks().to_numpy_ndarray(),
                                      b.column("timestamps_sec").combine_chunks().to_numpy_ndarray())
    on_disk = {p.relative_to(out).as_posix() for p in out.glob("*/part-*.parquet")}
    listed = {f for lv in json.loads((out / "manifest.json").read_text())["levels"] for f in lv["shards"]}
    assert on_disk == listed and not (out / ".tmp").exists()


def test_a_tuning_split_and_a_level_keeping_the_full_frame_spacing(ray_cluster, synth_small, tmp_path, capsys):
    """Training videos held out as subset "tuning" (ids in the manifest, the same ones `lofi eval
    --tuning-videos` relabels), and a 2-snippet level whose frames keep an 8-snippet grid's spacing."""
    levels = [{"name": "full", "num_snippets": 8, "frames_per_snippet": 2, "size_px": 32},
              {"name": "sparse", "num_snippets": 2, "frames_per_snippet": 2, "size_px": 32, "spacing_snippets": 8}]
    cfg = from_dict(PrepareConfig, {**config_dict(synth_small, tmp_path / "out"), "levels": levels,
                                    "max_error_fraction": 1.0,
                                    "input": {**config_dict(synth_small, tmp_path)["input"], "tuning_fraction": 0.5,
                                              "tuning_seed": 7}})
    run(cfg, verbose=False)
    database, good, _ = synth_facts(synth_small)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    training = sorted(v for v, e in database.items() if e["subset"] == "training")
    tuning = manifest["tuning"]["video_ids"]
    assert len(tuning) == round(len(training) / 2) and set(tuning) <= set(training)
    table = read_level_table(tmp_path / "out", "sparse")
    subsets = dict(zip(table.column("video_id").to_pylist(), table.column("subset").to_pylist()))
    assert {v for v, s in subsets.items() if s == "tuning"} == set(tuning) & good
    for row in table.to_pylist():  # frames 1/16 of the video apart, centred on each half's centre
        times, d = np.asarray(row["timestamps_sec"]).reshape(2, 2), row["duration_sec"]
        expected = [[d / 4 - d / 32, d / 4 + d / 32], [3 * d / 4 - d / 32, 3 * d / 4 + d / 32]]
        np.testing.assert_allclose(times, expected, atol=0.05 + 1e-9)  # the nearest frames: within half a frame
    # predictions equal to the tuning videos' ground truth score 1 on subset tuning, whose videos the
    # annotation file calls training
    results = {v: [{"label": s["label"], "score": 1.0, "segment": s["segment"]} for s in database[v]["annotations"]]
               for v in tuning}
    (tmp_path / "pred.json").write_text(json.dumps({"results": results}))
    assert lofi_main(["eval", "--ground-truth", str(synth_small / "annotations.json"), "--predictions",
                      str(tmp_path / "pred.json"), "--subset", "tuning", "--tuning-videos",
                      str(tmp_path / "out" / "manifest.json"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["num_videos"] == len(tuning) and scored["average_mAP"] == pytest.approx(1.0)
