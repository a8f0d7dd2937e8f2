"""BMN head: shapes at every fidelity's T, the boundary-matching layer, gradients, and training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lofi.heads.bmn import BMN, bm_sampling_mask
from lofi.heads.common import HeadOutput, tal_loss
from lofi.targets import make_targets


@pytest.fixture
def one_thread():
    # The test machine is shared; tiny convs run far faster without intra-op threads fighting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("num_snippets", [25, 50, 100])
@pytest.mark.parametrize("full_duration", [True, False])
def test_output_shapes(num_snippets, full_duration, one_thread):
    max_duration = num_snippets if full_duration else num_snippets // 5
    net = BMN(12, num_snippets, max_duration, num_classes=7, hidden=16, num_sample=4, num_sample_perbin=2)
    with torch.no_grad():
        out = net(torch.randn(2, 12, num_snippets))
    assert isinstance(out, HeadOutput)
    assert out.start.shape == out.end.shape == (2, num_snippets)
    assert out.iou_cls.shape == out.iou_reg.shape == (2, max_duration, num_snippets)
    assert out.class_logits.shape == (2, 7, num_snippets)
    for x in (out.start, out.end, out.iou_cls, out.iou_reg):
        assert x.min() >= 0 and x.max() <= 1


def test_default_sampling_sizes_at_t25(one_thread):
    net = BMN(16, 25, 25, num_classes=3, hidden=16)  # num_sample=32, num_sample_perbin=3 as BMN
    assert net.sample_mask.shape == (25, 32 * 25 * 25)
    with torch.no_grad():
        out = net(torch.randn(1, 16, 25))
    assert out.iou_cls.shape == (1, 25, 25)


def test_constant_features_give_constant_bm_features():
    net = BMN(8, 10, 6, num_classes=2, hidden=8, num_sample=5, num_sample_perbin=3)
    bm = net.boundary_matching(torch.full((2, 3, 10), 2.5))  # (B, C, N, D, T)
    assert bm.shape == (2, 3, 5, 6, 10)
    valid = (torch.arange(6)[:, None] + torch.arange(10)[None, :]) < 10  # s + d < T
    assert torch.allclose(bm[..., valid], torch.tensor(2.5))
    assert bm[..., ~valid].abs().max() == 0  # proposals past the video end read nothing


def test_sample_weights_sum_to_one_per_valid_sample():
    mask = bm_sampling_mask(12, 12, num_sample=7, num_sample_perbin=3, prop_boundary_ratio=0.5)
    sums = mask.sum(axis=0)  # (N, D, T)
    valid = (np.arange(12)[:, None] + np.arange(12)[None, :]) < 12
    np.testing.assert_allclose(sums[:, valid], 1.0, atol=1e-6)
    assert np.all(sums[:, ~valid] == 0)


def test_hand_checked_sample_positions():
    # T=8, 2 samples, 1 sub-sample each, no boundary extension. Proposal [d=1, s=2] covers
    # snippets 2..3 = units [2, 4); features sit at snippet centres, so in feature-index
    # coordinates it spans [1.5, 3.5]: sample 0 at 1.5 (half snippet 1, half 2) and sample 1
    # at 3.5 (half snippet 3, half 4).
    mask = bm_sampling_mask(8, 8, num_sample=2, num_sample_perbin=1, prop_boundary_ratio=0.0)
    expected0, expected1 = np.zeros(8), np.zeros(8)
    expected0[[1, 2]] = 0.5
    expected1[[3, 4]] = 0.5
    np.testing.assert_allclose(mask[:, 0, 1, 2], expected0)
    np.testing.assert_allclose(mask[:, 1, 1, 2], expected1)


def test_sub_samples_are_averaged_and_clamped_at_the_video_start():
    # One sample made of 3 sub-samples over proposal [d=0, s=0] = index coords [-0.5, 0.5]:
    # sub-samples at -0.5 (clamped to 0), 0 and 0.5 give snippet 0 weights 1, 1, 0.5 and
    # snippet 1 weight 0.5; averaged over the 3: 2.5/3 and 0.5/3.
    mask = bm_sampling_mask(8, 8, num_sample=1, num_sample_perbin=3, prop_boundary_ratio=0.0)
    expected = np.zeros(8)
    expected[0], expected[1] = 2.5 / 3, 0.5 / 3
    np.testing.assert_allclose(mask[:, 0, 0, 0], expected, atol=1e-7)


def test_ramp_features_sample_the_extended_proposal():
    # With x[t] = t, a BM feature equals its sample position. Proposal [d=1, s=4] at T=10 is
    # units [4, 6); extended by 0.5 x its length (2) on each side: units [3, 7) -> index
    # coords [2.5, 6.5]; 3 samples at 2.5, 4.5 and 6.5.
    net = BMN(8, 10, 10, num_classes=2, hidden=8, num_sample=3, num_sample_perbin=1, prop_boundary_ratio=0.5)
    ramp = torch.arange(10, dtype=torch.float32).reshape(1, 1, 10)
    bm = net.boundary_matching(ramp)
    assert torch.allclose(bm[0, 0, :, 1, 4], torch.tensor([2.5, 4.5, 6.5]))


def test_gradients_reach_the_input_features(one_thread):
    net = BMN(8, 16, 8, num_classes=3, hidden=16, num_sample=4)
    features = torch.randn(2, 8, 16, requires_grad=True)
    targets = make_targets([(np.array([[2.0, 6.0]]), np.array([1]), 16.0)] * 2, 16, 8, 3)
    tal_loss(net(features), targets)["total"].backward()
    assert features.grad is not None
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    assert net.proposal_3d[0].weight.grad.abs().sum() > 0  # the proposal path is trained too


def test_loss_falls_when_overfitting_two_videos(one_thread):
    torch.manual_seed(0)
    T = 16
    net = BMN(8, T, T, num_classes=3, hidden=16, num_sample=8, num_sample_perbin=3)
    features = torch.randn(2, 8, T)
    videos = [
        (np.array([[2.0, 6.0]]), np.array([1]), 16.0),
        (np.array([[1.0, 3.0], [8.0, 14.0]]), np.array([0, 2]), 32.0),
    ]
    targets = make_targets(videos, T, T, 3)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = tal_loss(net(features), targets)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_wrong_number_of_snippets_is_reported():
    net = BMN(8, 16, 8, num_classes=3, hidden=8, num_sample=2)
    with pytest.raises(ValueError, match="num_snippets=16"):
        net(torch.randn(1, 8, 20))


def test_invalid_sizes_are_rejected():
    with pytest.raises(ValueError, match="max_duration"):
        BMN(8, 16, 17, num_classes=3, hidden=8)
    with pytest.raises(ValueError, match="hidden"):
        BMN(8, 16, 8, num_classes=3, hidden=10)


def test_checkpoints_do_not_carry_the_sampling_mask():
    net = BMN(8, 16, 8, num_classes=3, hidden=8, num_sample=2)
    state = net.state_dict()
    assert "sample_mask" not in state
    fresh = BMN(8, 16, 8, num_classes=3, hidden=8, num_sample=2)
    fresh.load_state_dict(state)  # strict: the rebuilt mask is not expected in the file
    assert torch.equal(fresh.sample_mask, net.sample_mask)
