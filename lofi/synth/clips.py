"""Trimmed clips for stage-1 pre-training: one object doing one motion class for a whole clip.

Written in the Kinetics layout that `lofi prepare` and `lofi annotations` read:
OUT/clips.csv with `label,youtube_id,time_start,time_end,split` and one file per row,
OUT/videos/<youtube_id>_<time_start:06d>_<time_end:06d>.mp4. Every clip starts at 0 and
lasts `clip_sec` whole seconds, so the times in the name and the CSV are exact integers and
match the file (with a non-integer fps the clip holds round(clip_sec * fps) frames).
The clips are drawn like the simple scenes' instances (`lofi.synth.simple`: the same
backgrounds, shapes, colours, sizes and per-class motion parameters), at the TAL videos'
size and frame rate. There is no background class unless `still_class` adds one ("still":
objects at rest, nothing acting). `leave_out` drops motion classes from the set: a stage 1 that
never sees some of the TAL classes, as Kinetics-400's classes cover only part of ActivityNet's
(the task discrepancy end-to-end training is for).
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from lofi.annotations.sources import KINETICS_COLUMNS, kinetics_clip_id
from lofi.config import ConfigError, to_dict
from lofi.synth.encode import encode_video
from lofi.synth.generate import VIDEO_DIR, prepare_out_dir
from lofi.synth.render import render_frames
from lofi.synth.scene import MOTION_CLASSES
from lofi.synth.simple import BOUNCE_PERIOD_SEC, STILL_CLASS, build_clip_scene
from lofi.synth.workers import CpuClock, default_workers, map_items

CLIPS_FILE = "clips.csv"
CLIPS_SUMMARY_FILE = "clips_summary.json"
CLIP_VIDEO_DIR = VIDEO_DIR
SPLITS: tuple[str, ...] = ("train", "val")
# Tags the clips' random streams, so the same seed draws them apart from the TAL videos' ones.
CLIP_STREAM = 0x636C6970  # "clip"


@dataclass(frozen=True)
class ClipSynthConfig:
    """Size of the trimmed-clip set; size and frame rate default to the TAL videos' (SynthConfig)."""

    num_clips: int = 4000
    seed: int = 0
    size_px: int = 64  # square frames; even, as yuv420p needs
    fps: float = 10.0
    clip_sec: int = 2  # whole seconds: the Kinetics name and CSV hold integer times
    val_fraction: float = 0.15
    crf: int = 26  # x264 quality: lower is better and bigger
    # one more class, "still": clips in which no object acts (a TAL video's background). Without it a
    # classifier can tell a class apart by elimination (nothing else happens) and never represent it
    still_class: bool = False
    # motion classes no clip shows (names of MOTION_CLASSES): a pre-training label set that covers part
    # of the TAL classes only, so the frozen encoder has never been taught to tell those apart
    leave_out: tuple[str, ...] = ()

    def classes(self) -> tuple[str, ...]:
        motions = tuple(c for c in MOTION_CLASSES if c not in self.leave_out)
        return motions + ((STILL_CLASS,) if self.still_class else ())

    def __post_init__(self) -> None:
        problems = []
        unknown = [c for c in self.leave_out if c not in MOTION_CLASSES]
        if unknown:
            problems.append(f"leave_out={list(self.leave_out)}: {', '.join(map(repr, unknown))} is no motion class; "
                            f"known: {', '.join(MOTION_CLASSES)}")
        elif len(set(self.leave_out)) == len(MOTION_CLASSES):
            problems.append(f"leave_out={list(self.leave_out)}: leaves no motion class; keep at least one")
        elif self.num_clips < len(self.classes()):
            problems.append(f"num_clips={self.num_clips}: use at least {len(self.classes())}, one per class")
        if self.seed < 0:
            problems.append(f"seed={self.seed}: use a seed >= 0")
        if self.size_px < 32 or self.size_px % 2:
            problems.append(f"size_px={self.size_px}: use an even size of at least 32 (yuv420p needs even sides)")
        if not 1 <= self.fps <= 120:
            problems.append(f"fps={self.fps}: use a frame rate in [1, 120]")
        if self.clip_sec < BOUNCE_PERIOD_SEC[0]:
            problems.append(f"clip_sec={self.clip_sec}: use at least {BOUNCE_PERIOD_SEC[0]:g} s, "
                            "the slowest bounce's shortest hop")
        if not 0 <= self.val_fraction < 1:
            problems.append(f"val_fraction={self.val_fraction}: use a fraction in [0, 1)")
        if not 0 <= self.crf <= 51:
            problems.append(f"crf={self.crf}: x264 takes 0..51")
        if problems:
            raise ConfigError("synth-clips config: " + "; ".join(problems))

    def frame_rate(self) -> Fraction:
        """The exact rate written into the stream (29.97 becomes 30000/1001)."""
        return Fraction(self.fps).limit_denominator(1001)

    def frames_per_clip(self) -> int:
        return max(1, round(self.clip_sec * self.fps))


@dataclass(frozen=True)
class ClipPlan:
    index: int
    youtube_id: str
    label: str
    split: str

    def file_stem(self, clip_sec: int) -> str:
        return kinetics_clip_id(self.youtube_id, 0, clip_sec)


@dataclass(frozen=True)
class ClipSummary:
    """What `generate_clips` wrote; also saved as OUT/clips_summary.json."""

    out_dir: str
    csv_path: str
    num_clips: int
    clips_per_class: dict[str, dict[str, int]]  # class -> split -> count
    num_frames: int
    bytes_written: int
    seconds: float
    cpu_seconds: float  # this process and its workers: the fair speed figure on a shared machine
    clips_per_sec: float
    config: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        per_class = ", ".join(f"{k} {sum(v.values())}" for k, v in self.clips_per_class.items())
        splits = ", ".join(f"{s} {sum(v[s] for v in self.clips_per_class.values())}" for s in SPLITS)
        return [
            f"wrote {self.num_clips} clips ({splits}) to {self.out_dir}/{CLIP_VIDEO_DIR}",
            f"labels: {self.csv_path}",
            f"clips per class: {per_class}",
            f"bytes: {self.bytes_written / 1e6:.2f} MB; time: {self.seconds:.1f} s ({self.cpu_seconds:.1f} s CPU); "
            f"speed: {self.clips_per_sec:.0f} clips/s, {self.num_frames / max(self.seconds, 1e-9):.0f} frames/s "
            f"render + encode ({self.num_frames / max(self.cpu_seconds, 1e-9):.0f} per CPU second)",
        ]


def plan_clips(cfg: ClipSynthConfig) -> list[ClipPlan]:
    """Labels dealt from a shuffled deck (balanced classes) and a split stratified by class."""
    rng = np.random.default_rng([cfg.seed, CLIP_STREAM])
    classes = cfg.classes()
    labels = rng.permutation(np.resize(np.arange(len(classes)), cfg.num_clips))
    val = np.zeros(cfg.num_clips, dtype=bool)
    for k in range(len(classes)):
        members = rng.permutation(np.flatnonzero(labels == k))
        val[members[:round(len(members) * cfg.val_fraction)]] = True
    return [ClipPlan(i, f"clip_{i:05d}", classes[int(labels[i])], SPLITS[int(val[i])])
            for i in range(cfg.num_clips)]


def _write_clip(job: tuple[ClipSynthConfig, ClipPlan, Path]) -> tuple[str, str, int, int]:
    """One clip file: (label, split, frames encoded, bytes)."""
    cfg, plan, video_dir = job
    rng = np.random.default_rng([cfg.seed, CLIP_STREAM, plan.index])
    num_frames = cfg.frames_per_clip()
    scene, background = build_clip_scene(rng, plan.label, num_frames, cfg.fps, cfg.size_px)
    path = video_dir / f"{plan.file_stem(cfg.clip_sec)}.mp4"
    # One GOP per clip: clips are read whole, never seeked into.
    frames = encode_video(path, render_frames(scene, background), cfg.size_px, cfg.frame_rate(), cfg.crf,
                          gop_frames=num_frames)
    return plan.label, plan.split, frames, path.stat().st_size


def generate_clips(out_dir: str | Path, cfg: ClipSynthConfig, overwrite: bool = False,
                   progress: bool = True, workers: int = 0) -> ClipSummary:
    """Write OUT/videos/clip_<i>_000000_<clip_sec>.mp4, OUT/clips.csv and OUT/clips_summary.json; `workers`
    processes (0: one per core, up to 8), the same files with any number."""
    out_dir = Path(out_dir)
    video_dir = prepare_out_dir(out_dir, overwrite, "clip_*.mp4", CLIPS_FILE, "clips")
    plans = plan_clips(cfg)
    counts: Counter[tuple[str, str]] = Counter()
    total_frames = bytes_written = 0
    started, cpu = time.perf_counter(), CpuClock()
    jobs = [(cfg, plan, video_dir) for plan in plans]
    for label, split, frames, size in map_items(_write_clip, jobs, workers or default_workers(), "synth-clips",
                                                "clip", progress):
        total_frames += frames
        bytes_written += size
        counts[label, split] += 1
    seconds, cpu_seconds = time.perf_counter() - started, cpu.seconds()
    # Written last: a crash midway leaves no label file pointing at missing clips.
    csv_path = out_dir / CLIPS_FILE
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(KINETICS_COLUMNS)
        writer.writerows([p.label, p.youtube_id, 0, cfg.clip_sec, p.split] for p in plans)
    summary = ClipSummary(
        out_dir=str(out_dir),
        csv_path=str(csv_path),
        num_clips=len(plans),
        clips_per_class={label: {s: counts[label, s] for s in SPLITS} for label in cfg.classes()},
        num_frames=total_frames,
        bytes_written=bytes_written,
        seconds=round(seconds, 3),
        cpu_seconds=round(cpu_seconds, 3),
        clips_per_sec=round(len(plans) / max(seconds, 1e-9), 1),
        config=to_dict(cfg),
    )
    (out_dir / CLIPS_SUMMARY_FILE).write_text(json.dumps(to_dict(summary), indent=1))
    return summary
