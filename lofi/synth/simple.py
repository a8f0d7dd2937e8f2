"""Simple scenes: a plain background and one object per action instance, still only motion tells the class.

Built so that a small encoder trained from scratch can learn the classes from frames sampled
sparsely over a whole video. Every object acts exactly once and is static otherwise; at rest
every object sits inside the frame, apart from the others (only a video with far more
instances than the demo's 2-3 may have to let them touch); an idle object that never acts
joins about half the videos. Shapes, colours and sizes are drawn independently of the class.
The same `draw_motion` and `motion_offsets` make the trimmed clips of `lofi synth-clips`, so
stage-1 clips and TAL instances show the same motions.

Distances are in pixels of the 128 px reference frame (`scene.REFERENCE_PX`) and scale with
`size_px / 128`: a radius of 10-30 px at 128 px is 5-15 px at the demo's 64 px.

Motion ranges and the sparse sampling they are made for. The demo samples each 24-36 s video
at T*F = 128 (full, s_lofi), 96 (st_lofi) or 64 (t_lofi) frames spread evenly, so sampled
frames are 24/128 = 0.19 s apart at the densest and 36/64 = 0.56 s at the sparsest, plus up
to one 0.1 s frame where a sample snaps to the nearest frame: 0.66 s.

- rotate, 40-60 deg/s either way: at most 40 deg between samples at 0.66 s, under half the
  90 deg symmetry of square and cross, so a spin never looks static or reversed; at least
  7.5 deg per sample at 0.19 s.
- move_left / move_right, 24-48 px/s: at most 32 px (a quarter of the frame) between samples
  at 0.66 s, under the half frame past which a wrap-around would look like moving back; at
  least 4.5 px (2.25 px at 64 px) per sample at 0.19 s.
- bounce, 20-36 px high, one hop per 2-4 s (whole hops, so it lands where it took off): a hop
  spans at least three samples at 0.66 s.
- grow / shrink: the radius sweeps monotonically from the smallest to the largest size (x3),
  or back, once across the instance, then stays: no snap-back for sparse samples to alias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lofi.synth.render import make_plain_background
from lofi.synth.scene import MOTION_CLASSES, PALETTE, REFERENCE_PX, SHAPES, Instance, Scene, SceneObject, wrapped_scene

RADIUS_RANGE_PX = (10.0, 30.0)  # grow and shrink span all of it: a size ratio of 3
ROTATE_DEG_PER_SEC = (40.0, 60.0)
MOVE_SPEED_PX_PER_SEC = (24.0, 48.0)
BOUNCE_HEIGHT_PX = (20.0, 36.0)
BOUNCE_PERIOD_SEC = (2.0, 4.0)
# The caps the ranges above keep at the sampling described in the module docstring.
MAX_TURN_PER_SAMPLE_DEG = 40.0
MAX_MOVE_PER_SAMPLE_FRAMES = 0.5  # in frame widths
MIN_SAMPLES_PER_HOP = 3
MIN_SIZE_RATIO = 2.0
EXTRA_OBJECT_PROB = 0.5  # a video holds 0-1 objects that never act
REST_GAP_PX = 4.0  # free space between objects at rest
MIN_CONTRAST = 100.0  # RGB distance between an object's colour and the background
PLACEMENT_TRIES = 256  # random spots per object
PLACEMENT_RESTARTS = 20
# Trimmed clips (build_clip_scene) mimic a window of a TAL instance: the instance lengths
# their motions are drawn for (SynthConfig's defaults), and the static objects beside the actor.
CLIP_INSTANCE_SEC = (3.0, 6.0)
STILL_CLASS = "still"  # a clip where no object acts: what a TAL video shows between its actions
CLIP_IDLE_OBJECTS = (0, 2)


@dataclass(frozen=True)
class Motion:
    """What one object does while it acts; lengths at the 128 px reference, signs as drawn."""

    label: str
    speed_px_per_sec: float = 0.0  # move: + is to the right
    spin_deg_per_sec: float = 0.0  # rotate
    bounce_height_px: float = 0.0
    bounce_period_sec: float = 0.0  # bounce: one hop
    sweep_sec: float = 0.0  # grow / shrink: seconds for the whole radius range (the instance's duration)


def draw_motion(label: str, rng: np.random.Generator, duration_sec: float) -> Motion:
    """The motion parameters of one action lasting `duration_sec`, for TAL instances and clips alike."""
    if label in ("move_left", "move_right"):
        speed = rng.uniform(*MOVE_SPEED_PX_PER_SEC)
        return Motion(label, speed_px_per_sec=-speed if label == "move_left" else speed)
    if label == "rotate":
        return Motion(label, spin_deg_per_sec=rng.uniform(*ROTATE_DEG_PER_SEC) * rng.choice([-1.0, 1.0]))
    if label == "bounce":
        height = rng.uniform(*BOUNCE_HEIGHT_PX)
        low, high = BOUNCE_PERIOD_SEC
        fewest, most = max(1, math.ceil(duration_sec / high - 1e-9)), math.floor(duration_sec / low + 1e-9)
        # A whole number of hops when one fits the period range; a too-short action ends mid-hop.
        period = duration_sec / int(rng.integers(fewest, most + 1)) if most >= fewest else rng.uniform(low, high)
        return Motion(label, bounce_height_px=height, bounce_period_sec=period)
    if label in ("grow", "shrink"):
        return Motion(label, sweep_sec=duration_sec)
    raise ValueError(f"unknown motion class {label!r}; known: {', '.join(MOTION_CLASSES)}")


def rest_radii(label: str | None, rng: np.random.Generator) -> tuple[float, float]:
    """Radius (128 px reference) before and after the action; a size independent of the class otherwise."""
    low, high = RADIUS_RANGE_PX
    if label == "grow":
        return low, high
    if label == "shrink":
        return high, low
    radius = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    return radius, radius


def motion_offsets(motion: Motion, num_frames: int, fps: float, scale: float) -> dict[str, np.ndarray]:
    """Changes from the rest state on each of the action's frames: x, y (px), angle (rad), log radius.

    Frame k of the action is (k + 1) / fps seconds in, so its first frame already differs from
    the frame before and its last frame holds the final state, which the object keeps.
    """
    t_sec = np.arange(1, num_frames + 1) / fps
    zero = np.zeros(num_frames)
    out = {"x": zero, "y": zero, "angle": zero, "log_radius": zero}
    if motion.label in ("move_left", "move_right"):
        out["x"] = motion.speed_px_per_sec * scale * t_sec
    elif motion.label == "rotate":
        out["angle"] = np.radians(motion.spin_deg_per_sec) * t_sec
    elif motion.label == "bounce":  # screen y points down
        out["y"] = -motion.bounce_height_px * scale * np.abs(np.sin(np.pi * t_sec / motion.bounce_period_sec))
    elif motion.label in ("grow", "shrink"):
        sweep = math.log(RADIUS_RANGE_PX[1] / RADIUS_RANGE_PX[0]) * t_sec / motion.sweep_sec
        out["log_radius"] = sweep if motion.label == "grow" else -sweep
    return out


def _look(rng: np.random.Generator, background: np.ndarray) -> SceneObject:
    """Shape and a colour that stands out from the background, both independent of the class."""
    mean = background.reshape(-1, 3).astype(float).mean(axis=0)
    distance = np.linalg.norm(np.array(PALETTE, dtype=float) - mean, axis=1)
    candidates = np.flatnonzero(distance >= MIN_CONTRAST)
    if len(candidates) < 2:
        candidates = np.argsort(distance)[-3:]
    return SceneObject(shape=str(rng.choice(SHAPES)), colour=PALETTE[int(rng.choice(candidates))],
                       is_distractor=False)


def _torus_distance(a: np.ndarray, b: np.ndarray, size_px: int) -> np.ndarray:
    """Distance between points (..., 2) on the frame wrapped around like a torus."""
    delta = np.abs(a - b) % size_px
    return np.linalg.norm(np.minimum(delta, size_px - delta), axis=-1)


def _place(rng: np.random.Generator, size_px: int, extents: np.ndarray, shifts: np.ndarray,
           optional: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rest centres (O, 2), each object inside the frame and clear of the others whenever it rests,
    and which objects are kept: an optional one that finds no room is left out.

    An object of radius `extents[o]` rests at its centre before acting and at centre +
    `shifts[o]` after (a move wraps around the frame). Objects are placed one by one, largest
    first, each at the first of PLACEMENT_TRIES random spots that leaves REST_GAP_PX to those
    placed. When a required object finds no such spot the layout starts over; after
    PLACEMENT_RESTARTS the roomiest layout is kept (only a frame crowded with many instances
    needs that).
    """
    gap = REST_GAP_PX * size_px / REFERENCE_PX
    order = sorted(range(len(extents)), key=lambda i: (bool(optional[i]), -extents[i]))
    best, best_room = None, -np.inf
    for _ in range(PLACEMENT_RESTARTS):
        centres, kept = np.zeros((len(extents), 2)), np.zeros(len(extents), dtype=bool)
        rests, rest_extents = np.zeros((0, 2)), np.zeros(0)  # rest points of the objects placed so far
        worst = np.inf  # least room left by a required object
        for o in order:
            ext = extents[o]
            spots = ext + rng.random(size=(PLACEMENT_TRIES, 2)) * (size_px - 2 * ext)  # (K, 2)
            ends = spots + shifts[o]
            end_x = ends[:, 0] % size_px  # where a mover stops must be inside the frame too
            room = np.minimum(end_x - ext, size_px - ext - end_x)  # (K,)
            if len(rests):
                own = np.stack([spots, ends], axis=1)  # (K, 2, 2): before and after
                clear = _torus_distance(own[:, :, None], rests[None, None], size_px) - ext - rest_extents  # (K, 2, P)
                room = np.minimum(room, clear.min(axis=(1, 2)))
            fits = np.flatnonzero(room >= gap)
            if not len(fits) and optional[o]:
                continue
            pick = int(fits[0]) if len(fits) else int(np.argmax(room))
            worst = min(worst, float(room[pick]))
            centres[o], kept[o] = spots[pick], True
            rests = np.concatenate([rests, spots[pick:pick + 1], ends[pick:pick + 1]])
            rest_extents = np.concatenate([rest_extents, [ext, ext]])
        if worst >= gap:
            return centres, kept
        if worst > best_room:
            best, best_room = (centres, kept), worst
    return best


def build_simple_scene(
    rng: np.random.Generator, num_frames: int, fps: float, size_px: int, actions: Sequence[tuple[int, int, str]]
) -> tuple[Scene, np.ndarray]:
    """One actor per action `(start_frame, end_frame, label)`, 0-1 idle objects; the scene and its background."""
    scale = size_px / REFERENCE_PX
    background = make_plain_background(rng, size_px)
    num_idle = int(rng.random() < EXTRA_OBJECT_PROB)
    labels = [label for _, _, label in actions] + [None] * num_idle
    objects = tuple(_look(rng, background) for _ in labels)
    radii = np.array([rest_radii(label, rng) for label in labels]) * scale  # (O, 2): before, after
    changes = [motion_offsets(draw_motion(label, rng, (end - start) / fps), end - start, fps, scale)
               for start, end, label in actions]
    shifts = np.array([[c["x"][-1], 0.0] for c in changes] + [[0.0, 0.0]] * num_idle)  # (O, 2)
    centres, kept = _place(rng, size_px, radii.max(axis=1), shifts, np.array([label is None for label in labels]))
    # Actors come first and are always kept; an idle object that found no room is left out.
    count = int(kept.sum())
    objects, radii, centres, labels = objects[:count], radii[:count], centres[:count], labels[:count]
    tracks = {
        "x": np.repeat(centres[:, :1], num_frames, axis=1),
        "y": np.repeat(centres[:, 1:], num_frames, axis=1),
        "angle": np.repeat(rng.uniform(0, 2 * np.pi, size=(len(labels), 1)), num_frames, axis=1),
        "log_radius": np.repeat(np.log(radii[:, :1]), num_frames, axis=1),
    }
    for i, ((start, end, _), change) in enumerate(zip(actions, changes)):
        for key, track in tracks.items():
            track[i, start:end] += change[key]
            track[i, end:] += change[key][-1]  # the object rests in its final state
    instances = tuple(Instance(label, start, end, i) for i, (start, end, label) in enumerate(actions))
    return wrapped_scene(size_px, fps, instances, objects, tracks), background


def build_clip_scene(
    rng: np.random.Generator, label: str, num_frames: int, fps: float, size_px: int,
    instance_sec: tuple[float, float] = CLIP_INSTANCE_SEC, idle_objects: tuple[int, int] = CLIP_IDLE_OBJECTS,
) -> tuple[Scene, np.ndarray]:
    """A trimmed clip: `num_frames` cut from a TAL-like instance of `label`; the scene and background.

    The clip looks like a window of a simple scene: its motion is drawn for an instance of
    `instance_sec` (uniform) as in a TAL video, so a grow or shrink changes size at the rate
    of one sweep across that instance (the clip shows a random part of the sweep) and a bounce
    hops at the same periods; and the actor shares the frame with `idle_objects` (inclusive
    range) static objects, as an actor in a TAL video shares it with the other instances'
    objects. A classifier trained on the clips then meets no other motion rates and no
    emptier frames than the TAL snippets it is scored on. Label STILL_CLASS: nothing acts.
    """
    scale = size_px / REFERENCE_PX
    background = make_plain_background(rng, size_px)
    if label == STILL_CLASS:  # the "actor" rests like the others: no change on any frame
        motion = Motion(label)
    else:
        motion = draw_motion(label, rng, float(rng.uniform(*instance_sec)))
    change = motion_offsets(motion, num_frames, fps, scale)
    if label in ("grow", "shrink"):
        full = math.log(RADIUS_RANGE_PX[1] / RADIUS_RANGE_PX[0])
        shown = min(full, abs(float(change["log_radius"][-1])))
        start = RADIUS_RANGE_PX[0] * math.exp(rng.uniform(0.0, full - shown))  # the part of the sweep shown
        actor = (start, start * math.exp(shown)) if label == "grow" else (start * math.exp(shown), start)
        change["log_radius"] = np.clip(change["log_radius"], -shown, shown)
    else:
        actor = rest_radii(label, rng)
    num_idle = int(rng.integers(idle_objects[0], idle_objects[1] + 1))
    labels = [label] + [None] * num_idle
    objects = tuple(_look(rng, background) for _ in labels)
    radii = np.array([actor] + [rest_radii(None, rng) for _ in range(num_idle)]) * scale  # (O, 2): before, after
    shifts = np.array([[change["x"][-1], 0.0]] + [[0.0, 0.0]] * num_idle)
    centres, kept = _place(rng, size_px, radii.max(axis=1), shifts, np.array([lb is None for lb in labels]))
    count = int(kept.sum())  # the actor is always kept; an idle object without room is left out
    tracks = {
        "x": np.repeat(centres[:count, :1], num_frames, axis=1),
        "y": np.repeat(centres[:count, 1:], num_frames, axis=1),
        "angle": np.repeat(rng.uniform(0, 2 * np.pi, size=(count, 1)), num_frames, axis=1),
        "log_radius": np.repeat(np.log(radii[:count, :1]), num_frames, axis=1),
    }
    for key, track in tracks.items():
        track[0] += change[key]
    return wrapped_scene(size_px, fps, (Instance(label, 0, num_frames, 0),), objects[:count], tracks), background
