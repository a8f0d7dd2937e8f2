"""The tuning split (lofi.splits): a fixed, seeded share of the training videos, independent of file order."""

from __future__ import annotations

import pytest

from lofi.annotations import AnnotationSet, LabelVocab, Segment, Video
from lofi.splits import TuningSplit, relabel


def _annotations(num_training: int, num_validation: int = 3) -> AnnotationSet:
    videos = [Video(f"t{i:03d}", "training", 10.0, segments=(Segment(1.0, 2.0, "a"),)) for i in range(num_training)]
    videos += [Video(f"v{i:03d}", "validation", 10.0) for i in range(num_validation)]
    return AnnotationSet(tuple(videos), LabelVocab.from_names(["a"]))


def test_a_fifth_of_the_training_videos_become_tuning_and_nothing_else_moves():
    ann = _annotations(50)
    out, chosen = TuningSplit(0.2, seed=0).apply(ann)
    assert len(chosen) == 10 and all(vid.startswith("t") for vid in chosen)
    assert out.subset_counts() == {"training": 40, "validation": 3, "testing": 0, "tuning": 10}
    assert {v.video_id for v in out.subset("tuning").videos} == set(chosen)
    assert out.get(chosen[0]).segments == ann.get(chosen[0]).segments  # ground truth travels with the video


def test_the_split_depends_on_the_seed_not_on_the_order_of_the_videos():
    ids = [f"t{i:03d}" for i in range(100)]
    split = TuningSplit(0.25, seed=3)
    assert split.choose(ids) == split.choose(list(reversed(ids))) == split.choose(ids + ids[:10])
    others = [TuningSplit(0.25, seed=s).choose(ids) for s in range(5)]
    assert len(set(others)) == 5  # another seed, other tuning videos
    assert len(set(TuningSplit(0.25, seed=0).choose(ids)) & set(TuningSplit(0.25, seed=1).choose(ids))) < 25


def test_no_fraction_no_split_and_relabel_ignores_unknown_ids():
    ann = _annotations(5)
    assert TuningSplit(0.0).apply(ann) == (ann, ())
    assert relabel(ann, ["t001", "missing"]).get("t001").subset == "tuning"
    with pytest.raises(ValueError, match="tuning fraction"):
        TuningSplit(1.0)
