"""Stage-1 clip helpers: augmentation keeps what the label depends on; balance and recall by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lofi.clips import (class_weights, classification_metrics, random_resized_crop, random_side, recall_counts,
                        temporal_window)


def _numbered_clips(b: int, f: int, size: int = 8) -> torch.Tensor:
    """Clips whose frame k is filled with the value 10*k: a frame's index is readable from its pixels."""
    frames = torch.arange(f, dtype=torch.uint8)[None, :, None, None, None] * 10
    return frames.expand(b, f, size, size, 3).clone()


def test_temporal_window_takes_consecutive_frames_and_centres_for_validation():
    clips = _numbered_clips(64, 8)
    torch.manual_seed(0)
    jittered = temporal_window(clips, 4, jitter=True)
    assert jittered.shape == (64, 4, 8, 8, 3)
    firsts = jittered[:, :, 0, 0, 0].long() // 10  # (B, 4) frame indices
    assert torch.equal(firsts - firsts[:, :1], torch.arange(4).expand(64, 4))  # consecutive, spacing kept
    assert set(firsts[:, 0].tolist()) == {0, 1, 2, 3, 4}  # every start that fits is drawn
    centred = temporal_window(clips, 4, jitter=False)[:, :, 0, 0, 0].long() // 10
    assert torch.equal(centred, torch.tensor([2, 3, 4, 5]).expand(64, 4))
    assert temporal_window(clips, 0, jitter=True) is clips and temporal_window(clips, 8, jitter=True) is clips


def test_random_crop_keeps_shape_and_a_motion_direction():
    # a bright column moving right by 2 px per frame must still move right (not left) after any crop
    clips = torch.zeros(16, 4, 32, 32, 3, dtype=torch.uint8)
    for f in range(4):
        clips[:, f, :, 8 + 2 * f:10 + 2 * f] = 255
    torch.manual_seed(1)
    out = random_resized_crop(clips, 0.6)
    assert out.shape == clips.shape and out.dtype == torch.uint8
    assert not torch.equal(out, clips)  # something was cropped
    columns = out[..., 0].float().mean(dim=2)  # (B, F, W) brightness per column
    centre = (columns * torch.arange(32.0)).sum(-1) / columns.sum(-1)  # (B, F)
    assert (centre[:, 1:] > centre[:, :-1]).all()
    assert random_resized_crop(clips, 1.0) is clips


def test_multi_scale_draws_sides_in_range_and_resizes_a_batch_keeping_the_motion():
    torch.manual_seed(2)
    sides = {random_side(64, 0.5) for _ in range(400)}
    assert min(sides) == 32 and max(sides) == 64 and len(sides) > 25  # uniform over [0.5, 1] of the side
    assert random_side(64, 1.0) == 64
    clips = torch.zeros(4, 4, 32, 32, 3, dtype=torch.uint8)
    for f in range(4):  # a bright column moving right by 4 px per frame
        clips[:, f, :, 4 + 4 * f:8 + 4 * f] = 255
    for scale in (1.0, 0.7):
        out = random_resized_crop(clips, scale, size_px=16)
        assert out.shape == (4, 4, 16, 16, 3) and out.dtype == torch.uint8
        columns = out[..., 0].float().mean(dim=2)
        centre = (columns * torch.arange(16.0)).sum(-1) / columns.sum(-1)  # (B, F)
        assert (centre[:, 1:] > centre[:, :-1]).all()
    # no crop: the whole frame is resized, so the column lands at half its place
    whole = random_resized_crop(clips, 1.0, size_px=16)[0, 0, 0, :, 0].float()
    assert whole[2:4].min() > 200 and whole[:1].max() < 60 and whole[5:].max() < 60


def test_class_weights_equalise_total_weight_per_present_class():
    weights = class_weights([10, 30, 0, 60])
    assert weights == pytest.approx([100 / 30, 100 / 90, 0.0, 100 / 180])
    totals = np.array(weights) * np.array([10, 30, 0, 60])
    assert totals[[0, 1, 3]] == pytest.approx([totals[0]] * 3)


def test_balanced_accuracy_is_the_mean_recall_over_classes_with_clips():
    # class 0: 8 clips, 6 right; class 1: 2 clips, 0 right; class 2: none
    labels = torch.tensor([0] * 8 + [1] * 2)
    predicted = torch.tensor([0] * 6 + [1, 1] + [0, 0])
    logits = torch.nn.functional.one_hot(predicted, 3).float()
    correct, support = recall_counts(logits, labels, 3)
    assert correct.tolist() == [6, 0, 0] and support.tolist() == [8, 2, 0]
    m = classification_metrics(correct, support, ["a", "b", "c"], "val_")
    assert m["val_accuracy"] == pytest.approx(0.6)
    assert m["val_balanced_accuracy"] == pytest.approx((6 / 8 + 0) / 2)
    assert m["val_recall_a"] == pytest.approx(0.75) and m["val_recall_b"] == 0.0 and "val_recall_c" not in m
