"""G-TAD head: the k-NN graph, SGAlign's sampling, output shapes, gradients and its loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lofi.heads.common import HeadOutput
from lofi.heads.gtad import GCNeXt, GTAD, SGAlign, gtad_loss, knn_indices
from lofi.targets import TALTargets, make_targets

# Snippet 5 repeats snippet 0; the other values are spaced unevenly so no distance ties.
POSITIONS = [0.0, 1.0, 3.0, 6.0, 10.0, 0.0, 15.0, 21.0]


def _line_features(channels: int) -> torch.Tensor:
    """(1, C, 8): channel 0 holds POSITIONS, the rest zero, so distances are |p_i - p_j|."""
    x = torch.zeros(1, channels, len(POSITIONS))
    x[0, 0] = torch.tensor(POSITIONS)
    return x


def test_knn_graph_picks_the_nearest_snippets_in_feature_space():
    idx = knn_indices(_line_features(4), k=3)[0]  # (T, k)
    # by hand from POSITIONS: 0 -> itself, its duplicate 5, then 1 (|0-1| = 1)
    assert set(idx[0].tolist()) == {0, 1, 5}
    assert set(idx[5].tolist()) == {0, 1, 5}
    # 3 (at 6): itself, 2 (at 3, distance 3), 4 (at 10, distance 4); not 1 (distance 5)
    assert set(idx[3].tolist()) == {2, 3, 4}
    # 7 (at 21): itself, 6 (distance 6), 4 (distance 11)
    assert set(idx[7].tolist()) == {4, 6, 7}
    assert idx[3, 0].item() == 3  # nearest first: every snippet is its own neighbour


def test_gcnext_reads_temporal_and_semantic_neighbours_only():
    torch.manual_seed(0)
    block = GCNeXt(channels=32, knn_k=3, cardinality=8)
    x = _line_features(32).requires_grad_(True)
    y = block(x)
    assert y.shape == x.shape
    y[0, :, 0].sum().backward()
    touched = set(torch.nonzero(x.grad[0].abs().sum(dim=0)).flatten().tolist())
    # kernel-3 temporal edges reach snippet 1; the semantic k-NN edges reach 1 and 5
    assert touched == {0, 1, 5}


@pytest.mark.parametrize("num_snippets", [2, 7, 25])
def test_gcnext_keeps_shape_even_with_fewer_snippets_than_k(num_snippets):
    block = GCNeXt(channels=16, knn_k=3, cardinality=4)
    x = torch.randn(3, 16, num_snippets)
    assert block(x).shape == (3, 16, num_snippets)


def test_gcnext_rejects_cardinality_that_does_not_divide_hidden():
    with pytest.raises(ValueError, match="cardinality"):
        GCNeXt(channels=30, cardinality=8)


def _ramp(num_snippets: int) -> torch.Tensor:
    """(1, 2, T): both channels hold t + 1 at snippet t, so a sample reads its position + 1."""
    return (torch.arange(num_snippets, dtype=torch.float32) + 1.0).expand(1, 2, num_snippets).clone()


def test_sgalign_samples_evenly_inside_the_proposal_without_context():
    align = SGAlign(2, 3, num_snippets=10, max_duration=10, num_samples=4, expand_ratio=0.0)
    sampled = align.align(_ramp(10))  # (B, C, N, D, T)
    assert sampled.shape == (1, 2, 4, 10, 10)
    # [d=3, s=2] covers snippet centres 2..5, i.e. positions [1.5, 5.5]: 4 bins of 1 centred on 2, 3, 4, 5
    assert sampled[0, 1, :, 3, 2].tolist() == pytest.approx([3.0, 4.0, 5.0, 6.0])
    # [d=0, s=4] covers [3.5, 4.5]: bins of 0.25 centred on 3.625, 3.875, 4.125, 4.375
    assert sampled[0, 0, :, 0, 4].tolist() == pytest.approx([4.625, 4.875, 5.125, 5.375])
    # invalid cell (s + d = 11 >= T): no features
    assert sampled[0, :, :, 5, 6].abs().sum().item() == 0.0


def test_sgalign_context_doubles_the_region_and_is_zero_outside_the_video():
    align = SGAlign(2, 3, num_snippets=10, max_duration=10, num_samples=4, expand_ratio=0.5)
    sampled = align.align(_ramp(10))[0, 0]  # (N, D, T)
    # [d=1, s=4]: [3.5, 5.5] grown by 1 on each side = [2.5, 6.5]: centres 3, 4, 5, 6
    assert sampled[:, 1, 4].tolist() == pytest.approx([4.0, 5.0, 6.0, 7.0])
    # [d=1, s=0]: [-1.5, 2.5]: the centre -1 lies before the video (< -0.5) and reads 0
    assert sampled[:, 1, 0].tolist() == pytest.approx([0.0, 1.0, 2.0, 3.0])
    # [d=1, s=8]: [6.5, 10.5]: the centre 10 lies after the video (> 9.5) and reads 0
    assert sampled[:, 1, 8].tolist() == pytest.approx([8.0, 9.0, 10.0, 0.0])
    # [d=7, s=1]: [0.5, 8.5] grown by 4 = [-3.5, 12.5]; bins of 4 average 4 points 1 apart:
    # {-3,-2,-1,0} -> (0+0+0+1)/4, {1..4} -> 3.5, {5..8} -> 7.5, {9,10,11,12} -> (10+0+0+0)/4
    assert sampled[:, 7, 1].tolist() == pytest.approx([0.25, 3.5, 7.5, 2.5])


def test_sgalign_forward_equals_a_1x1_conv_over_the_sampled_features():
    torch.manual_seed(0)
    T, D, N, C, O = 12, 9, 5, 3, 4
    align = SGAlign(C, O, num_snippets=T, max_duration=D, num_samples=N)
    x = torch.randn(2, C, T)
    sampled = align.align(x).reshape(2, C * N, D, T)  # channels ordered (c, n)
    expected = torch.einsum("ok,bkdt->bodt", align.proj.weight, sampled) + align.proj.bias.view(1, O, 1, 1)
    torch.testing.assert_close(align(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("num_snippets", "max_duration"), [(25, 25), (25, 10), (50, 50), (50, 20), (100, 100), (100, 64)]
)
def test_gtad_output_shapes_and_ranges(num_snippets, max_duration):
    torch.manual_seed(0)
    head = GTAD(24, num_snippets, max_duration, num_classes=3, hidden=32, cardinality=8, num_align_samples=4)
    out = head(torch.randn(2, 24, num_snippets))
    assert isinstance(out, HeadOutput)
    assert out.start.shape == out.end.shape == (2, num_snippets)
    assert out.iou_cls.shape == out.iou_reg.shape == (2, max_duration, num_snippets)
    assert out.class_logits.shape == (2, 3, num_snippets)
    for probs in (out.start, out.end, out.iou_cls, out.iou_reg):
        assert probs.min() >= 0.0 and probs.max() <= 1.0


def test_gtad_rejects_features_of_another_length():
    head = GTAD(8, 16, 16, num_classes=2, hidden=16, cardinality=4, num_align_samples=2)
    with pytest.raises(ValueError, match="16 snippets"):
        head(torch.randn(1, 8, 20))


def test_gradients_reach_the_input_features_through_every_output():
    torch.manual_seed(0)
    head = GTAD(8, 16, 12, num_classes=2, hidden=16, cardinality=4, num_align_samples=4)
    for name in ("start", "end", "iou_cls", "iou_reg", "class_logits"):
        x = torch.randn(2, 8, 16, requires_grad=True)
        getattr(head(x), name).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), name
        assert x.grad.abs().sum() > 0, name


def test_gtad_loss_weights_classification_ten_times_with_smoothed_counts():
    # T = 2, D = 1: two valid cells, one positive (IoU 0.95 > 0.9) and one negative.
    out = HeadOutput(
        start=torch.full((1, 2), 0.5), end=torch.full((1, 2), 0.5),
        iou_cls=torch.full((1, 1, 2), 0.5), iou_reg=torch.tensor([[[0.95, 0.1]]]),
        class_logits=torch.zeros(1, 1, 2),
    )  # fmt: skip
    targets = TALTargets(
        start=torch.tensor([[1.0, 0.0]]), end=torch.tensor([[0.0, 1.0]]),
        iou_map=torch.tensor([[[0.95, 0.1]]]), classes=torch.tensor([[[1.0, 0.0]]]),
    )  # fmt: skip
    parts = gtad_loss(out, targets)
    # counts smoothed by 10: 11 positives, 11 negatives, 22 in all, both weights 0.5 * 22 / 11 = 1;
    # loss = -(ln 0.5 + ln 0.5) / 22
    assert parts["iou_cls"].item() == pytest.approx(2 * math.log(2) / 22, rel=1e-4)
    # regression is exact at both sampled cells; node loss: one positive, one negative per
    # boundary, weights 0.5 * 2 / 1 = 1, -(2 ln 0.5) / 2 = ln 2 each for start and end
    assert parts["iou_reg"].item() == pytest.approx(0.0, abs=1e-12)
    assert parts["boundary"].item() == pytest.approx(2 * math.log(2), rel=1e-4)
    # classes: BCE at logit 0 is ln 2 per (class, snippet), summed over K = 1, mean over 2 snippets
    assert parts["classes"].item() == pytest.approx(math.log(2), rel=1e-4)
    expected = parts["boundary"] + parts["iou_reg"] + 10 * parts["iou_cls"] + parts["classes"]
    assert parts["total"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_gtad_loss_falls_when_overfitting_two_videos():
    torch.manual_seed(0)
    np.random.seed(0)
    T, K = 16, 3
    videos = [
        (np.array([[4.0, 9.5]]), np.array([1]), 20.0),
        (np.array([[1.0, 3.0], [20.0, 30.0]]), np.array([0, 2]), 32.0),
    ]
    targets = make_targets(videos, num_snippets=T, max_duration=T, num_classes=K)
    features = torch.randn(2, 16, T)
    head = GTAD(16, T, T, num_classes=K, hidden=32, cardinality=8, num_align_samples=4)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    totals = []
    for _ in range(100):  # ~0.05 x the first loss after 100 steps on 3 seeds tried
        loss = gtad_loss(head(features), targets)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    assert np.mean(totals[-5:]) < 0.5 * totals[0], (totals[0], totals[-5:])
