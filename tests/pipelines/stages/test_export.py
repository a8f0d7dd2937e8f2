"""`lofi export-features`: real extracted features, read back the way ActionFormer and OpenTAD read them.

The two readers below are written from those toolkits' dataset classes (ActionFormer's
`libs/datasets/anet.py`, OpenTAD's `AnetPaddingDataset` / `AnetResizeDataset` with `LoadFeats`):
open the JSON, keep a subset, map labels through the label map, load
`<feat_folder>/<prefix><id>.npy`, and turn segment seconds into feature-grid coordinates with
their fps / stride / offset formulas. The check that needs no code under test: every snippet's
sampled frames (their times, recorded in the shards by `lofi prepare`) must land at that
feature's own place in the reader's grid, and the ground truth on the snippets it covers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lofi.config import from_dict
from lofi.models.encoders import EncoderConfig, build_encoder
from lofi_cli.commands import main as lofi_main
from pipelines.config import PipelineConfig
from pipelines.stages.extract import run as extract
from pipelines.data.features import read_features, read_features_manifest, video_features
from pipelines.data.prepare import PrepareConfig, run as prepare
from pipelines.data.shards import read_level_table

pytestmark = pytest.mark.ray
WIDTH = 8
STRIDE_SEC = 4.0
LEVELS = [{"name": "grid", "num_snippets": 8, "frames_per_snippet": 2, "size_px": 32},
          {"name": "stride", "snippet_stride_sec": STRIDE_SEC, "frames_per_snippet": 2, "size_px": 32}]


@pytest.fixture(scope="module")
def features(ray_cluster, synth_small, tmp_path_factory) -> dict[str, Path]:
    """level -> the features folder `lofi extract` wrote for it (6 videos, a tiny random encoder)."""
    root = tmp_path_factory.mktemp("export")
    prepare(from_dict(PrepareConfig, {
        "input": {"annotations": str(synth_small / "annotations.json"), "videos": str(synth_small / "videos")},
        "output": str(root / "prepared"), "levels": LEVELS, "num_workers": 2, "videos_per_part": 3,
        "max_error_fraction": 1.0}), verbose=False)
    torch.manual_seed(0)
    torch.save(build_encoder(EncoderConfig(width=WIDTH)).state_dict(), root / "encoder.pt")
    out = {}
    for level in ("grid", "stride"):
        cfg = from_dict(PipelineConfig, {
            "run": {"name": level, "storage": str(root / "runs")},
            "data": {"shards": str(root / "prepared"), "full_level": level},
            "encoder": {"width": WIDTH, "checkpoint": str(root / "encoder.pt")},
            "extract": {"batch_size": 3}, "tracking": {"enabled": False}})
        out[level] = Path(extract(cfg, verbose=False).out_dir)
    return out


@pytest.fixture(scope="module")
def exported(features, tmp_path_factory) -> dict[str, Path]:
    """level -> `lofi export-features FEATURES OUT --file-prefix v_` output, through the CLI."""
    root = tmp_path_factory.mktemp("exported")
    for level, folder in features.items():
        assert lofi_main(["export-features", str(folder), str(root / level), "--file-prefix", "v_"]) == 0
    return {level: root / level for level in features}


# The readers ---------------------------------------------------------------------------------

def actionformer_read(out: Path, split: list[str]) -> list[dict]:
    """ActionFormer's ActivityNet dataset (`dataset_name: anet`) with toolkits.json's dataset keys."""
    cfg = json.loads((out / "toolkits.json").read_text())["actionformer"]["dataset"]
    database = json.loads((out / cfg["json_file"]).read_text())["database"]
    label_dict = {a["label"]: a["label_id"] for v in database.values() for a in v["annotations"]}
    items = []
    for key, value in database.items():
        if value["subset"].lower() not in split:
            continue
        feats = np.load(out / cfg["feat_folder"] / f"{cfg['file_prefix']}{key}{cfg['file_ext']}").astype(np.float32)
        fps = cfg["default_fps"] if cfg["default_fps"] is not None else value["fps"]
        if cfg["feat_stride"] > 0:
            stride, num_frames = cfg["feat_stride"], cfg["num_frames"]
        else:  # fixed-length features: the stride follows from the video's duration
            assert feats.shape[0] <= cfg["max_seq_len"]
            seq_len = cfg["max_seq_len"] if cfg["force_upsampling"] else feats.shape[0]
            stride = value["duration"] * fps / seq_len
            num_frames = stride * cfg["num_frames"]
        items.append({"id": key, "feats": feats, "duration": value["duration"],
                      "to_grid": lambda sec, fps=fps, s=stride, n=num_frames: (np.asarray(sec) * fps - 0.5 * n) / s,
                      "centre": lambda i: float(i),  # feature i sits at grid point i
                      "segments": [a["segment"] for a in value["annotations"]],
                      "labels": [label_dict[a["label"]] for a in value["annotations"]]})
    return items


def opentad_read(out: Path, subset_name: str) -> list[dict]:
    """OpenTAD's AnetPaddingDataset / AnetResizeDataset with LoadFeats, from toolkits.json's keys."""
    cfg = json.loads((out / "toolkits.json").read_text())["opentad"]
    class_map = [line.rstrip("\n") for line in (out / cfg["class_map"]).read_text(encoding="utf8").splitlines(True)]
    database = json.loads((out / cfg["ann_file"]).read_text())["database"]
    load = cfg["LoadFeats"]
    items = []
    for name, info in database.items():
        if info["subset"] not in subset_name:
            continue
        feats = np.load(out / cfg["data_path"] / f"{load['prefix']}{name}.{load['feat_format']}").astype(np.float32)
        duration = float(info["duration"])
        if cfg["dataset_type"] == "AnetPaddingDataset":
            fps = cfg["fps"] if cfg["fps"] > 0 else info["frame"] / duration
            stride, offset = int(cfg["feature_stride"] * cfg["sample_stride"]), int(cfg["offset_frames"])
            assert (stride, offset) == (cfg["feature_stride"], cfg["offset_frames"])  # int() would truncate
            to_grid = lambda sec, fps=fps, s=stride, o=offset: (np.asarray(sec) * fps - o) / s  # noqa: E731
            centre = float
        else:  # ResizeFeat: the features resampled to resize_length bins over [0, duration]
            assert cfg["dataset_type"] == "AnetResizeDataset" and feats.shape[0] == cfg["resize_length"]
            to_grid = lambda sec, d=duration, n=cfg["resize_length"]: np.clip(np.asarray(sec) / d, 0, 1) * n  # noqa: E731
            centre = lambda i: i + 0.5  # noqa: E731 -- bin i spans [i, i + 1)
        items.append({"id": name, "feats": feats, "duration": duration, "to_grid": to_grid, "centre": centre,
                      "segments": [a["segment"] for a in info["annotations"]],
                      "labels": [class_map.index(a["label"]) for a in info["annotations"]]})
    return items


def sampled_times(prepared: str, level: str) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """video -> (mean time of each snippet's sampled frames (T,), whether a frame was clipped at the
    video's end (T,), fps), from the shards `lofi prepare` wrote."""
    table = read_level_table(prepared, level, ["video_id", "timestamps_sec", "frame_indices", "num_frames", "fps",
                                               "num_valid_snippets"])
    times = table.column("timestamps_sec").combine_chunks().to_numpy_ndarray()  # (rows, Tc, F)
    index = table.column("frame_indices").combine_chunks().to_numpy_ndarray()
    out: dict[str, list] = {}
    for r, row in enumerate(table.select(["video_id", "num_frames", "fps", "num_valid_snippets"]).to_pylist()):
        v = row["num_valid_snippets"]
        chunk = out.setdefault(row["video_id"], [[], [], row["fps"]])
        chunk[0].append(times[r, :v].mean(axis=1))
        chunk[1].append((index[r, :v] >= row["num_frames"] - 1).any(axis=1))
    return {vid: (np.concatenate(t), np.concatenate(c), fps) for vid, (t, c, fps) in out.items()}


# The tests -----------------------------------------------------------------------------------

READERS = {"actionformer": lambda out, subset: actionformer_read(out, [subset]),
           "opentad": lambda out, subset: opentad_read(out, subset)}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("level", ["grid", "stride"])
def test_a_toolkit_reader_finds_every_feature_and_segment_where_the_video_has_it(exported, features, level, reader):
    out, folder = exported[level], features[level]
    table = read_features(folder)
    truth = video_features(table)
    rows = {r["video_id"]: r for r in table.drop_columns(["features"]).to_pylist()}
    manifest = read_features_manifest(folder)
    times = sampled_times(manifest.shards, manifest.level)
    seen, covered = set(), 0
    for subset in sorted({r["subset"] for r in rows.values()}):
        items = READERS[reader](out, subset)
        assert sorted(i["id"] for i in items) == sorted(v for v, r in rows.items() if r["subset"] == subset)
        for item in items:
            vid, row = item["id"], rows[item["id"]]
            seen.add(vid)
            np.testing.assert_array_equal(item["feats"], truth[vid])  # (T_i, D), no padding
            t = item["feats"].shape[0]
            expected_t = 8 if level == "grid" else math.ceil(row["duration_sec"] / STRIDE_SEC - 1e-9)
            assert item["feats"].shape == (expected_t, WIDTH * 8)
            # each snippet's sampled frames sit at its feature's place in the reader's grid (to half a frame)
            mean_sec, clipped, fps = times[vid]
            snippet_sec = row["duration_sec"] / t if level == "grid" else STRIDE_SEC
            tolerance = 0.5 / fps / snippet_sec + 1e-9
            grid = item["to_grid"](mean_sec)
            centres = np.array([item["centre"](i) for i in range(t)])
            assert np.all(np.abs(grid - centres)[~clipped] <= tolerance), (vid, grid, centres)
            # labels through the label map; each segment covers the snippets whose frames fall inside it
            assert [manifest.labels[i] for i in item["labels"]] == row["segment_label"]
            for (start, end), expected in zip(item["segments"], zip(row["segment_start_sec"], row["segment_end_sec"])):
                assert (start, end) == pytest.approx(expected)
                lo, hi = item["to_grid"]([start, end])
                margin = 0.5 / fps  # a sampled frame may lie half a frame from its snippet's centre
                clear = (np.abs(mean_sec - start) > margin) & (np.abs(mean_sec - end) > margin) & ~clipped
                inside = (start <= mean_sec) & (mean_sec <= end)
                np.testing.assert_array_equal(((lo <= centres) & (centres <= hi))[clear], inside[clear])
                covered += int(inside[clear].sum())
    assert seen == set(rows) and covered > 0  # every video, and segments that cover snippets


def test_export_layout_names_files_by_prefix_and_keys_by_video_id(exported, features):
    out = exported["stride"]
    ids = read_features(features["stride"]).column("video_id").to_pylist()
    assert sorted(p.name for p in (out / "features").iterdir()) == sorted(f"v_{v}.npy" for v in ids)
    assert sorted(json.loads((out / "annotations.json").read_text())["database"]) == sorted(ids)
    labels = list(read_features_manifest(features["stride"]).labels)
    assert (out / "category_idx.txt").read_text().splitlines() == labels
    settings = json.loads((out / "toolkits.json").read_text())
    fps = settings["fps"]
    assert settings["opentad"]["feature_stride"] == STRIDE_SEC * fps == 2 * settings["opentad"]["offset_frames"]
    assert settings["actionformer"]["dataset"]["input_dim"] == WIDTH * 8
    assert {p.name for p in out.parent.iterdir()} == {"grid", "stride"}  # no temp folder left beside OUT


def test_a_time_base_without_whole_frames_and_an_existing_out_are_clear_errors(features, exported, tmp_path, capsys):
    argv = ["export-features", str(features["stride"]), str(tmp_path / "out"), "--fps", "10.1"]
    assert lofi_main(argv) == 2
    err = capsys.readouterr().err
    # 4 s at 10.1 fps = 40.4 frames; 10.5 fps gives 42 frames, centred 21 frames in
    assert "--fps 10.1 makes the 4 s snippet stride 40.4 frames" in err and "pass --fps 10.5" in err
    assert not tmp_path.joinpath("out").exists() and list(tmp_path.iterdir()) == []
    assert lofi_main(argv[:-1] + ["10.5"]) == 0
    assert json.loads((tmp_path / "out" / "toolkits.json").read_text())["opentad"]["offset_frames"] == 21
    assert lofi_main(argv[:-1] + ["10.5"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert lofi_main(argv[:-1] + ["20", "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "toolkits.json").read_text())["opentad"]["feature_stride"] == 80


def test_a_folder_written_without_extract_exports_and_names_what_the_toolkits_lack(tmp_path, capsys):
    """FeatureWriter's folders (no npy, no level_config): a whole-video grid exports, a video without
    segments stays in the JSON, a label without segments is named; a fixed-stride level without its
    stride is a clear error."""
    from pipelines.data.features import FeatureWriter

    def write(folder: Path, fixed_grid: bool) -> Path:
        writer = FeatureWriter(folder, 4, 3)
        for vid, subset, segments in [("a", "training", [(1.0, 3.0)]), ("b", "testing", [])]:
            writer.add({"video_id": vid, "subset": subset, "duration_sec": 8.0, "num_snippets": 4,
                        "segment_start_sec": [s for s, _ in segments], "segment_end_sec": [e for _, e in segments],
                        "segment_label": ["jump"] * len(segments), "segment_label_id": [0] * len(segments)},
                       np.full((4, 3), ord(vid), dtype=np.float32))
        return writer.commit({"level": "full", "fixed_grid": fixed_grid, "labels": ["jump", "swim"]})

    grid = write(tmp_path / "grid", True)
    assert lofi_main(["export-features", str(grid), str(tmp_path / "out")]) == 0
    assert "labels with no segment (swim)" in capsys.readouterr().out
    (testing,) = opentad_read(tmp_path / "out", "testing")
    assert testing["id"] == "b" and testing["segments"] == [] and testing["feats"].shape == (4, 3)
    (training,) = actionformer_read(tmp_path / "out", ["training"])
    assert training["labels"] == [0] and training["to_grid"]([1.0, 3.0]) == pytest.approx([0.0, 1.0])
    stride = write(tmp_path / "stride", False)
    assert lofi_main(["export-features", str(stride), str(tmp_path / "out2")]) == 2
    assert "no level_config.snippet_stride_sec" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
