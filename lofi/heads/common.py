"""What every TAL head shares: its output type, the class branch, the losses and decoding.

Conventions (read lofi/targets.py's docstring for the grid):
- A head maps snippet features (B, C, T) to one `HeadOutput`. Proposal maps are (B, D, T)
  "duration x start": cell [d, s] is the proposal from snippet s to snippet s + d inclusive,
  seconds [s * dl, (s + d + 1) * dl) with dl = duration_sec / T. D = max_duration <= T; cells
  with s + d >= T are invalid (`valid_map_mask`) and ignored by losses and decoding.
- `start`, `end`, `iou_cls`, `iou_reg` are probabilities in [0, 1] (sigmoid already applied);
  `start[t]` scores snippet t's left edge as an action start, `end[t]` its right edge as an end.
- `iou_cls` is BMN's "classification" confidence map (trained with a weighted binary logistic
  loss against IoU > 0.9) and `iou_reg` its "regression" map (L2 to the IoU); both heads emit both.

The class-aware path (shared by BMN and G-TAD, no external video-level classifier needed):
`ClassBranch` predicts per-snippet multi-label class logits (B, K, T), trained jointly with
`class_loss` (binary cross-entropy against `TALTargets.classes`, summed over classes and
averaged over snippets). At decoding, a proposal's class scores are the mean of sigmoid class
probabilities over its snippets s..e; its detection score for class k is
proposal score x class score k, and each proposal is emitted once for each of its top-k classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lofi.targets import TALTargets, snippet_length_sec

_EPS = 1e-6  # keeps log() finite when a sigmoid saturates, as in BMN's losses


@dataclass
class HeadOutput:
    """start, end (B, T) probs; iou_cls, iou_reg (B, D, T) in [0, 1]; class_logits (B, K, T)."""

    start: torch.Tensor
    end: torch.Tensor
    iou_cls: torch.Tensor
    iou_reg: torch.Tensor
    class_logits: torch.Tensor

    @property
    def num_snippets(self) -> int:
        return self.start.shape[-1]

    @property
    def max_duration(self) -> int:
        return self.iou_cls.shape[-2]


class ClassBranch(nn.Module):
    """Per-snippet multi-label class logits: (B, C, T) -> (B, K, T)."""

    def __init__(self, feature_dim: int, num_classes: int, hidden: int, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(feature_dim, hidden, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(hidden, num_classes, kernel_size=1),
        )
        # Most (snippet, class) pairs are negative; starting at a small prior keeps the
        # summed-over-classes loss from dominating the total at initialisation (RetinaNet).
        nn.init.constant_(self.net[-1].bias, -math.log((1.0 - prior_prob) / prior_prob))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def valid_map_mask(num_snippets: int, max_duration: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(D, T) bool: True where the proposal [s, s + d] ends inside the video (s + d < T)."""
    d = torch.arange(max_duration, device=device)[:, None]
    s = torch.arange(num_snippets, device=device)[None, :]
    return (s + d) < num_snippets


def _weighted_logistic(pred: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """BMN's weighted binary logistic: positives and negatives each weigh half the loss.

    `smoothing` is added to both counts (G-TAD adds 10 to its IoU-map classification loss).
    """
    num_pos, num_neg = pos.sum() + smoothing, neg.sum() + smoothing
    num = num_pos + num_neg
    coef_pos = 0.5 * num / num_pos.clamp_min(1.0)
    coef_neg = 0.5 * num / num_neg.clamp_min(1.0)
    loss = coef_pos * pos * torch.log(pred + _EPS) + coef_neg * neg * torch.log(1.0 - pred + _EPS)
    return -loss.sum() / num.clamp_min(1.0)


def boundary_loss(pred: torch.Tensor, target: torch.Tensor, pos_threshold: float = 0.5) -> torch.Tensor:
    """Start or end loss over the whole batch; a snippet is positive when its target > threshold."""
    pos = (target > pos_threshold).float()
    return _weighted_logistic(pred.float(), pos, 1.0 - pos)  # fp32: bf16 cannot hold 1 - p near 1


def iou_map_losses(
    iou_cls: torch.Tensor,
    iou_reg: torch.Tensor,
    iou_target: torch.Tensor,
    valid_mask: torch.Tensor,
    cls_pos_threshold: float = 0.9,
    reg_high: float = 0.7,
    reg_low: float = 0.3,
    count_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cls, reg) losses of the (B, D, T) proposal maps, as BMN trains them.

    cls: weighted binary logistic, positive where target IoU > cls_pos_threshold.
    reg: 0.5 * mean squared error over a balanced random sample: every high-IoU cell
    (> reg_high), and about as many medium (reg_low, reg_high] and low [0, reg_low] cells.
    Low cells include IoU 0 so that background proposals learn to score 0 (BMN's official
    PyTorch code samples low cells from (0, reg_low] only; PaddleVideo's BMN uses [0, reg_low]).
    """
    iou_cls, iou_reg, iou_target = iou_cls.float(), iou_reg.float(), iou_target.float()  # fp32 under autocast
    valid = valid_mask.to(iou_cls.dtype).expand_as(iou_cls)
    pos = (iou_target > cls_pos_threshold).to(iou_cls.dtype) * valid
    cls = _weighted_logistic(iou_cls, pos, valid - pos, count_smoothing)

    high = (iou_target > reg_high).to(iou_reg.dtype) * valid
    medium = ((iou_target <= reg_high) & (iou_target > reg_low)).to(iou_reg.dtype) * valid
    low = (iou_target <= reg_low).to(iou_reg.dtype) * valid
    num_high = high.sum()
    # Keep each medium/low cell with probability num_high / num_cells of its band (capped at 1).
    keep_medium = torch.rand_like(medium) < (num_high / medium.sum().clamp_min(1.0))
    keep_low = torch.rand_like(low) < (num_high / low.sum().clamp_min(1.0))
    weights = high + medium * keep_medium + low * keep_low
    reg = 0.5 * (weights * (iou_reg - iou_target) ** 2).sum() / weights.sum().clamp_min(1.0)
    return cls, reg


def class_loss(class_logits: torch.Tensor, class_targets: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE, summed over the K classes and averaged over the B x T snippets."""
    per_element = F.binary_cross_entropy_with_logits(class_logits.float(), class_targets.float(), reduction="none")
    return per_element.sum(dim=1).mean()


def tal_loss(
    out: HeadOutput,
    targets: TALTargets,
    reg_weight: float = 10.0,
    class_weight: float = 1.0,
    cls_weight: float = 1.0,
    boundary_pos_threshold: float = 0.5,
    cls_pos_threshold: float = 0.9,
    reg_high: float = 0.7,
    reg_low: float = 0.3,
    count_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """BMN's total (boundary + iou_cls + 10 * iou_reg) plus class_weight x the class branch's loss.

    `cls_weight` scales the IoU classification loss (1 in BMN; G-TAD's loss uses 10) and
    `count_smoothing` is added to its positive/negative counts (0 in BMN, 10 in G-TAD).
    """
    for name in ("start", "end", "iou_cls", "iou_reg", "class_logits"):
        want = {"iou_cls": "iou_map", "iou_reg": "iou_map", "class_logits": "classes"}.get(name, name)
        if getattr(out, name).shape != getattr(targets, want).shape:
            raise ValueError(
                f"head output {name} has shape {tuple(getattr(out, name).shape)} but targets.{want} has "
                f"{tuple(getattr(targets, want).shape)}; build targets with the head's num_snippets, "
                "max_duration and num_classes"
            )
    boundary = boundary_loss(out.start, targets.start, boundary_pos_threshold) + boundary_loss(
        out.end, targets.end, boundary_pos_threshold
    )
    valid = valid_map_mask(out.num_snippets, out.max_duration, device=out.iou_cls.device)
    iou_cls, iou_reg = iou_map_losses(
        out.iou_cls, out.iou_reg, targets.iou_map, valid, cls_pos_threshold, reg_high, reg_low, count_smoothing
    )
    classes = class_loss(out.class_logits, targets.classes)
    total = boundary + cls_weight * iou_cls + reg_weight * iou_reg + class_weight * classes
    return {"boundary": boundary, "iou_cls": iou_cls, "iou_reg": iou_reg, "classes": classes, "total": total}


def _boundary_candidates(scores: np.ndarray, always: int) -> np.ndarray:
    """BMN's rule: a local peak or above half the maximum; index `always` is always a candidate."""
    keep = scores > 0.5 * scores.max()
    if scores.shape[0] >= 3:
        inner = (scores[1:-1] > scores[:-2]) & (scores[1:-1] > scores[2:])
        keep[1:-1] |= inner
    keep[always] = True
    return keep


def _decode_one(out: HeadOutput, b: int, duration_sec: float, top_k: int, min_score: float) -> dict[str, np.ndarray]:
    start = out.start[b].detach().float().cpu().numpy()
    end = out.end[b].detach().float().cpu().numpy()
    iou_cls = out.iou_cls[b].detach().float().cpu().numpy()
    iou_reg = out.iou_reg[b].detach().float().cpu().numpy()
    probs = torch.sigmoid(out.class_logits[b].detach().float()).cpu().numpy()  # (K, T)
    num_d, num_t = iou_cls.shape

    ok_start = _boundary_candidates(start, always=0)
    ok_end = _boundary_candidates(end, always=num_t - 1)
    d_idx, s_idx = np.nonzero(valid_map_mask(num_t, num_d).numpy() & ok_start[None, :])
    e_idx = s_idx + d_idx
    keep = ok_end[e_idx]
    d_idx, s_idx, e_idx = d_idx[keep], s_idx[keep], e_idx[keep]
    proposal = start[s_idx] * end[e_idx] * iou_cls[d_idx, s_idx] * iou_reg[d_idx, s_idx]  # (M,)

    # Mean class probability over snippets s..e from a running sum: O(K) per proposal.
    cum = np.concatenate([np.zeros((probs.shape[0], 1)), np.cumsum(probs, axis=1)], axis=1)  # (K, T+1)
    class_mean = (cum[:, e_idx + 1] - cum[:, s_idx]) / (d_idx + 1)  # (K, M)
    k = min(top_k, probs.shape[0])
    top = np.argsort(-class_mean, axis=0, kind="stable")[:k]  # (k, M)
    scores = proposal[None, :] * np.take_along_axis(class_mean, top, axis=0)  # (k, M)

    dl = snippet_length_sec(duration_sec, num_t)
    segments = np.stack([s_idx * dl, (e_idx + 1) * dl], axis=1)  # (M, 2)
    segments = np.broadcast_to(segments[None], (k,) + segments.shape).reshape(-1, 2)  # (k*M, 2)
    scores, labels = scores.reshape(-1), top.reshape(-1)
    keep = scores >= min_score
    order = np.argsort(-scores[keep], kind="stable")
    return {
        "segments_sec": segments[keep][order].astype(np.float64),
        "scores": scores[keep][order].astype(np.float64),
        "label_ids": labels[keep][order].astype(np.int64),
    }


def decode_detections(
    out: HeadOutput, durations_sec: list[float], top_k_classes: int = 2, min_score: float = 0.0
) -> list[dict[str, np.ndarray]]:
    """Per video: segments_sec (N, 2), scores (N,), label_ids (N,), best first, before NMS.

    Proposal (s, e) is a candidate when s is a start candidate and e an end candidate
    (a local peak or > half the video's maximum, as BMN); its score is
    start[s] * end[e] * iou_cls * iou_reg, times each of its top-k class scores.
    """
    if len(durations_sec) != out.start.shape[0]:
        raise ValueError(f"{len(durations_sec)} durations for a batch of {out.start.shape[0]} videos")
    return [_decode_one(out, b, float(dur), top_k_classes, min_score) for b, dur in enumerate(durations_sec)]
