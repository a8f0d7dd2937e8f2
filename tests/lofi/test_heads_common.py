"""Shared head pieces: losses on hand-worked cases, decoding planted actions, the head config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lofi.config import ConfigError, from_dict
from lofi.errors import LofiError
from lofi.heads import HEADS, HeadConfig, build_head, head_loss
from lofi.heads.common import (
    ClassBranch,
    HeadOutput,
    boundary_loss,
    class_loss,
    decode_detections,
    iou_map_losses,
    tal_loss,
    valid_map_mask,
)
from lofi.targets import make_targets

DURATION_SEC = 37.3  # 1.492 s snippets at T = 25


def test_valid_map_mask():
    mask = valid_map_mask(4, 3)
    # [d, s] is valid while the proposal s..s+d ends inside the 4 snippets.
    expected = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_boundary_loss_weighs_positives_and_negatives_equally():
    pred = torch.tensor([[0.8, 0.2, 0.5, 0.5]])
    target = torch.tensor([[0.9, 0.1, 0.0, 0.5]])  # only 0.9 is > 0.5: 1 positive, 3 negatives
    # BMN: positives weigh 0.5 * 4 / 1 = 2, negatives 0.5 * 4 / 3; the sum is averaged over 4.
    expected = -(2 * math.log(0.8) + (2 / 3) * (math.log(0.8) + 2 * math.log(0.5))) / 4
    assert boundary_loss(pred, target).item() == pytest.approx(expected, rel=1e-4)


def test_boundary_loss_without_positives_is_finite():
    loss = boundary_loss(torch.full((2, 5), 0.3), torch.zeros(2, 5))
    assert loss.item() == pytest.approx(-0.5 * math.log(0.7), rel=1e-4)


def test_iou_cls_loss_ignores_invalid_cells():
    target = torch.tensor([[[0.95, 0.2], [0.5, 0.99]]])  # (B=1, D=2, T=2); [1, 1] is invalid
    valid = valid_map_mask(2, 2)
    pred = torch.tensor([[[0.6, 0.3], [0.1, 0.0]]])  # the invalid cell predicts 0 for IoU 0.99
    cls, _ = iou_map_losses(pred, pred, target, valid)
    # 3 valid cells: 1 positive (0.95 > 0.9), 2 negatives; weights 0.5*3/1 and 0.5*3/2.
    expected = -(1.5 * math.log(0.6) + 0.75 * (math.log(0.7) + math.log(0.9))) / 3
    assert cls.item() == pytest.approx(expected, rel=1e-4)


def test_iou_reg_loss_on_a_balanced_map_uses_every_cell():
    # 2 high (> 0.7), 2 medium, 2 low cells: each band is kept with probability 2/2 = 1.
    target = torch.tensor([[[0.9, 0.8, 0.5, 0.4, 0.1, 0.0]]])  # (1, D=1, T=6), all valid
    pred = torch.zeros_like(target)
    _, reg = iou_map_losses(pred, pred, target, valid_map_mask(6, 1))
    expected = 0.5 * (0.81 + 0.64 + 0.25 + 0.16 + 0.01 + 0.0) / 6
    assert reg.item() == pytest.approx(expected, rel=1e-5)


def test_iou_reg_loss_samples_low_cells_down_to_the_high_count():
    torch.manual_seed(0)
    target = torch.zeros(1, 1, 400)
    target[0, 0, :4] = 1.0  # 4 high cells and 396 zero-IoU cells
    pred = torch.zeros_like(target)
    pred[0, 0, 4:] = 1.0  # every low cell is wrong by 1, every high cell by 1 too
    pred[0, 0, :4] = 0.0
    _, reg = iou_map_losses(pred, pred, target, valid_map_mask(400, 1))
    assert reg.item() == pytest.approx(0.5)  # every kept cell has squared error 1
    pred[0, 0, :4] = 1.0  # now only low cells err: their share shows how many were kept
    losses = [iou_map_losses(pred, pred, target, valid_map_mask(400, 1))[1].item() for _ in range(50)]
    # About 4 of 396 low cells are kept next to the 4 high ones: loss ~ 0.5 * 4 / 8.
    assert 0.15 < np.mean(losses) < 0.35


def test_class_loss_sums_over_classes():
    logits = torch.zeros(2, 3, 5)
    targets = torch.zeros(2, 3, 5)
    targets[:, 1] = 1.0
    # Every (class, snippet) costs log 2 at logit 0; 3 classes per snippet.
    assert class_loss(logits, targets).item() == pytest.approx(3 * math.log(2), rel=1e-6)


def test_class_branch_starts_near_its_prior():
    branch = ClassBranch(feature_dim=6, num_classes=4, hidden=8)
    with torch.no_grad():
        probs = torch.sigmoid(branch(torch.zeros(2, 6, 9)))
    assert probs.shape == (2, 4, 9)
    # A rare class must not start at p = 0.5: that would make the summed loss K * log 2.
    assert probs.min() > 0.002 and probs.max() < 0.05


def _output_from_targets(videos, num_snippets, max_duration, num_classes) -> HeadOutput:
    """A perfect head: its maps are the targets, its class logits confident (+-8)."""
    t = make_targets(videos, num_snippets, max_duration, num_classes)
    return HeadOutput(start=t.start, end=t.end, iou_cls=t.iou_map, iou_reg=t.iou_map,
                      class_logits=8.0 * (2.0 * t.classes - 1.0))


def test_tal_loss_total_and_keys():
    videos = [(np.array([[5.0, 20.0]]), np.array([1]), DURATION_SEC)]
    t = make_targets(videos, 25, 10, 3)
    out = HeadOutput(start=torch.full((1, 25), 0.3), end=torch.full((1, 25), 0.3),
                     iou_cls=torch.full((1, 10, 25), 0.4), iou_reg=torch.full((1, 10, 25), 0.4),
                     class_logits=torch.zeros(1, 3, 25))
    losses = tal_loss(out, t, reg_weight=10.0, class_weight=2.0)
    assert set(losses) == {"boundary", "iou_cls", "iou_reg", "classes", "total"}
    parts = losses["boundary"] + losses["iou_cls"] + 10.0 * losses["iou_reg"] + 2.0 * losses["classes"]
    assert losses["total"].item() == pytest.approx(parts.item(), rel=1e-6)
    perfect = tal_loss(_output_from_targets(videos, 25, 10, 3), t)
    assert perfect["iou_reg"].item() == pytest.approx(0.0, abs=1e-9)
    assert perfect["total"] < losses["total"]


def test_tal_loss_reports_mismatched_shapes():
    t = make_targets([(np.array([[5.0, 20.0]]), np.array([1]), DURATION_SEC)], 25, 10, 3)
    out = _output_from_targets([(np.array([[5.0, 20.0]]), np.array([1]), DURATION_SEC)], 25, 12, 3)
    with pytest.raises(ValueError, match="max_duration"):
        tal_loss(out, t)


def test_decode_recovers_a_grid_aligned_action():
    # Snippets 4..13 exactly: 4 * 1.492 = 5.968 s to 14 * 1.492 = 20.888 s, class 2.
    gt = np.array([[5.968, 20.888]])
    out = _output_from_targets([(gt, np.array([2]), DURATION_SEC)], 25, 25, 3)
    det = decode_detections(out, [DURATION_SEC], top_k_classes=2)[0]
    np.testing.assert_allclose(det["segments_sec"][0], [5.968, 20.888], atol=1e-6)
    assert det["label_ids"][0] == 2
    assert det["scores"][0] == pytest.approx(1 / (1 + math.exp(-8)), rel=1e-5)  # 1 * 1 * 1 * 1 * p(class)
    assert np.all(np.diff(det["scores"]) <= 0)  # best first
    # Each proposal is emitted for its 2 best classes.
    first = np.all(det["segments_sec"] == det["segments_sec"][0], axis=1)
    assert sorted(det["label_ids"][first].tolist())[-1] == 2 and first.sum() == 2


def test_decode_recovers_an_off_grid_action_within_half_a_snippet():
    gt = np.array([[5.0, 20.0]])  # units [3.35, 13.40]: the best grid proposal is snippets 3..12
    out = _output_from_targets([(gt, np.array([0]), DURATION_SEC)], 25, 25, 3)
    det = decode_detections(out, [DURATION_SEC])[0]
    np.testing.assert_allclose(det["segments_sec"][0], [3 * 1.492, 13 * 1.492], atol=1e-6)
    assert np.all(np.abs(det["segments_sec"][0] - gt[0]) <= 1.492 / 2)
    assert det["label_ids"][0] == 0


def test_decode_a_batch_with_a_score_floor():
    videos = [
        (np.array([[5.968, 20.888]]), np.array([2]), DURATION_SEC),
        # 60 s at T=25: 2.4 s snippets; 12 s..31.2 s = snippets 5..12, 40.8 s..55.2 s = 17..22.
        (np.array([[12.0, 31.2], [40.8, 55.2]]), np.array([0, 1]), 60.0),
    ]
    out = _output_from_targets(videos, 25, 25, 3)
    dets = decode_detections(out, [DURATION_SEC, 60.0], min_score=0.5)
    assert len(dets) == 2
    # Above 0.5 only the exact proposals with their true class survive: any other pairing of
    # candidate boundaries has IoU <= 8/18 with both actions, and wrong classes score ~3e-4.
    assert dets[0]["label_ids"].tolist() == [2]
    assert sorted(dets[1]["label_ids"].tolist()) == [0, 1]
    got = sorted(zip(dets[1]["label_ids"].tolist(), dets[1]["segments_sec"].tolist()))
    np.testing.assert_allclose(got[0][1], [12.0, 31.2], atol=1e-6)
    np.testing.assert_allclose(got[1][1], [40.8, 55.2], atol=1e-6)


def test_decode_handles_a_single_snippet():
    out = _output_from_targets([(np.array([[0.0, 3.0]]), np.array([0]), 3.0)], 1, 1, 2)
    det = decode_detections(out, [3.0], top_k_classes=5)[0]
    np.testing.assert_allclose(det["segments_sec"][0], [0.0, 3.0])
    assert len(det["scores"]) == 2  # top-k is capped at the 2 classes


def test_head_config_from_yaml_data():
    cfg = from_dict(HeadConfig, {"name": "bmn", "hidden": 16, "max_duration": 64, "cls_pos_threshold": 0.8})
    assert cfg.resolved_max_duration(100) == 64
    assert cfg.resolved_max_duration(25) == 25  # capped at T so one config fits every fidelity
    assert cfg.loss_kwargs()["cls_pos_threshold"] == 0.8
    assert "reg_weight" not in cfg.loss_kwargs()  # null: the head's own paper weight applies
    with pytest.raises(ConfigError, match="valid keys"):
        from_dict(HeadConfig, {"name": "bmn", "hiden": 16})
    with pytest.raises(ConfigError, match="name"):
        from_dict(HeadConfig, {"name": "ssd"})
    with pytest.raises(ConfigError, match="reg_low"):
        from_dict(HeadConfig, {"reg_low": 0.8, "reg_high": 0.7})


def test_build_head_bmn():
    cfg = HeadConfig(name="bmn", hidden=16, num_sample=4, max_duration=10)
    head = build_head(cfg, feature_dim=12, num_snippets=25, num_classes=5)
    assert isinstance(head, HEADS["bmn"])
    with torch.no_grad():
        out = head(torch.randn(1, 12, 25))
    assert out.iou_cls.shape == (1, 10, 25) and out.class_logits.shape == (1, 5, 25)
    with pytest.raises(LofiError, match="hidden"):
        build_head(HeadConfig(name="bmn", hidden=10), 12, 25, 5)


def test_head_loss_uses_the_heads_own_weights_unless_set():
    videos = [(np.array([[5.0, 20.0]]), np.array([1]), DURATION_SEC)]
    t = make_targets(videos, 25, 10, 3)
    out = HeadOutput(start=torch.full((1, 25), 0.3), end=torch.full((1, 25), 0.3),
                     iou_cls=torch.full((1, 10, 25), 0.4), iou_reg=torch.full((1, 10, 25), 0.4),
                     class_logits=torch.zeros(1, 3, 25))
    parts = head_loss(HeadConfig(name="bmn"), out, t)
    bmn_total = parts["boundary"] + parts["iou_cls"] + 10.0 * parts["iou_reg"] + parts["classes"]
    assert parts["total"].item() == pytest.approx(bmn_total.item(), rel=1e-6)
    parts = head_loss(HeadConfig(name="bmn", reg_weight=2.0, cls_weight=3.0), out, t)
    set_total = parts["boundary"] + 3.0 * parts["iou_cls"] + 2.0 * parts["iou_reg"] + parts["classes"]
    assert parts["total"].item() == pytest.approx(set_total.item(), rel=1e-6)


def test_build_head_gtad_from_the_same_section():
    if "gtad" not in HEADS:
        pytest.skip("lofi/heads/gtad.py is not there yet")
    cfg = HeadConfig(name="gtad", hidden=32, cardinality=8, num_align_samples=4, max_duration=8)
    head = build_head(cfg, feature_dim=16, num_snippets=20, num_classes=4)
    with torch.no_grad():
        out = head(torch.randn(1, 16, 20))
    assert out.iou_cls.shape == (1, 8, 20) and out.class_logits.shape == (1, 4, 20)
