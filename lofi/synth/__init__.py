"""The demo dataset: synthetic videos whose action classes only motion can tell apart.

Six motion classes (``MOTION_CLASSES``): ``move_left``, ``move_right``, ``rotate``, ``grow``,
``shrink``, ``bounce``. Shapes (square, bar, triangle, cross, ellipse), colours and sizes are
drawn independently of the class, so no single frame shows which action, if any, is going on.
Two kinds of untrimmed videos (``SynthConfig.scene``), written with ActivityNet-v1.3
annotations by ``generate`` / ``lofi synth``:

- ``simple`` (default, ``lofi.synth.simple``): a plain muted background and one object per
  action instance, each acting exactly once and static otherwise, objects apart at rest,
  radius 5-15 px at 64 px; motions chosen to stay unambiguous when a 24-36 s video is sampled
  sparsely (rotate 40-60 deg/s, move 12-24 px/s at 64 px, bounce hops of 2-4 s, grow/shrink
  one monotonic x3 sweep across the instance). A small encoder trained from scratch can learn
  these.
- ``cluttered`` (``lofi.synth.scene``), a stress test: a textured background, 2-4 actors plus
  1-2 distractors gliding and spinning all the time, fast motions (rotate 90-180 deg/s,
  bounce hops of 0.6-1.2 s, grow/shrink sweeps that snap back), radius 4-10 px at 64 px.

Each video lasts ``min_duration_sec``-``max_duration_sec`` (uniform) and holds at least two
non-overlapping instances of ``min_instance_sec``-``max_instance_sec`` with at least 1 s of
background before, between and after them; actions fill about 30-60% of it. Defaults: 64 px,
10 fps, 24-36 s videos, 3-6 s instances.

``generate_clips`` / ``lofi synth-clips`` write trimmed clips of the same simple-scene motions
for stage-1 pre-training (Kinetics-style CSV, ``lofi.synth.clips``). Both generators give the
same bytes for the same seed on any machine (``lofi.synth.encode``).
"""

from lofi.synth.clips import (
    CLIP_VIDEO_DIR,
    CLIPS_FILE,
    CLIPS_SUMMARY_FILE,
    ClipSummary,
    ClipSynthConfig,
    generate_clips,
    plan_clips,
)
from lofi.synth.generate import (
    ANNOTATIONS_FILE,
    CORRUPT_KINDS,
    SCENES,
    SUMMARY_FILE,
    VIDEO_DIR,
    SynthConfig,
    SynthSummary,
    VideoPlan,
    generate,
    make_scene,
    plan_dataset,
    video_id,
)
from lofi.synth.scene import MOTION_CLASSES

__all__ = [
    "ANNOTATIONS_FILE",
    "CLIPS_FILE",
    "CLIPS_SUMMARY_FILE",
    "CLIP_VIDEO_DIR",
    "CORRUPT_KINDS",
    "MOTION_CLASSES",
    "SCENES",
    "SUMMARY_FILE",
    "VIDEO_DIR",
    "ClipSummary",
    "ClipSynthConfig",
    "SynthConfig",
    "SynthSummary",
    "VideoPlan",
    "generate",
    "generate_clips",
    "make_scene",
    "plan_clips",
    "plan_dataset",
    "video_id",
]
