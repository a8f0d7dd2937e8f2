"""`lofi synth-clips`: Kinetics-style trimmed clips for stage 1, balanced, decodable, reproducible."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lofi.synth import MOTION_CLASSES, ClipSynthConfig, generate_clips
from lofi.synth.simple import build_clip_scene
from lofi_cli.commands import main as lofi_main

decord = pytest.importorskip("decord")

SMALL_ARGS = ["--clips", "24", "--val-fraction", "0.25", "--seed", "5", "--quiet"]


def run_clips(out: Path, *extra: str) -> list[dict[str, str]]:
    assert lofi_main(["synth-clips", str(out), *SMALL_ARGS, *extra]) == 0
    with (out / "clips.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clips") / "small"
    run_clips(out)
    return out


def read_rows(out: Path) -> list[dict[str, str]]:
    with (out / "clips.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_is_kinetics_style_balanced_and_split_per_class(clips_dir):
    assert (clips_dir / "clips.csv").read_text().splitlines()[0] == "label,youtube_id,time_start,time_end,split"
    rows = read_rows(clips_dir)
    assert len(rows) == 24
    assert Counter(r["label"] for r in rows) == {label: 4 for label in MOTION_CLASSES}  # a balanced deck
    assert {r["split"] for r in rows} == {"train", "val"}
    assert Counter(r["label"] for r in rows if r["split"] == "val") == {label: 1 for label in MOTION_CLASSES}
    assert len({r["youtube_id"] for r in rows}) == 24
    for r in rows:
        assert (r["time_start"], r["time_end"]) == ("0", "2")
        assert (clips_dir / "videos" / f"{r['youtube_id']}_000000_000002.mp4").is_file()
    summary = json.loads((clips_dir / "clips_summary.json").read_text())
    assert summary["num_clips"] == 24 and summary["clips_per_class"]["rotate"] == {"train": 3, "val": 1}
    assert summary["config"]["seed"] == 5 and summary["seconds"] > 0


def test_clips_decode_with_the_expected_frames_and_size(clips_dir):
    for r in read_rows(clips_dir):
        reader = decord.VideoReader(str(clips_dir / "videos" / f"{r['youtube_id']}_000000_000002.mp4"))
        assert len(reader) == 20 and reader.get_avg_fps() == pytest.approx(10.0)  # 2 s at 10 fps
        assert reader[0].shape == (64, 64, 3)


def test_clips_load_as_trimmed_clips_with_the_project_reader(clips_dir):
    annotations = pytest.importorskip("lofi.annotations")
    loaded = annotations.load_annotations(clips_dir / "clips.csv")
    assert loaded.num_segments == 24 and len(loaded.video_ids) == 24
    assert not getattr(loaded, "warnings", ())


def test_same_seed_same_bytes_and_frames(clips_dir, tmp_path):
    again = tmp_path / "again"
    run_clips(again, "--workers", "1")  # the fixture's clips came from one process per core: the same bytes
    names = sorted(p.name for p in (clips_dir / "videos").iterdir())
    assert names == sorted(p.name for p in (again / "videos").iterdir())
    assert (clips_dir / "clips.csv").read_bytes() == (again / "clips.csv").read_bytes()
    for name in names:
        first, second = clips_dir / "videos" / name, again / "videos" / name
        assert first.read_bytes() == second.read_bytes(), name
        a, b = decord.VideoReader(str(first)), decord.VideoReader(str(second))
        assert np.array_equal(a.get_batch(list(range(len(a)))).asnumpy(), b.get_batch(list(range(len(b)))).asnumpy())


@pytest.mark.parametrize("label", MOTION_CLASSES)
def test_the_actor_moves_on_every_frame_of_a_clip_beside_static_objects(label):
    for seed in range(5):
        scene, _ = build_clip_scene(np.random.default_rng(seed), label, 20, 10.0, 64)
        assert scene.instances[0].label == label and scene.instances[0].actor == 0
        assert 1 <= len(scene.objects) <= 3  # the actor and 0-2 idle objects, as in a TAL video's frame
        changed = np.zeros(19, dtype=bool)
        for track in (scene.x_px, scene.y_px, scene.angle_rad, scene.radius_px):
            changed |= np.abs(np.diff(track[0])) > 1e-9
            assert np.all(np.abs(np.diff(track[1:], axis=1)) < 1e-9)  # idle objects never move
        assert changed.all()
        if label in ("grow", "shrink"):
            steps = np.diff(scene.radius_px[0])
            assert (steps > 0).all() if label == "grow" else (steps < 0).all()


def test_a_still_clip_shows_only_objects_at_rest_and_is_its_own_class():
    from lofi.synth import ClipSynthConfig
    from lofi.synth.clips import plan_clips

    for seed in range(5):
        scene, _ = build_clip_scene(np.random.default_rng(seed), "still", 20, 10.0, 64)
        for track in (scene.x_px, scene.y_px, scene.angle_rad, scene.radius_px):
            assert np.all(np.abs(np.diff(track, axis=1)) < 1e-9)  # nothing changes on any frame
    labels = [p.label for p in plan_clips(ClipSynthConfig(num_clips=70, still_class=True))]
    assert {labels.count(name) for name in (*MOTION_CLASSES, "still")} == {10}  # seven balanced classes
    assert "still" not in {p.label for p in plan_clips(ClipSynthConfig(num_clips=70))}


def test_user_errors_name_the_option_and_refuse_to_clobber(clips_dir, capsys):
    assert lofi_main(["synth-clips", str(clips_dir), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    code = lofi_main(["synth-clips", str(clips_dir.parent / "bad"), "--clip-sec", "1", "--size-px", "33"])
    err = capsys.readouterr().err
    assert code == 2 and "clip_sec=1" in err and "size_px=33" in err


def test_generate_clips_api_and_every_option_is_explained(tmp_path):
    from lofi_cli.synth_clips import build_parser

    summary = generate_clips(tmp_path / "api", ClipSynthConfig(num_clips=6, val_fraction=0.0, clip_sec=3),
                             progress=False)
    assert summary.num_clips == 6 and summary.num_frames == 6 * 30
    assert sorted(p.name for p in (tmp_path / "api" / "videos").iterdir())[0] == "clip_00000_000000_000003.mp4"
    assert any("clips/s" in line for line in summary.lines())
    for action in build_parser()._actions:
        assert action.help and len(action.help) > 10, action.dest


def test_leave_out_drops_those_classes_and_keeps_the_others_balanced(tmp_path):
    rows = run_clips(tmp_path / "gap", "--clips", "25", "--still", "--leave-out", "rotate,bounce")
    kept = [c for c in MOTION_CLASSES if c not in ("rotate", "bounce")] + ["still"]
    assert Counter(r["label"] for r in rows) == {label: 5 for label in kept}
    summary = json.loads((tmp_path / "gap" / "clips_summary.json").read_text())
    assert summary["config"]["leave_out"] == ["rotate", "bounce"] and "rotate" not in summary["clips_per_class"]


@pytest.mark.parametrize("leave_out, message", [
    (["spin"], "'spin' is no motion class"),
    (list(MOTION_CLASSES), "leaves no motion class"),
])
def test_leave_out_of_unknown_or_every_class_is_an_error_naming_the_field(leave_out, message):
    with pytest.raises(Exception, match=rf"leave_out=.*{message}"):
        ClipSynthConfig(leave_out=tuple(leave_out))
