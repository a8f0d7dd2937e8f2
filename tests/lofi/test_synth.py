"""`lofi synth`: real decodable videos, honest annotations, determinism, corrupt files, temporal classes.

The small dataset is made of simple scenes (the default); tests/lofi/test_synth_simple.py checks
their motions, test_synth_clips.py the trimmed clips, test_synth_encode.py the encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lofi.synth import MOTION_CLASSES, SynthConfig, generate, make_scene, plan_dataset
from lofi.synth.scene import layout_instances
from lofi_cli.commands import main as lofi_main

decord = pytest.importorskip("decord")

# The size other engineers' tests use: a handful of short, small videos.
SMALL_ARGS = ["--videos", "6", "--size-px", "64", "--min-duration-sec", "20", "--max-duration-sec", "40", "--quiet"]


def run_synth(out: Path, *extra: str) -> dict:
    assert lofi_main(["synth", str(out), *SMALL_ARGS, *extra]) == 0
    return json.loads((out / "annotations.json").read_text())


def decode_all(path: Path) -> tuple[np.ndarray, float]:
    """All frames (N, H, W, 3) uint8 and the stream's frame rate, read with decord."""
    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy(), reader.get_avg_fps()


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "small"
    run_synth(out, "--seed", "7", "--corrupt", "3")
    return out


def intact(dataset: Path) -> dict:
    database = json.loads((dataset / "annotations.json").read_text())["database"]
    corrupt = set(json.loads((dataset / "synth_summary.json").read_text())["corrupt_ids"])
    return {vid: entry for vid, entry in database.items() if vid not in corrupt}


def test_cli_writes_activitynet_annotations_with_both_subsets(small_dataset):
    data = json.loads((small_dataset / "annotations.json").read_text())
    assert data["version"] == "VERSION 1.3"
    database = data["database"]
    assert len(database) == 6 + 3  # corrupt files come on top and look like any other video
    assert {e["subset"] for e in database.values()} == {"training", "validation"}
    assert sum(e["subset"] == "validation" for e in database.values()) == 2  # round(9 * 0.2)
    for vid, entry in database.items():
        assert vid.startswith("synth_") and (small_dataset / "videos" / f"{vid}.mp4").is_file()
        assert 20 <= entry["duration"] <= 40 and entry["fps"] == 10 and entry["resolution"] == "64x64"
        assert len(entry["annotations"]) >= 2
        assert {a["label"] for a in entry["annotations"]} <= set(MOTION_CLASSES)
    # Balanced deck: with >= 18 instances every class is there.
    labels = [a["label"] for e in database.values() for a in e["annotations"]]
    assert set(labels) == set(MOTION_CLASSES)


def test_videos_decode_with_the_annotated_length_and_segments_inside(small_dataset):
    for vid, entry in intact(small_dataset).items():
        frames, fps = decode_all(small_dataset / "videos" / f"{vid}.mp4")
        assert frames.shape[1:] == (64, 64, 3)
        assert fps == pytest.approx(10.0)
        assert len(frames) == pytest.approx(entry["duration"] * 10, abs=1)
        decoded_sec = len(frames) / fps
        segments = sorted(a["segment"] for a in entry["annotations"])
        for start, end in segments:
            assert 0 < start < end <= decoded_sec - 1.0  # background before and after every instance
            assert 3.0 - 1e-6 <= end - start <= 6.0 + 1e-6  # the default instance lengths
        for (_, end), (next_start, _) in zip(segments, segments[1:]):
            assert next_start - end >= 1.0 - 1e-6  # no overlap, background between instances


def test_corrupt_files_fail_to_open_and_are_listed(small_dataset):
    summary = json.loads((small_dataset / "synth_summary.json").read_text())
    corrupt = summary["corrupt_ids"]
    assert len(corrupt) == 3
    assert sorted(summary["corrupt_kinds"].values()) == ["not_a_video", "truncated", "zero_bytes"]
    sizes = {vid: (small_dataset / "videos" / f"{vid}.mp4").stat().st_size for vid in corrupt}
    assert sizes[next(v for v, k in summary["corrupt_kinds"].items() if k == "zero_bytes")] == 0
    database = json.loads((small_dataset / "annotations.json").read_text())["database"]
    for vid in database:
        path = small_dataset / "videos" / f"{vid}.mp4"
        if vid in corrupt:
            with pytest.raises(Exception):
                decord.VideoReader(str(path))
        else:
            assert len(decord.VideoReader(str(path))) > 0


def same_files(first: Path, second: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Relative paths of every file under `first`, after checking `second` holds the same bytes."""
    names = sorted(str(p.relative_to(first)) for p in first.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(second)) for p in second.rglob("*") if p.is_file())
    for name in names:
        if name not in skip:
            assert (first / name).read_bytes() == (second / name).read_bytes(), name
    return names


def test_same_seed_same_bytes_and_frames_other_seed_differs(small_dataset, tmp_path):
    # the fixture's set came from one process per core, this one from a single process: the same bytes
    again = run_synth(tmp_path / "again", "--seed", "7", "--corrupt", "3", "--workers", "1")
    assert again == json.loads((small_dataset / "annotations.json").read_text())
    # Every video byte for byte (the summary differs only in its timings), and every frame decoded.
    same_files(small_dataset, tmp_path / "again", skip=("synth_summary.json",))
    for vid in intact(small_dataset):
        first, _ = decode_all(small_dataset / "videos" / f"{vid}.mp4")
        second, _ = decode_all(tmp_path / "again" / "videos" / f"{vid}.mp4")
        assert np.array_equal(first, second), vid
    vid = next(iter(intact(small_dataset)))
    first, _ = decode_all(small_dataset / "videos" / f"{vid}.mp4")
    other = run_synth(tmp_path / "other", "--seed", "8")
    assert other["database"] != again["database"]
    third, _ = decode_all(tmp_path / "other" / "videos" / f"{vid}.mp4")
    assert first.shape != third.shape or not np.array_equal(first, third)


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), by counting pairs (ties count half)."""
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def frame_statistics(dataset: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-frame statistics z-scored within each video, and each frame's label ('' = background)."""
    stats: dict[str, list[np.ndarray]] = {"mean": [], "std": [], "motion": []}
    labels = []
    for vid, entry in intact(dataset).items():
        frames, fps = decode_all(dataset / "videos" / f"{vid}.mp4")
        grey = frames.astype(np.float32).mean(axis=-1)  # (N, H, W)
        motion = np.abs(np.diff(grey, axis=0)).mean(axis=(1, 2))  # change since the previous frame
        values = {"mean": grey.mean(axis=(1, 2)), "std": grey.std(axis=(1, 2)),
                  "motion": np.concatenate([motion[:1], motion])}
        for key, value in values.items():
            stats[key].append((value - value.mean()) / (value.std() + 1e-6))
        label = np.full(len(frames), "", dtype=object)
        for a in entry["annotations"]:
            label[round(a["segment"][0] * fps):round(a["segment"][1] * fps)] = a["label"]
        labels.append(label)
    return {k: np.concatenate(v) for k, v in stats.items()}, np.concatenate(labels)


def test_a_single_frame_does_not_show_the_class_but_motion_does(small_dataset):
    stats, labels = frame_statistics(small_dataset)
    action = labels != ""
    assert 0.3 < action.mean() < 0.7
    for key in ("mean", "std"):  # brightness and contrast of one frame: close to chance
        assert 0.3 < auc(stats[key][action], stats[key][~action]) < 0.7, key
    # Frame differences do separate actions from background, for every class present.
    assert auc(stats["motion"][action], stats["motion"][~action]) > 0.75
    for label in set(labels[action]):
        assert auc(stats["motion"][labels == label], stats["motion"][~action]) > 0.6, label


def test_default_size_summary_and_generate_api(tmp_path):
    cfg = SynthConfig(num_videos=1, min_duration_sec=20, max_duration_sec=20, val_fraction=0.0)
    summary = generate(tmp_path / "one", cfg, progress=False)
    frames, fps = decode_all(tmp_path / "one" / "videos" / "synth_00000.mp4")
    assert frames.shape == (200, 64, 64, 3) and fps == pytest.approx(10.0)  # 20 s at the 10 fps, 64 px default
    assert summary.num_frames == 200 and summary.total_duration_sec == pytest.approx(20.0)
    assert summary.subsets == {"training": 1, "validation": 0}
    assert summary.bytes_written == (tmp_path / "one" / "videos" / "synth_00000.mp4").stat().st_size
    assert summary.frames_per_sec > 10 * cfg.fps  # well above real time
    assert any("frames/s" in line for line in summary.lines())


def test_user_errors_name_the_option_and_refuse_to_clobber(small_dataset, capsys):
    assert lofi_main(["synth", str(small_dataset), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    code = lofi_main(["synth", str(small_dataset.parent / "bad"), "--size-px", "33", "--val-fraction", "1.5"])
    err = capsys.readouterr().err
    assert code == 2 and "size_px=33" in err and "val_fraction=1.5" in err  # every problem at once


def test_annotations_load_with_the_project_reader(small_dataset):
    annotations = pytest.importorskip("lofi.annotations")
    load_annotations = getattr(annotations, "load_annotations", None)
    if load_annotations is None:
        pytest.skip("lofi.annotations.load_annotations is not written yet")
    loaded = load_annotations(small_dataset / "annotations.json")
    database = json.loads((small_dataset / "annotations.json").read_text())["database"]
    assert sorted(loaded.video_ids) == sorted(database)
    assert loaded.num_segments == sum(len(e["annotations"]) for e in database.values())
    assert not getattr(loaded, "warnings", ())  # nothing the reader had to clip or tolerate


@settings(max_examples=200, deadline=None)
@given(
    duration_sec=st.floats(8.0, 300.0),
    fps=st.sampled_from([1.0, 7.5, 10.0, 25.0, 30000 / 1001]),
    min_instance_sec=st.floats(0.5, 2.0),
    extra_sec=st.floats(0.0, 25.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_layout_keeps_instances_apart_and_inside(duration_sec, fps, min_instance_sec, extra_sec, seed):
    num_frames = round(duration_sec * fps)
    if num_frames / fps < 2 * min_instance_sec + 3 + 5 / fps:  # what SynthConfig requires
        return
    max_instance_sec = min_instance_sec + extra_sec
    ranges = layout_instances(np.random.default_rng(seed), num_frames, fps, min_instance_sec, max_instance_sec)
    assert len(ranges) >= 2
    edges = [0] + [f for r in ranges for f in r] + [num_frames]
    gaps_sec = np.diff(edges)[::2] / fps  # before, between and after the instances
    lengths_sec = np.diff(edges)[1::2] / fps
    assert (gaps_sec >= 1.0 - 1e-9).all()
    assert (lengths_sec >= min_instance_sec - 1e-9).all()
    # Whole frames: above the maximum only when no whole-frame length fits between min and max.
    longest_sec = max(max_instance_sec, np.ceil(min_instance_sec * fps - 1e-9) / fps)
    assert (lengths_sec <= longest_sec + 1e-9).all()


def test_cluttered_scenes_stay_available_as_a_stress_test():
    cfg = SynthConfig(num_videos=3, scene="cluttered", seed=2)
    for plan in plan_dataset(cfg):
        scene, background = make_scene(cfg, plan)
        # Distractors that move all the time, and more actors to pick from than instances need.
        assert any(o.is_distractor for o in scene.objects)
        distractors = [i for i, o in enumerate(scene.objects) if o.is_distractor]
        assert (np.diff(scene.x_px[distractors], axis=1) != 0).mean() > 0.9
        assert background.reshape(-1, 3).std(axis=0).max() > 5  # a texture, not a plain colour
    with pytest.raises(ValueError, match="scene='busy'"):
        SynthConfig(scene="busy")


def test_every_option_is_explained():
    from lofi_cli.synth import build_parser

    for action in build_parser()._actions:
        assert action.help and len(action.help) > 10, action.dest
