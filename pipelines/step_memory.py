"""Activation memory of one stage-2 training step, per fidelity level, from lofi.memory's planner.

`lofi train` reports it (per epoch, for the epoch's level) and a sweep keeps trials over its
budget from being launched (tuning/sweep.py). Probes run on the meta device (no data, no
compute) unless autocast needs a real one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lofi.fidelity import FidelityLevel
from lofi.heads import build_head, head_loss
from lofi.models.encoders import build_encoder
from pipelines.config import PipelineConfig


def stage2_encoder_config(cfg: PipelineConfig) -> Any:
    """The encoder as stage 2 trains it: BatchNorm frozen with train.freeze_encoder_bn (the default)."""
    return dataclasses.replace(cfg.encoder, freeze_bn=cfg.encoder.freeze_bn or cfg.train.freeze_encoder_bn)


def activation_memory_bytes(cfg: PipelineConfig, levels: tuple[FidelityLevel, ...], head_t: int, num_classes: int,
                            batch_size: int) -> int:
    """Saved-tensor bytes of one training step of `batch_size` videos at the most costly level."""
    return max(activation_memory_by_level(cfg, levels, head_t, num_classes, batch_size).values())


def activation_memory_by_level(cfg: PipelineConfig, levels: tuple[FidelityLevel, ...], head_t: int,
                               num_classes: int, batch_size: int) -> dict[str, int]:
    """Saved-tensor bytes of one training step of `batch_size` videos at each level.

    lofi.memory's scaling argument: the encoder's saved bytes are affine in the snippets it
    sees (B videos = B * T snippets), the head's affine in B at its fixed grid; two small
    probes of each give the exact figure at any size without running it.
    """
    from lofi.memory import measure_encoder, measure_head, synthetic_targets

    amp = cfg.encoder.amp_dtype
    if amp == "fp16" and not torch.cuda.is_available():
        amp = "bf16"  # CPU autocast has no fp16; both are 2-byte types (the autocast op lists differ a little)
    enc_cfg = dataclasses.replace(stage2_encoder_config(cfg), checkpoint=None, amp_dtype=amp)
    # meta: no data and no compute, the same bytes; autocast needs a real device
    device = "meta" if amp == "none" else ("cuda" if amp == "fp16" else "cpu")
    encoder = build_encoder(enc_cfg).to(device)
    head = build_head(cfg.head, encoder.feature_dim, head_t, num_classes)
    max_d = cfg.head.resolved_max_duration(head_t)
    region = cfg.head.boundary_region_snippets
    h1, h2 = (measure_head(head, encoder.feature_dim, head_t,
                           synthetic_targets(b, head_t, max_d, num_classes, region_snippets=region),
                           lambda out, targets: head_loss(cfg.head, out, targets), batch_size=b).saved_bytes
              for b in (1, 2))
    head_bytes = h1 + (h2 - h1) * (batch_size - 1)
    out = {}
    for level in levels:
        e2, e3 = (measure_encoder(encoder, t, level.frames_per_snippet, level.size_px, device=device).saved_bytes
                  for t in (2, 3))
        out[level.name] = int(e2 + (e3 - e2) * (batch_size * level.num_snippets - 2) + head_bytes)
    return out
