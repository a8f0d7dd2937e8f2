"""The synth encoder: the same bytes whatever SIMD the CPU has, and colours a decoder reads back."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from lofi.synth import SynthConfig, make_scene, plan_dataset
from lofi.synth import encode
from lofi.synth.render import render_frames

decord = pytest.importorskip("decord")


def test_bt601_conversion_on_textbook_colours():
    # BT.601 limited range: white (235, 128, 128), black (16, 128, 128), red about (81, 90, 240).
    frame = np.zeros((2, 6, 3), dtype=np.uint8)
    frame[:, 0:2] = 255
    frame[:, 4:6] = (255, 0, 0)
    y, u, v = encode.rgb_to_yuv420p(frame)
    assert y.shape == (2, 6) and u.shape == v.shape == (1, 3)
    assert y[0].tolist() == [235, 235, 16, 16, pytest.approx(81, abs=1), pytest.approx(81, abs=1)]
    assert u[0].tolist() == [128, 128, 90] and v[0].tolist() == [128, 128, 240]


def test_a_decoder_reads_the_colours_back(tmp_path):
    colours = [(200, 60, 40), (40, 120, 220), (128, 128, 128)]
    frames = [np.broadcast_to(np.array(c, dtype=np.uint8), (32, 32, 3)).copy() for c in colours]
    encode.encode_video(tmp_path / "flat.mp4", frames, 32, Fraction(10), crf=18, gop_frames=20)
    decoded = decord.VideoReader(str(tmp_path / "flat.mp4")).get_batch([0, 1, 2]).asnumpy()
    for frame, colour in zip(decoded, colours):
        assert np.abs(frame.reshape(-1, 3).mean(axis=0) - colour).max() <= 4


def test_bytes_do_not_depend_on_the_cpus_simd(tmp_path, monkeypatch):
    """Machines differ in the SIMD x264 picks; forcing plain C must not change a byte."""
    cfg = SynthConfig(num_videos=2, min_duration_sec=20, max_duration_sec=20)
    scene, background = make_scene(cfg, plan_dataset(cfg)[0])
    frames = list(render_frames(scene, background))
    written = []
    for name, extra in (("auto", ""), ("plain_c", ":asm=0")):
        monkeypatch.setattr(encode, "X264_PARAMS", encode.X264_PARAMS + extra)
        path = tmp_path / f"{name}.mp4"
        encode.encode_video(path, frames, cfg.size_px, cfg.frame_rate(), cfg.crf, gop_frames=20)
        written.append(Path(path).read_bytes())
    assert written[0] == written[1]
