"""Writing the demo dataset: encoded videos, ActivityNet-v1.3 annotations and a summary."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from lofi.config import ConfigError, to_dict
from lofi.errors import LofiError
from lofi.synth.encode import encode_video
from lofi.synth.render import make_background, render_frames
from lofi.synth.scene import MIN_GAP_SEC, MOTION_CLASSES, Scene, build_cluttered_scene, layout_instances
from lofi.synth.simple import build_simple_scene
from lofi.synth.workers import CpuClock, default_workers, map_items

CORRUPT_KINDS: tuple[str, ...] = ("truncated", "zero_bytes", "not_a_video")
SceneKind = Literal["simple", "cluttered"]
SCENES: tuple[str, ...] = get_args(SceneKind)
ANNOTATIONS_FILE = "annotations.json"
SUMMARY_FILE = "synth_summary.json"
VIDEO_DIR = "videos"


@dataclass(frozen=True)
class SynthConfig:
    """Size and shape of the demo dataset; the defaults suit the demo job (cheap CPU training).

    The simple scenes' motion ranges are made for 24-36 s videos sampled at the demo's levels
    (see `lofi.synth.simple`). The cluttered scenes as they were first made come back with
    scene=cluttered, size_px=128, durations 20-120 s and instances 1-20 s.
    """

    num_videos: int = 40  # intact videos; corrupt ones come on top
    seed: int = 0
    scene: SceneKind = "simple"
    size_px: int = 64  # square frames; even, as yuv420p needs
    fps: float = 10.0  # low on purpose: motion classes read well at 10 fps and decoding stays cheap
    min_duration_sec: float = 24.0
    max_duration_sec: float = 36.0
    min_instance_sec: float = 3.0
    max_instance_sec: float = 6.0
    val_fraction: float = 0.2
    num_corrupt: int = 0  # damaged files added on top of num_videos, listed in the annotations
    crf: int = 26  # x264 quality: lower is better and bigger

    def __post_init__(self) -> None:
        problems = []
        if self.num_videos < 1:
            problems.append(f"num_videos={self.num_videos}: needs at least 1 video")
        if self.seed < 0:
            problems.append(f"seed={self.seed}: use a seed >= 0")
        if self.scene not in SCENES:
            problems.append(f"scene={self.scene!r}: use one of {', '.join(SCENES)}")
        if self.size_px < 32 or self.size_px % 2:
            problems.append(f"size_px={self.size_px}: use an even size of at least 32 (yuv420p needs even sides)")
        if not 1 <= self.fps <= 120:
            problems.append(f"fps={self.fps}: use a frame rate in [1, 120]")
        if not 0 < self.min_instance_sec <= self.max_instance_sec:
            problems.append(f"min_instance_sec={self.min_instance_sec}, max_instance_sec={self.max_instance_sec}: "
                            "need 0 < min_instance_sec <= max_instance_sec")
        # Plus a few frames of slack: instances and gaps are rounded up to whole frames.
        shortest_sec = 2 * self.min_instance_sec + 3 * MIN_GAP_SEC + 5 / max(self.fps, 1.0)
        if self.min_duration_sec < shortest_sec:
            problems.append(f"min_duration_sec={self.min_duration_sec}: every video holds two instances with "
                            f"background around them; use at least {shortest_sec:.3g}")
        if self.max_duration_sec < self.min_duration_sec:
            problems.append(f"max_duration_sec={self.max_duration_sec}: "
                            f"must be >= min_duration_sec={self.min_duration_sec}")
        if not 0 <= self.val_fraction < 1:
            problems.append(f"val_fraction={self.val_fraction}: use a fraction in [0, 1)")
        if self.num_corrupt < 0:
            problems.append(f"num_corrupt={self.num_corrupt}: must be >= 0")
        if not 0 <= self.crf <= 51:
            problems.append(f"crf={self.crf}: x264 takes 0..51")
        if problems:
            raise ConfigError("synth config: " + "; ".join(problems))

    def frame_rate(self) -> Fraction:
        """The exact rate written into the stream (29.97 becomes 30000/1001)."""
        return Fraction(self.fps).limit_denominator(1001)


@dataclass(frozen=True)
class SynthSummary:
    """What `generate` wrote; also saved as OUT/synth_summary.json."""

    out_dir: str
    annotations_path: str
    video_ids: tuple[str, ...]
    corrupt_ids: tuple[str, ...]
    corrupt_kinds: dict[str, str]
    subsets: dict[str, int]
    total_duration_sec: float
    num_frames: int
    instances_per_class: dict[str, int]
    bytes_written: int
    seconds: float
    cpu_seconds: float  # this process and its workers: the fair speed figure on a shared machine
    frames_per_sec: float
    config: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        per_class = ", ".join(f"{k} {v}" for k, v in self.instances_per_class.items())
        subsets = ", ".join(f"{k} {v}" for k, v in self.subsets.items())
        return [
            f"wrote {len(self.video_ids)} videos ({subsets}) to {self.out_dir}/{VIDEO_DIR}",
            f"annotations: {self.annotations_path}",
            f"total duration: {self.total_duration_sec / 60:.1f} min, {self.num_frames} frames encoded",
            f"instances per class: {per_class}",
            f"corrupt files ({len(self.corrupt_ids)}): {', '.join(self.corrupt_ids) or 'none'}",
            f"bytes: {self.bytes_written / 1e6:.2f} MB; time: {self.seconds:.1f} s ({self.cpu_seconds:.1f} s CPU); "
            f"speed: {self.frames_per_sec:.0f} frames/s render + encode "
            f"({self.num_frames / max(self.cpu_seconds, 1e-9):.0f} per CPU second)",
        ]


@dataclass(frozen=True)
class VideoPlan:
    """Everything about one video that is decided before drawing it."""

    index: int
    video_id: str
    subset: str
    corrupt_kind: str | None
    num_frames: int
    actions: tuple[tuple[int, int, str], ...]  # (start_frame, end_frame, label)


def video_id(index: int) -> str:
    return f"synth_{index:05d}"


def plan_dataset(cfg: SynthConfig) -> list[VideoPlan]:
    """Durations, action layouts, class labels, subsets and corrupt files, all from the seed.

    Labels are dealt from a shuffled deck holding every class equally often, so even a
    6-video test dataset sees every class and the demo trains on balanced classes.
    """
    total = cfg.num_videos + cfg.num_corrupt
    layouts = []
    for index in range(total):
        rng = np.random.default_rng([cfg.seed, index, 0])
        num_frames = max(1, round(rng.uniform(cfg.min_duration_sec, cfg.max_duration_sec) * cfg.fps))
        ranges = layout_instances(rng, num_frames, cfg.fps, cfg.min_instance_sec, cfg.max_instance_sec)
        layouts.append((num_frames, ranges))
    rng = np.random.default_rng([cfg.seed])  # dataset-level stream, distinct from the per-video ones
    num_instances = sum(len(ranges) for _, ranges in layouts)
    deck = iter(rng.permutation(np.resize(np.arange(len(MOTION_CLASSES)), num_instances)).tolist())
    num_val = round(total * cfg.val_fraction)
    if cfg.val_fraction > 0 and total >= 2:
        num_val = min(max(num_val, 1), total - 1)
    val = set(rng.permutation(total)[:num_val].tolist())
    corrupt = sorted(rng.choice(total, size=cfg.num_corrupt, replace=False).tolist())
    kinds = {index: CORRUPT_KINDS[k % len(CORRUPT_KINDS)] for k, index in enumerate(corrupt)}
    return [
        VideoPlan(
            index=index,
            video_id=video_id(index),
            subset="validation" if index in val else "training",
            corrupt_kind=kinds.get(index),
            num_frames=num_frames,
            actions=tuple((start, end, MOTION_CLASSES[next(deck)]) for start, end in ranges),
        )
        for index, (num_frames, ranges) in enumerate(layouts)
    ]


def make_scene(cfg: SynthConfig, plan: VideoPlan) -> tuple[Scene, np.ndarray]:
    """The scene and background (H, W, 3) of one planned video."""
    rng = np.random.default_rng([cfg.seed, plan.index, 1])
    if cfg.scene == "simple":
        return build_simple_scene(rng, plan.num_frames, cfg.fps, cfg.size_px, plan.actions)
    scene = build_cluttered_scene(rng, plan.num_frames, cfg.fps, cfg.size_px, plan.actions)
    return scene, make_background(rng, cfg.size_px)


def write_corrupt(path: Path, kind: str) -> None:
    """Damage `path` the way real crawls do: cut short, empty, or not a video at all."""
    if kind == "truncated":
        data = path.read_bytes()
        # Without +faststart the index (moov) is at the end, so half a file cannot be opened.
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "not_a_video":
        path.write_text("<html><body>404 Not Found: this download is not a video</body></html>\n")
    else:
        raise ValueError(f"unknown corrupt kind {kind!r}; known: {', '.join(CORRUPT_KINDS)}")


def annotation_entry(scene: Scene, subset: str) -> dict[str, Any]:
    """One ActivityNet-v1.3 `database` entry; segments in seconds on the frame-time grid."""
    fps = scene.fps
    return {
        "subset": subset,
        "duration": round(scene.num_frames / fps, 6),
        "resolution": f"{scene.size_px}x{scene.size_px}",
        "fps": fps,
        "url": "",
        "annotations": [
            {"segment": [round(i.start_frame / fps, 6), round(i.end_frame / fps, 6)], "label": i.label}
            for i in scene.instances
        ],
    }


def prepare_out_dir(out_dir: Path, overwrite: bool, pattern: str = "synth_*.mp4",
                    index_file: str = ANNOTATIONS_FILE, what: str = "a dataset") -> Path:
    """OUT/videos ready for writing: refuses to mix with an earlier set unless `overwrite`, which
    deletes its videos matching `pattern`."""
    video_dir = out_dir / VIDEO_DIR
    if out_dir.exists() and not out_dir.is_dir():
        raise LofiError(f"{out_dir} is a file; give a folder to write {what} into")
    old_videos = sorted(video_dir.glob(pattern)) if video_dir.is_dir() else []
    if (old_videos or (out_dir / index_file).exists()) and not overwrite:
        raise LofiError(f"{out_dir} already holds {what} ({index_file} or {VIDEO_DIR}/{pattern}); "
                        "choose an empty folder or pass --overwrite to replace it")
    for path in old_videos:
        path.unlink()
    video_dir.mkdir(parents=True, exist_ok=True)
    return video_dir


def _write_video(job: tuple[SynthConfig, VideoPlan, Path]) -> tuple[str, dict[str, Any], int, int, list[str]]:
    """One video file: (video id, annotation entry, frames encoded, bytes, instance labels)."""
    cfg, plan, video_dir = job
    path = video_dir / f"{plan.video_id}.mp4"
    scene, background = make_scene(cfg, plan)
    frames = 0
    if plan.corrupt_kind in (None, "truncated"):
        frames = encode_video(path, render_frames(scene, background), cfg.size_px, cfg.frame_rate(), cfg.crf,
                              gop_frames=round(2 * cfg.fps))
    if plan.corrupt_kind:
        write_corrupt(path, plan.corrupt_kind)
    return (plan.video_id, annotation_entry(scene, plan.subset), frames, path.stat().st_size,
            [i.label for i in scene.instances])


def generate(out_dir: str | Path, cfg: SynthConfig, overwrite: bool = False, progress: bool = True,
             workers: int = 0) -> SynthSummary:
    """Write OUT/videos/<id>.mp4, OUT/annotations.json and OUT/synth_summary.json; `workers` processes
    (0: one per core, up to 8), the same files with any number."""
    out_dir = Path(out_dir)
    video_dir = prepare_out_dir(out_dir, overwrite)
    plans = plan_dataset(cfg)
    database: dict[str, Any] = {}
    per_class: Counter[str] = Counter()
    num_frames = bytes_written = 0
    started, cpu = time.perf_counter(), CpuClock()
    jobs = [(cfg, plan, video_dir) for plan in plans]
    for video, entry, frames, size, labels in map_items(_write_video, jobs, workers or default_workers(), "synth",
                                                        "video", progress):
        database[video] = entry
        num_frames += frames
        bytes_written += size
        per_class.update(labels)
    seconds, cpu_seconds = time.perf_counter() - started, cpu.seconds()
    # Written last: a crash midway leaves no annotation file pointing at missing videos.
    annotations_path = out_dir / ANNOTATIONS_FILE
    annotations_path.write_text(json.dumps({"version": "VERSION 1.3", "taxonomy": [], "database": database}, indent=1))
    summary = SynthSummary(
        out_dir=str(out_dir),
        annotations_path=str(annotations_path),
        video_ids=tuple(database),
        corrupt_ids=tuple(p.video_id for p in plans if p.corrupt_kind),
        corrupt_kinds={p.video_id: p.corrupt_kind for p in plans if p.corrupt_kind},
        subsets={name: sum(p.subset == name for p in plans) for name in ("training", "validation")},
        total_duration_sec=round(sum(e["duration"] for e in database.values()), 3),
        num_frames=num_frames,
        instances_per_class={label: per_class[label] for label in MOTION_CLASSES},
        bytes_written=bytes_written,
        seconds=round(seconds, 3),
        cpu_seconds=round(cpu_seconds, 3),
        frames_per_sec=round(num_frames / max(seconds, 1e-9), 1),
        config=to_dict(cfg),
    )
    (out_dir / SUMMARY_FILE).write_text(json.dumps(to_dict(summary), indent=1))
    return summary
