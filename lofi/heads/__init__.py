"""TAL heads: snippet features (B, C, T) -> one `HeadOutput` (lofi/heads/common.py).

`HEADS` maps a head's name to its class and `HEAD_LOSSES` to its loss. With the `head`
config section `cfg`:
    head = build_head(cfg, feature_dim, num_snippets, num_classes)
    targets = make_targets(videos, num_snippets, cfg.resolved_max_duration(num_snippets),
                           num_classes, cfg.boundary_region_snippets)
    losses = head_loss(cfg, head(features), targets)          # losses["total"].backward()
    detections = decode_detections(head(features), durations_sec, cfg.top_k_classes)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn

from lofi.errors import LofiError
from lofi.heads.bmn import BMN
from lofi.heads.common import HeadOutput, tal_loss
from lofi.targets import TALTargets

HEADS: dict[str, type[nn.Module]] = {"bmn": BMN}
HEAD_LOSSES: dict[str, Callable[..., dict[str, torch.Tensor]]] = {"bmn": tal_loss}

try:
    from lofi.heads.gtad import GTAD, gtad_loss
except ImportError as err:  # G-TAD is written in parallel; only its (or its names') absence is tolerated
    if err.name != "lofi.heads.gtad":
        raise
else:
    HEADS["gtad"] = GTAD
    HEAD_LOSSES["gtad"] = gtad_loss


@dataclass(frozen=True)
class HeadConfig:
    """The `head` config section: which head, its sizes, and its loss and decoding settings."""

    name: Literal["bmn", "gtad"] = "gtad"
    max_duration: int | None = None  # longest proposal in snippets; None = T, capped at T
    hidden: int = 256
    # BMN's boundary-matching layer
    num_sample: int = 32
    num_sample_perbin: int = 3
    prop_boundary_ratio: float = 0.5
    # G-TAD's GCNeXt blocks and SGAlign
    knn_k: int = 3
    cardinality: int = 32
    num_gcnext: int = 2
    num_align_samples: int = 16
    context: bool = True
    # targets and loss; a weight left null takes the head's paper value
    boundary_region_snippets: float = 1.0
    boundary_pos_threshold: float = 0.5
    cls_pos_threshold: float = 0.9
    reg_high: float = 0.7
    reg_low: float = 0.3
    reg_weight: float | None = None  # IoU regression: BMN 10, G-TAD 1
    cls_weight: float | None = None  # IoU classification: BMN 1, G-TAD 10
    class_weight: float = 1.0  # the per-snippet class branch
    # decoding
    top_k_classes: int = 2

    def __post_init__(self) -> None:
        if self.max_duration is not None and self.max_duration < 1:
            raise ValueError(f"max_duration must be >= 1 or null (= num_snippets), got {self.max_duration}")
        positive = ("hidden", "num_sample", "num_sample_perbin", "knn_k", "cardinality", "num_gcnext",
                    "num_align_samples", "top_k_classes")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.reg_low <= self.reg_high <= 1.0:
            raise ValueError(f"need 0 <= reg_low <= reg_high <= 1, got reg_low={self.reg_low}, reg_high={self.reg_high}")
        if self.boundary_region_snippets <= 0:
            raise ValueError(f"boundary_region_snippets must be > 0, got {self.boundary_region_snippets}")

    def resolved_max_duration(self, num_snippets: int) -> int:
        """D for a grid of T snippets: capped at T so one config serves every fidelity level."""
        return num_snippets if self.max_duration is None else min(self.max_duration, num_snippets)

    def loss_kwargs(self) -> dict[str, float]:
        """Keyword arguments for the head's loss; null weights are left to the loss's defaults."""
        keys = ("boundary_pos_threshold", "cls_pos_threshold", "reg_high", "reg_low",
                "reg_weight", "cls_weight", "class_weight")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def _accepted(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of kwargs that fn takes: one config section serves heads with different knobs."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _available(name: str) -> None:
    if name not in HEADS:
        raise LofiError(f"head.name={name!r} is not available (lofi/heads/{name}.py is missing or broken); "
                        f"available: {', '.join(sorted(HEADS))}")


def build_head(cfg: HeadConfig, feature_dim: int, num_snippets: int, num_classes: int) -> nn.Module:
    """The configured head for features (B, feature_dim, num_snippets) and num_classes classes."""
    _available(cfg.name)
    cls = HEADS[cfg.name]
    knobs = ("hidden", "num_sample", "num_sample_perbin", "prop_boundary_ratio", "knn_k", "cardinality",
             "num_gcnext", "num_align_samples", "context")
    kwargs = _accepted(cls.__init__, {k: getattr(cfg, k) for k in knobs})
    try:
        return cls(feature_dim=feature_dim, num_snippets=num_snippets,
                   max_duration=cfg.resolved_max_duration(num_snippets), num_classes=num_classes, **kwargs)
    except ValueError as err:
        raise LofiError(f"head ({cfg.name}): {err}; fix it with --set head.KEY=VALUE") from err


def head_loss(cfg: HeadConfig, out: HeadOutput, targets: TALTargets) -> dict[str, torch.Tensor]:
    """The configured head's loss: keys boundary, iou_cls, iou_reg, classes, total."""
    _available(cfg.name)
    fn = HEAD_LOSSES[cfg.name]
    return fn(out, targets, **_accepted(fn, cfg.loss_kwargs()))
