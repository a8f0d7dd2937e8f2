"""What happens in one synthetic video: the action layout, and every object's trajectory in a cluttered scene.

The scene types (`Scene`, `Instance`, `SceneObject`), the class list and the instance layout
are shared with the simple scenes of `lofi.synth.simple`; the rest of this module builds the
cluttered scenes (`scene: cluttered`, described in `lofi.synth`), kept as a stress test.

Distances are in pixels of a 128 px reference frame and scaled by `size_px / 128`, speeds are
per second, so the same class looks the same at any size and frame rate. The scene wraps
around like a torus: an object leaving one edge re-enters at the other, which lets a
translation run for 20 s without leaving the view and keeps every object visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

MOTION_CLASSES: tuple[str, ...] = ("move_left", "move_right", "rotate", "grow", "shrink", "bounce")
SHAPES: tuple[str, ...] = ("square", "bar", "triangle", "cross", "ellipse")
# Saturated colours shared by actors, idle objects and distractors alike, so colour says nothing
# about the class.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 60, 50), (60, 200, 80), (60, 110, 230), (240, 210, 50),
    (200, 80, 220), (40, 210, 220), (245, 140, 40), (245, 245, 245),
)

REFERENCE_PX = 128.0
MIN_GAP_SEC = 1.0  # background before, between and after instances
# Cluttered scenes only (the simple scenes' ranges are in lofi.synth.simple):
RADIUS_RANGE_PX = (8.0, 20.0)  # every object's size, idle or acting, stays in this range
DRIFT_MAX_PX_PER_SEC = 2.5  # idle objects: static or a slow wander
DISTRACTOR_SPEED_PX_PER_SEC = (5.0, 14.0)  # peak speed of a distractor's curved path
DISTRACTOR_SPIN_DEG_PER_SEC = 20.0
MOVE_SPEED_PX_PER_SEC = (22.0, 40.0)
ROTATE_DEG_PER_SEC = (90.0, 180.0)
SIZE_CYCLE_SEC = (1.0, 2.5)  # grow / shrink: one sweep across the whole size range
BOUNCE_HEIGHT_PX = (14.0, 30.0)
BOUNCE_PERIOD_SEC = (0.6, 1.2)


@dataclass(frozen=True)
class Instance:
    """One action: frames [start_frame, end_frame) in which object `actor` does `label`."""

    label: str
    start_frame: int
    end_frame: int
    actor: int


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: tuple[int, int, int]
    is_distractor: bool


@dataclass(frozen=True)
class Scene:
    """Per-frame state of every object: arrays of shape (O, N), O objects, N frames."""

    size_px: int
    fps: float
    instances: tuple[Instance, ...]
    objects: tuple[SceneObject, ...]
    x_px: np.ndarray
    y_px: np.ndarray
    angle_rad: np.ndarray
    radius_px: np.ndarray

    @property
    def num_frames(self) -> int:
        return int(self.x_px.shape[1])


def layout_instances(
    rng: np.random.Generator, num_frames: int, fps: float, min_instance_sec: float, max_instance_sec: float
) -> list[tuple[int, int]]:
    """Non-overlapping [start, end) frame ranges, at least two, with background around each."""
    duration_sec = num_frames / fps
    max_count = max(2, int(duration_sec // 12))
    # Actions fill 30-60% of the video; keep whole instances rather than shrinking all of them,
    # so instance lengths keep their 1-20 s spread in long videos.
    budget_sec = duration_sec * rng.uniform(0.3, 0.6)
    lengths_sec = rng.uniform(min_instance_sec, max_instance_sec, size=max_count)
    count = max(2, int(np.searchsorted(np.cumsum(lengths_sec), budget_sec, side="right")))
    lengths_sec = lengths_sec[:count]
    if lengths_sec.sum() > budget_sec:
        lengths_sec = lengths_sec * budget_sec / lengths_sec.sum()
    # Work in whole frames so rounding never breaks the 1 s minimum gap or the length limits.
    min_frames = math.ceil(min_instance_sec * fps - 1e-9)
    max_frames = max(min_frames, math.floor(max_instance_sec * fps + 1e-9))
    lengths = np.clip(np.round(lengths_sec * fps), min_frames, max_frames)
    gap_frames = math.ceil(MIN_GAP_SEC * fps - 1e-9)
    free_frames = num_frames - int(lengths.sum()) - (count + 1) * gap_frames
    # Clipping up to the minimum length can overflow a short video: drop instances, then
    # fall back to two of the minimum length.
    while free_frames < 0 and count > 2:
        count -= 1
        lengths = lengths[:count]
        free_frames = num_frames - int(lengths.sum()) - (count + 1) * gap_frames
    if free_frames < 0:
        lengths = np.full(2, min_frames, dtype=float)
        free_frames = num_frames - int(lengths.sum()) - (count + 1) * gap_frames
    if free_frames < 0:
        raise ValueError(f"a {duration_sec:.1f} s video cannot hold two instances with background between")
    gaps = gap_frames + np.floor(rng.dirichlet(np.ones(count + 1)) * free_frames)
    ranges, frame = [], 0
    for length, gap in zip(lengths.astype(int).tolist(), gaps.astype(int).tolist()):
        ranges.append((frame + gap, frame + gap + length))
        frame += gap + length
    return ranges


def _motion_increments(
    label: str, rng: np.random.Generator, num_frames: int, fps: float, scale: float
) -> dict[str, np.ndarray]:
    """Per-frame changes of x, y, angle and size phase while one object performs `label`."""
    t_sec = np.arange(num_frames + 1) / fps
    zero = np.zeros(num_frames)
    inc = {"x": zero, "y": zero, "angle": zero, "phase": zero}
    if label in ("move_left", "move_right"):
        speed = rng.uniform(*MOVE_SPEED_PX_PER_SEC) * scale / fps
        inc["x"] = np.full(num_frames, -speed if label == "move_left" else speed)
    elif label == "rotate":
        spin = math.radians(rng.uniform(*ROTATE_DEG_PER_SEC)) * rng.choice([-1.0, 1.0]) / fps
        inc["angle"] = np.full(num_frames, spin)
    elif label in ("grow", "shrink"):
        # Phase runs over [0, 1) across the size range and wraps: grow sweeps small -> large
        # then snaps back, shrink the reverse, so one frame's size is equally likely in both.
        rate = 1.0 / (rng.uniform(*SIZE_CYCLE_SEC) * fps)
        inc["phase"] = np.full(num_frames, rate if label == "grow" else -rate)
    elif label == "bounce":
        height_px = rng.uniform(*BOUNCE_HEIGHT_PX) * scale
        period_sec = rng.uniform(*BOUNCE_PERIOD_SEC)
        y_px = -height_px * np.abs(np.sin(np.pi * t_sec / period_sec))  # screen y points down
        inc["y"] = np.diff(y_px)
    else:
        raise ValueError(f"unknown motion class {label!r}; known: {', '.join(MOTION_CLASSES)}")
    return inc


def _smooth_wave(rng: np.random.Generator, t_sec: np.ndarray, freq_range_hz: tuple[float, float]) -> np.ndarray:
    """A random slow oscillation in [-1, 1]: two sinusoids with random frequencies and phases."""
    freqs = rng.uniform(*freq_range_hz, size=2)
    phases = rng.uniform(0, 2 * np.pi, size=2)
    return 0.5 * (np.sin(2 * np.pi * freqs[0] * t_sec + phases[0]) + np.sin(2 * np.pi * freqs[1] * t_sec + phases[1]))


def _idle_increments(rng: np.random.Generator, num_frames: int, fps: float, scale: float) -> dict[str, np.ndarray]:
    """Background behaviour of a non-distractor: static (often) or a slow random wander."""
    t_sec = np.arange(num_frames) / fps
    drift_px = rng.choice([0.0, rng.uniform(0.0, DRIFT_MAX_PX_PER_SEC)]) * scale / fps
    zero = np.zeros(num_frames)
    return {
        "x": drift_px * _smooth_wave(rng, t_sec, (0.01, 0.08)),
        "y": drift_px * _smooth_wave(rng, t_sec, (0.01, 0.08)),
        "angle": zero,
        "phase": zero,
    }


def _distractor_increments(
    rng: np.random.Generator, num_frames: int, fps: float, scale: float
) -> dict[str, np.ndarray]:
    """A distractor moves all the time on a curved path (never straight, never periodic bounce)."""
    t_sec = np.arange(num_frames) / fps
    speed_px = rng.uniform(*DISTRACTOR_SPEED_PX_PER_SEC) * scale / fps
    heading = np.cumsum(_smooth_wave(rng, t_sec, (0.02, 0.1))) * 2.0 / fps + rng.uniform(0, 2 * np.pi)
    spin = math.radians(rng.uniform(-DISTRACTOR_SPIN_DEG_PER_SEC, DISTRACTOR_SPIN_DEG_PER_SEC)) / fps
    return {
        "x": speed_px * np.cos(heading),
        "y": speed_px * np.sin(heading),
        "angle": np.full(num_frames, spin),
        "phase": np.zeros(num_frames),
    }


def build_cluttered_scene(
    rng: np.random.Generator, num_frames: int, fps: float, size_px: int, actions: Sequence[tuple[int, int, str]]
) -> Scene:
    """Draw objects, give each action `(start_frame, end_frame, label)` an actor, integrate every trajectory."""
    scale = size_px / REFERENCE_PX
    num_actors = int(rng.integers(2, 5))
    num_distractors = int(rng.integers(1, 3))
    objects = tuple(
        SceneObject(
            shape=str(rng.choice(SHAPES)),
            colour=PALETTE[int(rng.integers(len(PALETTE)))],
            is_distractor=i >= num_actors,
        )
        for i in range(num_actors + num_distractors)
    )
    instances = tuple(Instance(label, start, end, int(rng.integers(num_actors))) for start, end, label in actions)
    tracks = {k: np.empty((len(objects), num_frames)) for k in ("x", "y", "angle", "phase")}
    for i, obj in enumerate(objects):
        make = _distractor_increments if obj.is_distractor else _idle_increments
        inc = {k: v.copy() for k, v in make(rng, num_frames, fps, scale).items()}
        for inst in instances:
            if inst.actor == i:
                act = _motion_increments(inst.label, rng, inst.end_frame - inst.start_frame, fps, scale)
                for k in inc:
                    inc[k][inst.start_frame:inst.end_frame] = act[k]
        start = {"x": rng.uniform(0, size_px), "y": rng.uniform(0, size_px),
                 "angle": rng.uniform(0, 2 * np.pi), "phase": rng.uniform(0, 1)}
        for k in tracks:
            tracks[k][i] = start[k] + np.cumsum(inc[k])
    log_min, log_max = np.log(np.array(RADIUS_RANGE_PX) * scale)
    tracks["log_radius"] = log_min + np.mod(tracks["phase"], 1.0) * (log_max - log_min)
    return wrapped_scene(size_px, fps, instances, objects, tracks)


def wrapped_scene(size_px: int, fps: float, instances: tuple[Instance, ...], objects: tuple[SceneObject, ...],
                  tracks: dict[str, np.ndarray]) -> Scene:
    """A Scene from integrated tracks (O, N) of x, y, angle and log radius; positions wrap around the frame."""
    return Scene(
        size_px=size_px,
        fps=fps,
        instances=instances,
        objects=objects,
        x_px=np.mod(tracks["x"], size_px),
        y_px=np.mod(tracks["y"], size_px),
        angle_rad=tracks["angle"],
        radius_px=np.exp(tracks["log_radius"]),
    )
