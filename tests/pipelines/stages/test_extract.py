"""`lofi extract` on `lofi synth` videos: Ray Data batch inference of a tiny encoder into feature shards."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from lofi.config import from_dict
from lofi.errors import LofiError
from lofi.models.encoders import EncoderConfig, build_encoder
from pipelines.stages import extract
from lofi_cli.commands import main as lofi_main
from pipelines.config import PipelineConfig
from pipelines.stages.extract import run
from pipelines.data.features import (FEATURES_MANIFEST, SUMMARY_COLUMNS, features_array, read_features,
                                read_features_manifest, video_features)
from pipelines.data.prepare import PrepareConfig, run as prepare
from pipelines.data.shards import read_level_table
from pipelines.data.tensors import frames_array

pytestmark = pytest.mark.ray
WIDTH = 8
LEVELS = [
    {"name": "whole", "num_snippets": 8, "frames_per_snippet": 2, "size_px": 32},
    # the same frames as `whole`, 2 snippets per row: 4 chunks per video
    {"name": "chunked", "num_snippets": 8, "frames_per_snippet": 2, "size_px": 32, "snippets_per_row": 2},
    # T = ceil(duration / 4 s) per video; rows of 4 snippets, the last one zero-padded
    {"name": "stride", "snippet_stride_sec": 4.0, "frames_per_snippet": 2, "size_px": 32, "snippets_per_row": 4,
     "storage": "jpeg"},
]


@pytest.fixture(scope="module")
def prepared(ray_cluster, synth_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extract") / "prepared"
    cfg = from_dict(PrepareConfig, {"input": {"annotations": str(synth_small / "annotations.json"),
                                              "videos": str(synth_small / "videos")},
                                    "output": str(out), "levels": LEVELS, "num_workers": 2, "videos_per_part": 3,
                                    "max_error_fraction": 1.0})
    prepare(cfg, verbose=False)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(width=WIDTH))
    path = tmp_path_factory.mktemp("ckpt") / "encoder.pt"
    torch.save(encoder.state_dict(), path)
    return path


def pipeline_cfg(tmp_path: Path, prepared: Path, checkpoint: Path, level: str, scaling: dict | None = None,
                 **extract) -> PipelineConfig:
    return from_dict(PipelineConfig, {
        "run": {"name": f"x_{level}", "storage": str(tmp_path)},
        "data": {"shards": str(prepared), "full_level": level},
        "encoder": {"width": WIDTH, "checkpoint": str(checkpoint)},
        "extract": {"batch_size": 2, "num_actors": 1, **extract},
        "scaling": scaling or {},
        "tracking": {"enabled": False},
    })


def direct_features(prepared: Path, level: str, checkpoint: Path) -> dict[str, np.ndarray]:
    """The encoder applied to each video's frames without Ray: the reference for extraction."""
    encoder = build_encoder(EncoderConfig(width=WIDTH, checkpoint=str(checkpoint))).eval()
    table = read_level_table(prepared, level)
    frames = frames_array(table)  # (rows, Tc, F, S, S, 3)
    out: dict[str, list] = {}
    with torch.no_grad():
        for i, row in enumerate(table.select(["video_id", "num_valid_snippets"]).to_pylist()):
            feats = encoder(torch.from_numpy(frames[i : i + 1].copy()))[0].T.numpy()  # (1, D, Tc) -> (Tc, D)
            out.setdefault(row["video_id"], []).append(feats[: row["num_valid_snippets"]])
    return {vid: np.concatenate(chunks) for vid, chunks in out.items()}  # rows come sorted by chunk_index


DRIVER_READS = ("take_all", "take", "take_batch", "iter_rows", "iter_batches", "to_pandas")


@pytest.fixture(scope="module")
def whole(prepared, checkpoint, tmp_path_factory):
    """Extraction at level `whole`, recording every row or batch a Ray Dataset hands the driver."""
    import ray.data

    received: list[dict] = []
    depth = [0]  # only the outermost read records: take_all reads through iter_rows

    def spy(method):
        def read(self, *args, **kwargs):
            depth[0] += 1
            try:
                out = method(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0]:
                return out
            if isinstance(out, (list, dict)):
                received.extend(out if isinstance(out, list) else [out])
                return out
            return _record(out, received)
        return read

    cfg = pipeline_cfg(tmp_path_factory.mktemp("runs"), prepared, checkpoint, "whole")
    with pytest.MonkeyPatch.context() as patch:
        for name in DRIVER_READS:
            patch.setattr(ray.data.Dataset, name, spy(getattr(ray.data.Dataset, name)))
        result = run(cfg, verbose=False)
    return cfg, result, received


def _record(items, received):
    for item in items:
        received.append(dict(item))
        yield item


def folder_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_the_driver_receives_per_video_summaries_and_no_features(whole):
    _, result, received = whole
    assert [sorted(r["video_id"] for r in received)] == [read_features(result.out_dir).column("video_id").to_pylist()]
    for row in received:
        assert set(row) == set(SUMMARY_COLUMNS) and all(np.ndim(v) == 0 for v in row.values())
    assert len(pickle.dumps(received)) < 2048  # the features alone are 6 videos x (8, 64) float32 = 12 KiB


def test_features_folder_is_committed_whole(whole):
    _, result, _ = whole
    out = Path(result.out_dir)
    manifest = read_features_manifest(out)
    assert folder_files(out) == {FEATURES_MANIFEST, *manifest.files}  # nothing the manifest does not name
    assert read_features(out).num_rows == manifest.counts.videos == 6
    written_last = (out / FEATURES_MANIFEST).stat().st_mtime_ns
    assert all((out / f).stat().st_mtime_ns <= written_last for f in manifest.files)
    assert [p.name for p in out.parent.iterdir()] == ["features"]  # no temp or old folder beside it


def test_one_row_per_good_video_with_features_of_shape_T_by_D(whole, synth_small):
    cfg, result, _ = whole
    database = json.loads((synth_small / "annotations.json").read_text())["database"]
    corrupt = set(json.loads((synth_small / "synth_summary.json").read_text())["corrupt_ids"])
    good = sorted(set(database) - corrupt)
    table = read_features(result.out_dir)
    assert table.column("video_id").to_pylist() == good
    assert features_array(table).shape == (6, 8, WIDTH * 8) and features_array(table).dtype == np.float32
    for row in table.drop_columns(["features"]).to_pylist():
        truth = database[row["video_id"]]
        assert row["subset"] == truth["subset"] and row["num_snippets"] == 8
        assert row["duration_sec"] == pytest.approx(truth["duration"])
        assert row["segment_start_sec"] == pytest.approx([a["segment"][0] for a in truth["annotations"]])
        assert row["segment_label"] == [a["label"] for a in truth["annotations"]]
    manifest = read_features_manifest(result.out_dir)
    assert (manifest.feature_dim, manifest.num_snippets, manifest.fixed_grid) == (WIDTH * 8, 8, True)
    assert manifest.counts.videos == 6 and manifest.encoder["checkpoint"] == str(cfg.encoder.checkpoint)
    subsets = [database[v]["subset"] for v in good]
    assert manifest.counts.per_subset == {s: subsets.count(s) for s in set(subsets)}
    training = read_features(result.out_dir, "training")
    assert training.column("video_id").to_pylist() == [v for v in good if database[v]["subset"] == "training"]
    with pytest.raises(LofiError, match="no video of subset 'testing'; subsets there: "):
        read_features(result.out_dir, "testing")
    assert not list(Path(result.out_dir).parent.glob("features.tmp-*"))


def test_features_equal_the_encoder_applied_to_the_frames_directly(whole, prepared, checkpoint):
    _, result, _ = whole
    expected = direct_features(prepared, "whole", checkpoint)
    got = video_features(read_features(result.out_dir))
    assert sorted(got) == sorted(expected)
    for vid, feats in got.items():
        np.testing.assert_allclose(feats, expected[vid], rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
def test_chunks_assemble_to_the_unchunked_features_with_more_actors_than_cpus(whole, prepared, checkpoint, tmp_path):
    """4 chunks per video in batches of 3 rows: a video's chunks land in different inference calls
    (and actors, when the pool grows). extract.num_actors=4 on the 2-CPU test cluster must not hang:
    actors holding every CPU would starve the shard reads."""
    _, unchunked, _ = whole
    cfg = pipeline_cfg(tmp_path, prepared, checkpoint, "chunked", batch_size=3, num_actors=4)
    assert read_level_table(prepared, "chunked", ["num_chunks"]).column("num_chunks").to_pylist()[0] == 4
    chunked = video_features(read_features(run(cfg, verbose=False).out_dir))
    reference = video_features(read_features(unchunked.out_dir))
    assert sorted(chunked) == sorted(reference)
    for vid in reference:
        np.testing.assert_allclose(chunked[vid], reference[vid], rtol=1e-4, atol=1e-5)


def test_a_videos_chunks_assemble_by_snippet_start_in_whatever_order_they_arrive():
    from pipelines.data.features import assemble_video
    from pipelines.data.tensors import ray_tensor_column, tensor_numpy

    chunks = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)  # 3 chunks of Tc=4 snippets, D=2
    arrival = [2, 0, 1]  # T=10: the last chunk holds 2 real snippets and 2 of padding

    def rows(order):
        n = len(order)
        return pa.table({"video_id": ["v"] * n, "subset": ["training"] * n, "duration_sec": [20.0] * n,
                         "num_snippets": [10] * n, "segment_start_sec": [[1.0]] * n, "segment_end_sec": [[3.0]] * n,
                         "segment_label": [["a"]] * n, "segment_label_id": [[0]] * n, "chunk_index": order,
                         "num_chunks": [3] * n, "snippet_start": [4 * i for i in order],
                         "num_valid_snippets": [2 if i == 2 else 4 for i in order],
                         "features": ray_tensor_column(chunks[order])})

    video = assemble_video(rows(arrival), num_snippets=12)
    expected = np.zeros((1, 12, 2), dtype=np.float32)
    expected[0, :10] = np.concatenate([chunks[0], chunks[1], chunks[2, :2]])
    np.testing.assert_array_equal(tensor_numpy(video.column("features")), expected)
    assert video.drop_columns(["features"]).to_pylist() == [
        {"video_id": "v", "subset": "training", "duration_sec": 20.0, "num_snippets": 10, "segment_start_sec": [1.0],
         "segment_end_sec": [3.0], "segment_label": ["a"], "segment_label_id": [0]}]
    with pytest.raises(RuntimeError, match=r"video v: encoded chunks \[0, 2\], expected 0..2"):
        assemble_video(rows([2, 0]), num_snippets=12)


def test_stride_level_drops_padding_and_writes_one_npy_per_video(prepared, checkpoint, tmp_path, synth_small):
    cfg = pipeline_cfg(tmp_path, prepared, checkpoint, "stride", write_npy=True, chunk_snippets=3)
    result = run(cfg, verbose=False)
    database = json.loads((synth_small / "annotations.json").read_text())["database"]
    expected = direct_features(prepared, "stride", checkpoint)
    table = read_features(result.out_dir)
    padded = features_array(table)
    longest = max(math.ceil(database[v]["duration"] / 4.0) for v in expected)
    assert padded.shape == (6, longest, WIDTH * 8)
    for i, vid in enumerate(table.column("video_id").to_pylist()):
        t = math.ceil(database[vid]["duration"] / 4.0)
        npy = np.load(Path(result.out_dir) / "npy" / f"{vid}.npy")
        assert npy.shape == (t, WIDTH * 8) and npy.dtype == np.float32
        np.testing.assert_allclose(npy, expected[vid], rtol=1e-4, atol=1e-5)
        assert not padded[i, t:].any()  # the rows past this video's T are padding
    manifest = read_features_manifest(result.out_dir)
    assert not manifest.fixed_grid and manifest.npy
    assert folder_files(Path(result.out_dir)) == {FEATURES_MANIFEST, *manifest.files,
                                                  *(f"npy/{vid}.npy" for vid in expected)}


def test_a_missing_checkpoint_is_one_clear_error(prepared, tmp_path, capsys):
    argv = ["extract", "--set", f"run.storage={tmp_path}", "--set", f"data.shards={prepared}",
            "--set", "encoder.checkpoint=/nonexistent/encoder.pt", "--set", "tracking.enabled=false"]
    assert lofi_main(argv) == 2
    err = capsys.readouterr().err
    assert "encoder.checkpoint /nonexistent/encoder.pt does not exist" in err and "Traceback" not in err


@pytest.mark.timeout(300)
def test_a_failed_worker_write_leaves_the_previous_features_and_a_rerun_replaces_them(whole, prepared, checkpoint,
                                                                                      tmp_path, monkeypatch):
    _, previous, _ = whole
    cfg = pipeline_cfg(tmp_path, prepared, checkpoint, "whole")
    out = Path(cfg.run.features().uri)
    shutil.copytree(previous.out_dir, out)
    (out / "from-the-previous-run").write_text("")
    before = {f: (out / f).read_bytes() for f in folder_files(out)}
    last = max(read_features(out).column("video_id").to_pylist())
    write = extract.write_videos

    def write_then_fail(batch, **kwargs):  # runs in a Ray worker: a nested function travels by value
        summary = write(batch, **kwargs)  # this part lands in the temp folder before the failure
        if last in batch.column("video_id").to_pylist():
            raise OSError("injected: disk full")
        return summary

    monkeypatch.setattr(extract, "write_videos", write_then_fail)
    with pytest.raises(Exception, match="injected: disk full"):
        run(cfg, verbose=False)
    assert {f: (out / f).read_bytes() for f in folder_files(out)} == before
    assert [p.name for p in out.parent.iterdir()] == ["features"]  # the temp folder is gone

    monkeypatch.setattr(extract, "write_videos", write)
    run(cfg, verbose=False)
    assert folder_files(out) == {FEATURES_MANIFEST, *read_features_manifest(out).files}
    assert [p.name for p in out.parent.iterdir()] == ["features"]  # the old folder is gone too


@pytest.mark.timeout(300)
def test_use_gpu_without_a_gpu_node_fails_clearly_after_the_autoscaler_wait(prepared, checkpoint, tmp_path,
                                                                              monkeypatch, capsys):
    import ray
    import ray.data

    if ray.cluster_resources().get("GPU"):
        pytest.skip("the test cluster has a GPU")
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 3)
    cfg = pipeline_cfg(tmp_path, prepared, checkpoint, "whole", scaling={"use_gpu": True})
    with pytest.raises(LofiError, match="no node with 1 CPU and a GPU joined the cluster within 3 s "
                                        r".*or set scaling.use_gpu=false"):
        run(cfg, verbose=False)
    assert "waiting up to 3 s for the autoscaler" in capsys.readouterr().err
    assert list((tmp_path / "x_whole").iterdir()) == []  # its temp features folder removed


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_use_gpu_gives_each_actor_a_gpu_and_the_features_of_the_cpu_encoder(prepared, checkpoint, tmp_path):
    import ray

    if not ray.cluster_resources().get("GPU"):
        pytest.skip("the test cluster has no GPU")
    cfg = pipeline_cfg(tmp_path, prepared, checkpoint, "whole", scaling={"use_gpu": True})
    got = video_features(read_features(run(cfg, verbose=False).out_dir))
    expected = direct_features(prepared, "whole", checkpoint)
    assert sorted(got) == sorted(expected)
    for vid, feats in got.items():  # cuDNN convolutions may use TF32: looser than the CPU comparison
        np.testing.assert_allclose(feats, expected[vid], rtol=1e-2, atol=1e-3)
