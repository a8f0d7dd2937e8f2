"""`lofi extract` on `lofi synth` videos: Ray Data batch inference of a tiny encoder into feature shards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lofi.config import from_dict
from lofi.errors import LofiError
from lofi.models.encoders import EncoderConfig, build_encoder
from pipelines.cli import main as lofi_main
from pipelines.config import PipelineConfig
from pipelines.extract import run
from pipelines.features import features_array, read_features, read_features_manifest, video_features
from pipelines.prepare import PrepareConfig, run as prepare
from pipelines.shards import frames_array, read_level_table

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


def pipeline_cfg(tmp_path: Path, prepared: Path, checkpoint: Path, level: str, **extract) -> PipelineConfig:
    return from_dict(PipelineConfig, {
        "run": {"name": f"x_{level}", "storage": str(tmp_path)},
        "data": {"shards": str(prepared), "full_level": level},
        "encoder": {"width": WIDTH, "checkpoint": str(checkpoint)},
        "extract": {"batch_size": 2, "num_actors": 1, **extract},
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


@pytest.fixture(scope="module")
def whole(prepared, checkpoint, tmp_path_factory):
    cfg = pipeline_cfg(tmp_path_factory.mktemp("runs"), prepared, checkpoint, "whole")
    return cfg, run(cfg, verbose=False)


def test_one_row_per_good_video_with_features_of_shape_T_by_D(whole, synth_small):
    cfg, result = whole
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
    assert (manifest["feature_dim"], manifest["num_snippets"], manifest["fixed_grid"]) == (WIDTH * 8, 8, True)
    assert manifest["counts"]["videos"] == 6 and manifest["encoder"]["checkpoint"] == str(cfg.encoder.checkpoint)
    subsets = [database[v]["subset"] for v in good]
    assert manifest["counts"]["per_subset"] == {s: subsets.count(s) for s in set(subsets)}
    training = read_features(result.out_dir, "training")
    assert training.column("video_id").to_pylist() == [v for v in good if database[v]["subset"] == "training"]
    with pytest.raises(LofiError, match="no video of subset 'testing'; subsets there: "):
        read_features(result.out_dir, "testing")
    assert not list(Path(result.out_dir).parent.glob("features.tmp-*"))


def test_features_equal_the_encoder_applied_to_the_frames_directly(whole, prepared, checkpoint):
    _, result = whole
    expected = direct_features(prepared, "whole", checkpoint)
    got = video_features(read_features(result.out_dir))
    assert sorted(got) == sorted(expected)
    for vid, feats in got.items():
        np.testing.assert_allclose(feats, expected[vid], rtol=1e-4, atol=1e-5)


def test_chunked_rows_assemble_to_the_unchunked_features(whole, prepared, checkpoint, tmp_path):
    _, unchunked = whole
    cfg = pipeline_cfg(tmp_path, prepared, checkpoint, "chunked", batch_size=3)
    assert read_level_table(prepared, "chunked", ["num_chunks"]).column("num_chunks").to_pylist()[0] == 4
    chunked = video_features(read_features(run(cfg, verbose=False).out_dir))
    reference = video_features(read_features(unchunked.out_dir))
    assert sorted(chunked) == sorted(reference)
    for vid in reference:
        np.testing.assert_allclose(chunked[vid], reference[vid], rtol=1e-4, atol=1e-5)


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
    assert not read_features_manifest(result.out_dir)["fixed_grid"]


def test_a_missing_checkpoint_is_one_clear_error(prepared, tmp_path, capsys):
    argv = ["extract", "--set", f"run.storage={tmp_path}", "--set", f"data.shards={prepared}",
            "--set", "encoder.checkpoint=/nonexistent/encoder.pt", "--set", "tracking.enabled=false"]
    assert lofi_main(argv) == 2
    err = capsys.readouterr().err
    assert "encoder.checkpoint /nonexistent/encoder.pt does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("resources, num_actors, cpus, expected", [
    ({"CPU": 2.0}, 2, 1.0, 1),  # two actors would hold both CPUs and starve the shard reads
    ({"CPU": 2.0}, 1, 1.0, 1),
    ({"CPU": 64.0}, 4, 8.0, 4),  # 7 would fit
    ({"CPU": 16.0, "GPU": 2.0}, 8, 1.0, 2),  # one GPU per actor
    ({"CPU": 1.0}, 3, 1.0, 1),  # never fewer than one
])
def test_actor_pool_leaves_a_cpu_for_reading_and_one_gpu_per_actor(resources, num_actors, cpus, expected):
    from pipelines.extract import pool_size

    cfg = from_dict(PipelineConfig, {"extract": {"num_actors": num_actors}, "scaling": {"cpus_per_worker": cpus}})
    assert pool_size(cfg, resources, use_gpu="GPU" in resources) == expected
