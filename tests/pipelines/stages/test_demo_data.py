"""The demo's stage-1 clip set: which TAL classes it leaves out per seed, and how many clips it holds."""

from __future__ import annotations

from collections import Counter

from lofi.synth import MOTION_CLASSES
from pipelines.stages.demo import (CLIPS_PER_CLASS, UNSEEN_CLASSES, DemoOptions, clip_synth_config, resolve_config,
                                   unseen_classes)


def test_every_class_is_left_out_once_in_each_run_of_consecutive_seeds():
    window = len(MOTION_CLASSES) // UNSEEN_CLASSES
    for first in (0, 1, 5):
        left_out = [c for seed in range(first, first + window) for c in unseen_classes(seed)]
        assert Counter(left_out) == {c: 1 for c in MOTION_CLASSES}
    assert unseen_classes(3) == unseen_classes(3 + window)


def test_clip_set_leaves_out_the_seeds_classes_and_keeps_clips_per_class():
    for seed in (0, 1):
        opts = DemoOptions(seed=seed, out="unused")
        clips = clip_synth_config(resolve_config(opts), opts)
        assert clips.leave_out == unseen_classes(seed) and clips.seed == seed
        shown = [c for c in clips.classes() if c != "still"]
        assert len(shown) == len(MOTION_CLASSES) - UNSEEN_CLASSES and not set(shown) & set(clips.leave_out)
        assert clips.num_clips == CLIPS_PER_CLASS * (len(shown) + 1)  # the shown classes and still
    opts = DemoOptions(seed=0, out="unused", clips=70)
    assert clip_synth_config(resolve_config(opts), opts).num_clips == 70
