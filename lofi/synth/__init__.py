"""The demo dataset: synthetic untrimmed videos whose action classes only motion can tell apart.

Every video shows a static textured background (a two-colour gradient plus stripes, a
checkerboard or soft blobs, drawn per video) and 3-6 objects: 2-4 possible actors and 1-2
distractors. Shapes (square, bar, triangle, cross, ellipse) and colours come from one shared
pool for every class and for the background, and object sizes span the same range
everywhere, so no single frame shows which action, if any, is going on.

Outside actions the actors are static or wander slowly (at most 2.5 px/s at 128 px), and the
distractors glide all the time on curved paths (5-14 px/s) while spinning slowly (under
20 deg/s). During an action instance one actor performs one of six motion classes:

- ``move_left`` / ``move_right``: translates horizontally at 22-40 px/s (the scene wraps
  around, so it re-enters at the other edge);
- ``rotate``: spins at 90-180 deg/s, either direction;
- ``grow``: its size sweeps from the smallest to the largest object size in 1-2.5 s, then
  snaps back and sweeps again;
- ``shrink``: the same in reverse (large to small, snap back);
- ``bounce``: hops up and down, 14-30 px high, 0.6-1.2 s per hop.

(Distances are for 128 px frames and scale with ``size_px``.) Each video lasts
``min_duration_sec``-``max_duration_sec`` (uniform), holds at least two non-overlapping
instances of 1-20 s with at least 1 s of background before, between and after them, and
actions fill about 30-60% of it. Defaults are 128 px and 10 fps: enough to see every motion
class, cheap to decode and train on a CPU.

Entry points: ``generate(out_dir, SynthConfig(...)) -> SynthSummary`` and ``lofi synth``.
"""

from lofi.synth.generate import (
    ANNOTATIONS_FILE,
    CORRUPT_KINDS,
    SUMMARY_FILE,
    VIDEO_DIR,
    SynthConfig,
    SynthSummary,
    generate,
    VideoPlan,
    make_scene,
    plan_dataset,
    video_id,
)
from lofi.synth.scene import MOTION_CLASSES

__all__ = [
    "ANNOTATIONS_FILE",
    "CORRUPT_KINDS",
    "MOTION_CLASSES",
    "SUMMARY_FILE",
    "VIDEO_DIR",
    "SynthConfig",
    "SynthSummary",
    "generate",
    "VideoPlan",
    "make_scene",
    "plan_dataset",
    "video_id",
]
