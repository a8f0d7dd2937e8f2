"""Video encoders: TSM-ResNet over the frames of each snippet -> one feature per snippet.

Input convention (one path for training, extraction and the clip classifier):
- uint8 frames, channels last, as the shards store them: `(B, T, F, H, W, C)`; the encoder
  normalises them itself with `normalize_frames` (ImageNet mean/std) on their device, so
  send uint8 to the GPU (4x fewer bytes) and let the encoder convert.
- or float frames already normalised, channels first: `(B, T, F, C, H, W)`.
The dtype says which layout is meant; C must be 3 (RGB) in both.

All B*T*F frames of a call go through the ResNet as one batch (the shift reshapes the batch
to (N, F, C, H, W) along F); `chunk_snippets` bounds memory for no-grad extraction.

Memory switches (EncoderConfig):
- activation_checkpointing: the named parts ("stem", "layer1".."layer4") keep only their
  input and recompute in backward (torch.utils.checkpoint, use_reentrant=False), one residual
  block at a time, so the backward peak holds one block's activations, not a whole stage's. The recompute would update the
  BatchNorm running stats a second time; it runs with BN momentum 0 and the batch counter
  restored, so stats move exactly once per step, as without checkpointing.
- freeze_bn: every BatchNorm stays in eval mode (normalises with, and never updates, its
  running stats, e.g. the ImageNet/Kinetics ones from the checkpoint); its affine weight and
  bias still train. Useful when a batch holds the frames of one or two videos.
- frozen_stages: 1 = stem (conv1, bn1), 2 = stem + layer1, ... 5 = the whole backbone get
  requires_grad False and stay in eval mode (their BN stats do not drift either). No
  activations are kept for backward before the first trainable layer.
- amp_dtype: forward under torch.autocast (bf16 or fp16; CPU supports bf16 only); features
  are returned as float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lofi.config import ConfigError
from lofi.models.checkpoints import FORMATS, LoadedCheckpoint, load_backbone_checkpoint
from lofi.models.resnet import (CHECKPOINTABLE, OUTPUT_STRIDES, STAGES, ResNet, final_map_side, tsm_resnet18,
                                tsm_resnet34, tsm_resnet50)

ENCODERS = {"tsm_resnet18": tsm_resnet18, "tsm_resnet34": tsm_resnet34, "tsm_resnet50": tsm_resnet50}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EncoderConfig:
    name: str = "tsm_resnet18"  # key of ENCODERS
    width: int = 64  # base channels (64 = standard; tests use 8/16)
    checkpoint: str | None = None  # path to a state dict file
    checkpoint_format: Literal["auto", "torchvision", "tsm", "mmaction2", "lofi"] = "auto"
    shift_div: int = 8  # 1/shift_div of the channels shift each way; 0 = plain 2D ResNet
    activation_checkpointing: tuple[str, ...] = ()  # subset of ("stem","layer1","layer2","layer3","layer4")
    freeze_bn: bool = False
    frozen_stages: int = 0  # 0 = none, 1 = stem, 2 = stem+layer1, ...
    amp_dtype: Literal["none", "bf16", "fp16"] = "none"
    output_stride: int = 32  # 16 or 8 for small frames: the last stages keep stride 1 (lofi.models.resnet)

    def __post_init__(self) -> None:
        if self.name not in ENCODERS:
            raise ValueError(f"name: {self.name!r} is not one of {sorted(ENCODERS)}")
        if self.width < 1:
            raise ValueError(f"width: must be >= 1, got {self.width}")
        if self.shift_div < 0 or self.shift_div > self.width:
            raise ValueError(f"shift_div: must be 0 (no shift) or 1..width ({self.width}), got {self.shift_div}")
        bad = [s for s in self.activation_checkpointing if s not in CHECKPOINTABLE]
        if bad or len(set(self.activation_checkpointing)) != len(self.activation_checkpointing):
            raise ValueError(f"activation_checkpointing: {list(self.activation_checkpointing)} must be distinct "
                             f"names from {list(CHECKPOINTABLE)}")
        if not 0 <= self.frozen_stages <= len(STAGES) + 1:
            raise ValueError(f"frozen_stages: must be 0..{len(STAGES) + 1}, got {self.frozen_stages}")
        if self.checkpoint_format not in FORMATS:
            raise ValueError(f"checkpoint_format: {self.checkpoint_format!r} is not one of {list(FORMATS)}")
        if self.output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride: {self.output_stride} is not one of {list(OUTPUT_STRIDES)}")
        if self.amp_dtype not in ("none", *_AMP_DTYPES):
            raise ValueError(f"amp_dtype: {self.amp_dtype!r} is not one of ['none', 'bf16', 'fp16']")


def normalize_frames(frames: Tensor) -> Tensor:
    """uint8 `(..., H, W, C)` RGB -> float32 `(..., C, H, W)` with ImageNet mean/std."""
    if frames.dtype != torch.uint8 or frames.dim() < 3 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB frames (..., H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    # (x / 255 - mean) / std folded into one subtract and one divide.
    mean = torch.tensor(IMAGENET_MEAN, device=frames.device) * 255.0
    std = torch.tensor(IMAGENET_STD, device=frames.device) * 255.0
    x = (frames.float() - mean) / std
    return x.movedim(-1, -3).contiguous()  # (..., H, W, C) -> (..., C, H, W)


def _as_float_frames(frames: Tensor) -> Tensor:
    """Either input convention -> normalised float `(..., C, H, W)`."""
    if frames.dtype == torch.uint8:
        return normalize_frames(frames)
    if not frames.is_floating_point() or frames.shape[-3] != 3:
        raise ValueError(
            f"expected uint8 (..., H, W, 3) or normalised float (..., 3, H, W) frames, "
            f"got {frames.dtype} {tuple(frames.shape)}"
        )
    return frames


class VideoEncoder(nn.Module):
    """Frames `(B, T, F, C, H, W)` -> snippet features `(B, D, T)` (see the module docstring)."""

    def __init__(self, backbone: ResNet, amp_dtype: str = "none", freeze_bn: bool = False, frozen_stages: int = 0):
        super().__init__()
        self.backbone = backbone
        self.feature_dim: int = backbone.feature_dim
        self.amp_dtype = amp_dtype
        self.freeze_bn = freeze_bn
        self.frozen_stages = frozen_stages
        self.checkpoint_info: LoadedCheckpoint | None = None  # set by build_encoder when loaded
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def frozen_modules(self) -> list[nn.Module]:
        stem = [self.backbone.conv1, self.backbone.bn1]
        stages = [getattr(self.backbone, s) for s in STAGES]
        return (stem + stages[: self.frozen_stages - 1]) if self.frozen_stages else []

    def train(self, mode: bool = True) -> VideoEncoder:
        super().train(mode)
        # Re-applied on every train() call, which would otherwise switch them back.
        for module in self.frozen_modules():
            module.eval()
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.amp_dtype == "none":
            return contextlib.nullcontext()
        if device.type == "cpu" and self.amp_dtype != "bf16":
            raise ConfigError(f"model.amp_dtype={self.amp_dtype} needs a CUDA device; on CPU use bf16 or none")
        return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[self.amp_dtype])

    def forward_frames(self, frames: Tensor) -> Tensor:
        """Clips `(N, F, C, H, W)` float or `(N, F, H, W, C)` uint8 -> one feature per clip `(N, D)`."""
        x = _as_float_frames(frames)
        if x.dim() != 5:
            raise ValueError(f"expected clips (N, F, C, H, W), got {tuple(x.shape)}")
        n, f = x.shape[:2]
        with self._autocast(x.device):
            feats = self.backbone.forward_features(x.flatten(0, 1), num_frames=f)  # (N*F, C, H, W) -> (N*F, D)
        # Average in float32: bf16 sums of many frames lose precision.
        return feats.float().view(n, f, -1).mean(dim=1)  # (N*F, D) -> (N, F, D) -> (N, D)

    def forward(self, frames: Tensor, chunk_snippets: int | None = None) -> Tensor:
        """`(B, T, F, C, H, W)` float or `(B, T, F, H, W, C)` uint8 -> `(B, D, T)` float32.

        chunk_snippets: encode that many snippets at a time and concatenate; bounds memory
        under torch.no_grad() (with grad every chunk's activations are kept anyway).
        """
        if frames.dim() != 6:
            raise ValueError(f"expected frames (B, T, F, C, H, W) or uint8 (B, T, F, H, W, C), got {tuple(frames.shape)}")
        b, t = frames.shape[:2]
        clips = frames.flatten(0, 1)  # (B, T, F, ...) -> (B*T, F, ...)
        if chunk_snippets:
            feats = torch.cat([self.forward_frames(c) for c in clips.split(chunk_snippets)])
        else:
            feats = self.forward_frames(clips)
        return feats.view(b, t, -1).transpose(1, 2).contiguous()  # (B*T, D) -> (B, T, D) -> (B, D, T)


def collapsed_levels(cfg: EncoderConfig, level_sizes: dict[str, int], full_px: int) -> list[str]:
    """Warnings for the levels whose frames leave the encoder's last stage a 1x1 map where the full
    level's is larger: the network trained there meets mostly zero padding (lofi.models.resnet), so
    what it learns does not carry to the full-size frames features are extracted at."""
    full_side = final_map_side(full_px, cfg.output_stride)
    if full_side < 2 or cfg.output_stride == min(OUTPUT_STRIDES):
        return []
    return [f"level {name!r} at {size} px leaves {cfg.name}'s last stage a 1x1 map (the full level's "
            f"{full_px} px: {full_side}x{full_side}); set encoder.output_stride={cfg.output_stride // 2} "
            f"(or a larger frame size) so training there learns what carries to full size"
            for name, size in level_sizes.items() if final_map_side(size, cfg.output_stride) == 1]


def build_encoder(cfg: EncoderConfig) -> VideoEncoder:
    """The encoder a config describes, with its checkpoint loaded (strictly) if it names one."""
    backbone = ENCODERS[cfg.name](width=cfg.width, shift_div=cfg.shift_div, output_stride=cfg.output_stride)
    info = load_backbone_checkpoint(backbone, cfg.checkpoint, cfg.checkpoint_format) if cfg.checkpoint else None
    backbone.checkpoint_stages = tuple(cfg.activation_checkpointing)
    encoder = VideoEncoder(backbone, cfg.amp_dtype, cfg.freeze_bn, cfg.frozen_stages)
    encoder.checkpoint_info = info
    return encoder


class ClipClassifier(nn.Module):
    """Stage-1 pre-training on trimmed clips: clip `(B, F, C, H, W)` -> logits `(B, K)`.

    The encoder's per-clip feature (frames averaged) goes through dropout and a linear
    layer, as TSM's new_fc. Accepts uint8 `(B, F, H, W, C)` too. Save `state_dict()` and
    load it later with checkpoint_format "lofi" (the `fc.*` classifier is then dropped).
    """

    def __init__(self, encoder: VideoEncoder, num_classes: int, dropout: float = 0.5):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(encoder.feature_dim, num_classes)

    def forward(self, frames: Tensor) -> Tensor:
        return self.fc(self.dropout(self.encoder.forward_frames(frames)))  # (B, D) -> (B, K)


class TALModel(nn.Module):
    """Stage 2: encoder + TAL head end to end, frames (B, T, F, H, W, C) -> HeadOutput on the head's
    grid (the encoder's T resampled to `head_snippets`). Its state dict holds the encoder under
    `encoder.` (lofi.models.checkpoints.encoder_state)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, head_snippets: int) -> None:
        super().__init__()
        self.encoder, self.head, self.head_snippets = encoder, head, head_snippets

    def forward(self, frames: Tensor) -> object:
        features = self.encoder(frames)  # (B, T, F, H, W, C) -> (B, D, T)
        if features.shape[-1] != self.head_snippets:
            # Both grids cover the whole video, so resampling keeps each feature at its time.
            features = nn.functional.interpolate(features, size=self.head_snippets, mode="linear", align_corners=False)
        return self.head(features)  # (B, D, T_head) -> HeadOutput
