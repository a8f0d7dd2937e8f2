"""ResNet-18/34/50 with temporal shift on the residual branch (TSM 'blockres').

Parameter names are torchvision's (conv1, bn1, layer1..layer4 with
`N.conv1/bn1/conv2/bn2(/conv3/bn3)/downsample.0/downsample.1`, fc), so torchvision ImageNet
state dicts load without renaming. `width` scales every stage (64 is the standard network;
tests use 8 or 16). Bottleneck puts the stride on the 3x3 conv (torchvision's "v1.5").

`output_stride` (32, 16 or 8) is the side of the input one cell of the last stage's map covers:
16 gives layer4 stride 1, 8 layer3 and layer4. Small frames need it: at 32 px the standard
network's layer4 sees a 1x1 map, where its 3x3 convs see zero padding in 8 of their 9 taps, so a
network trained there learns other features than at twice the side (2x2). No dilation replaces
the stride: at maps of 2-4 cells a dilated tap lands in the padding. The parameters are the same
at every output stride, so checkpoints load across them.

Blocks take the number of frames per clip as an argument (the shift needs it), so stages
are iterated here rather than called as nn.Sequential; the containers stay nn.Sequential
only for the names.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lofi.models.tsm import temporal_shift

STAGES = ("layer1", "layer2", "layer3", "layer4")
OUTPUT_STRIDES = (32, 16, 8)
STEM_STRIDE = 4  # conv1 (stride 2) and the max pool (stride 2)
# What activation checkpointing can name: the stem (conv1, bn1, relu, maxpool) and the stages.
CHECKPOINTABLE = ("stem",) + STAGES


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, downsample: nn.Module | None, shift_div: int):
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.shift_div = shift_div

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        # The identity path takes the unshifted input, as in TSM's residual shift.
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(temporal_shift(x, num_frames, self.shift_div))))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, downsample: nn.Module | None, shift_div: int):
        super().__init__()
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.shift_div = shift_div

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(temporal_shift(x, num_frames, self.shift_div))))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _run_stage(stage: nn.Sequential, x: Tensor, num_frames: int) -> Tensor:
    for block in stage:
        x = block(x, num_frames)
    return x


@contextlib.contextmanager
def bn_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running stats (and counters) unchanged while still normalising with
    batch statistics. Used for the recompute of a checkpointed stage: without it, every
    training step would apply the momentum update twice (forward and recompute)."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            count = None if m.num_batches_tracked is None else m.num_batches_tracked.clone()
            saved.append((m, m.momentum, count))
            # momentum 0: running = 1 * running + 0 * batch, bit-exact; batch stats still used.
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def _recompute_context(stage: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), bn_stats_frozen(stage)


class ResNet(nn.Module):
    """A 2D ResNet over a batch of frames; with shift_div > 0, a TSM-ResNet over clips."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        width: int = 64,
        shift_div: int = 8,
        num_classes: int | None = None,
        output_stride: int = 32,
    ):
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride: {output_stride} is not one of {list(OUTPUT_STRIDES)}")
        self.shift_div = shift_div
        # Stages run under torch.utils.checkpoint (set by build_encoder from the config).
        self.checkpoint_stages: tuple[str, ...] = ()
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = width
        for i, (name, num_blocks, stride) in enumerate(zip(STAGES, layers, stage_strides(output_stride))):
            planes = width * 2**i
            setattr(self, name, self._make_stage(block, in_ch, planes, num_blocks, stride))
            in_ch = planes * block.expansion
        self.feature_dim = in_ch
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # Encoders carry no classifier; num_classes gives torchvision's full network.
        self.fc = nn.Linear(in_ch, num_classes) if num_classes else None
        self._init_weights()

    def _make_stage(
        self, block: type[BasicBlock] | type[Bottleneck], in_ch: int, planes: int, num_blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or in_ch != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(in_ch, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        blocks = [block(in_ch, planes, stride, downsample, self.shift_div)]
        blocks += [block(planes * block.expansion, planes, 1, None, self.shift_div) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor, num_frames: int = 1) -> Tensor:
        """`(N*F, C, H, W)` frames, F adjacent frames per clip -> pooled `(N*F, D)`."""
        if "stem" in self.checkpoint_stages and torch.is_grad_enabled():
            # The stem's full-resolution maps are the largest activations of the network.
            x = checkpoint(self._stem, x, use_reentrant=False,
                           context_fn=functools.partial(_recompute_context, self.bn1))
        else:
            x = self._stem(x)
        for name in STAGES:
            stage = getattr(self, name)
            if name in self.checkpoint_stages and torch.is_grad_enabled():
                # Per block, not per stage: only block inputs are kept, and backward recomputes
                # one block at a time, so the recompute peak stays one block's activations.
                for block in stage:
                    x = checkpoint(
                        block, x, num_frames, use_reentrant=False,
                        context_fn=functools.partial(_recompute_context, block),
                    )
            else:
                x = _run_stage(stage, x, num_frames)
        return torch.flatten(self.avgpool(x), 1)  # (N*F, D, 1, 1) -> (N*F, D)

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: Tensor, num_frames: int = 1) -> Tensor:
        """Frames -> logits `(N*F, K)` with a classifier, else pooled features `(N*F, D)`."""
        features = self.forward_features(x, num_frames)
        return features if self.fc is None else self.fc(features)


def stage_strides(output_stride: int = 32) -> tuple[int, ...]:
    """Strides of layer1..layer4: 1, 2, 2, 2 at output stride 32; the last ones 1 below it."""
    # Stage i would bring the stride to STEM_STRIDE * 2**i; past output_stride it stays at 1.
    return tuple(1 if i == 0 or STEM_STRIDE * 2**i > output_stride else 2 for i in range(len(STAGES)))


def final_map_side(size_px: int, output_stride: int = 32) -> int:
    """Side of the last stage's map for square frames of `size_px` (every stride-2 layer pads: ceil)."""
    side = size_px
    for stride in (2, 2, *stage_strides(output_stride)):  # conv1, max pool, the stages
        side = -(-side // stride)
    return side


def tsm_resnet18(width: int = 64, shift_div: int = 8, num_classes: int | None = None,
                 output_stride: int = 32) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), width, shift_div, num_classes, output_stride)


def tsm_resnet34(width: int = 64, shift_div: int = 8, num_classes: int | None = None,
                 output_stride: int = 32) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), width, shift_div, num_classes, output_stride)


def tsm_resnet50(width: int = 64, shift_div: int = 8, num_classes: int | None = None,
                 output_stride: int = 32) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), width, shift_div, num_classes, output_stride)
