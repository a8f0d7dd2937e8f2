"""Video encoders (TSM-ResNet), their checkpoint loaders, the stage-1 clip classifier and the stage-2 model."""

from lofi.models.checkpoints import CheckpointError, LoadedCheckpoint, load_backbone_checkpoint
from lofi.models.encoders import (
    ENCODERS,
    ClipClassifier,
    EncoderConfig,
    TALModel,
    VideoEncoder,
    build_encoder,
    normalize_frames,
)
from lofi.models.resnet import ResNet
from lofi.models.tsm import temporal_shift

__all__ = [
    "ENCODERS",
    "CheckpointError",
    "ClipClassifier",
    "EncoderConfig",
    "LoadedCheckpoint",
    "TALModel",
    "ResNet",
    "VideoEncoder",
    "build_encoder",
    "load_backbone_checkpoint",
    "normalize_frames",
    "temporal_shift",
]
