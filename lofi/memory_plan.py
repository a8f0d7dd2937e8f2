"""The memory planner: a training step's memory at any fidelity level and batch, from small probes.

One planner for every figure the project shows or filters on: `lofi plan-memory`'s table
(`run`), stage 2's per-level figure (`saved_bytes_by_level`, which `lofi train` logs, a
sweep's budget filter compares with `search.budget_gb` and the pipeline's report prints), and
the head-only step of the report (`head_step_memory`). The same probes, the same scaling and
the same device rule (`probe_devices`) make them one number for the same level and settings.

For a level the planner measures one training step of the encoder (as configured: autocast,
activation checkpointing, frozen BatchNorm) at `probe_snippets` snippets of the level's F and
S, and one of the head + its loss at 2 and 3 videos of the T it runs at, then scales both
exactly (lofi/memory.py explains why two probes suffice). The head's T is the level's own by
default; stage 2 resamples every level's features to the head's fixed grid, so its callers
pass that grid's T (`head_snippets`).

The budget is in GiB (2^30 bytes, as GPU memory is quoted). It must hold the parameters,
buffers and optimizer state (`optimizer_states` per parameter: Adam keeps 2) plus the step's
peak, which counts tensors only: keep `headroom_gb` for the CUDA context, cuDNN workspaces
and allocator rounding (on an H200, CUDA's max_memory_allocated exceeded the tensor peak of a
full-fidelity step by up to 4%). AMP measured on the CPU uses CPU autocast's op lists; CUDA's
differ, so plan on the target GPU (device cuda) for its exact figures.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch
from torch import nn

from lofi.errors import LofiError
from lofi.fidelity import FidelityLevel, LevelOverride, resolve_level
from lofi.heads import HeadConfig, build_head, head_loss
from lofi.memory import GIB, StepMemory, measure_encoder, measure_head, static_bytes, synthetic_targets
from lofi.models.encoders import EncoderConfig, build_encoder
from lofi.models.resnet import CHECKPOINTABLE

Probes = tuple[tuple[int, StepMemory], tuple[int, StepMemory]]  # ((x1, measured at x1), (x2, ...)), x1 < x2
HEAD_PROBE_VIDEOS = (2, 3)  # one video is degenerate for the traces (see LevelMemory)


def extrapolate(probes: Probes, figure: str, x: int) -> int:
    """A figure ("saved", "activation", "activation_peak", "peak") at size `x` from two probes.

    Sizes are snippets for the encoder and videos for the head: every tensor of the step is
    affine in them (lofi/memory.py), so saved and activation bytes are. So is every moment of
    the step (the same ops run and free in the same order), hence the peaks: each moment of the
    traces is extrapolated and the highest taken. Exact in integers when x2 - x1 = 1; without
    matching traces, the two peaks' line is used.
    """
    (x1, m1), (x2, m2) = probes
    trace = {"peak": "live_trace", "activation_peak": "activation_trace"}.get(figure)
    if trace:
        a, b = getattr(m1, trace), getattr(m2, trace)
        if a is not None and b is not None and len(a) == len(b) > 0:
            return int((a + (b - a) * (x - x1) // (x2 - x1)).max())
    y1, y2 = getattr(m1, f"{figure}_bytes"), getattr(m2, f"{figure}_bytes")
    return y1 + (y2 - y1) * (x - x1) // (x2 - x1)


@dataclass(frozen=True)
class LevelMemory:
    """A level's step memory for any batch size, from encoder probes (one video of t1 and t2
    snippets) and head probes (b1 and b2 videos). Probe sizes of 1 are degenerate: with one
    snippet or video some tensors are contiguous already, so an op (a copy) is skipped and the
    traces no longer line up; the planner probes at 2 and 3.

    B videos through the encoder are B * T snippets (it flattens them). Saved bytes add up.
    Activations peak either when the forward ends (encoder's + the head's own peak) or while
    the encoder recomputes a checkpointed stage, when the head (no checkpointing) has freed
    its own: the higher of the two, exactly. The all-tensor peak adds the encoder's and the
    head's: an upper bound, as the two happen at different moments.
    """

    num_snippets: int
    encoder: Probes
    head: Probes

    def _parts(self, figure: str, batch_size: int) -> tuple[int, int]:
        return (extrapolate(self.encoder, figure, batch_size * self.num_snippets),
                extrapolate(self.head, figure, batch_size))

    def saved_bytes(self, batch_size: int) -> int:
        return sum(self._parts("saved", batch_size))

    def activation_peak_bytes(self, batch_size: int) -> int:
        enc_end_of_forward, _ = self._parts("activation", batch_size)
        enc_peak, head_peak = self._parts("activation_peak", batch_size)
        return max(enc_end_of_forward + head_peak, enc_peak)

    def peak_bytes(self, batch_size: int) -> int:
        return sum(self._parts("peak", batch_size))

    def max_batch(self, budget_bytes: int, static_bytes: int, limit: int = 1 << 20) -> int:
        """Most videos per step whose peak fits `budget_bytes` beside `static_bytes` (0: none)."""
        def fits(b: int) -> bool:
            return static_bytes + self.peak_bytes(b) <= budget_bytes

        lo, hi = 0, 1  # the peak grows with the batch: double, then bisect
        while hi <= limit and fits(hi):
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo


def probe_devices(amp: str, device: str = "auto") -> tuple[str, str, str]:
    """(autocast dtype measured, encoder device, head device): the one rule of every caller.

    auto: the encoder on the meta device where that measures the same bytes for free (no
    autocast: meta runs none), on CUDA for fp16 when there is one, else on the CPU; the head on
    the CPU (G-TAD's sparse matmul has no meta kernel; the head runs no autocast). cpu, meta,
    cuda: that device (the head on the CPU for meta). fp16 autocast has no CPU kernels: off
    CUDA it is measured as bf16 on the CPU, the other 2-byte autocast type (the op lists differ
    a little), the closest figure a driver without a GPU (a sweep's, a report's) can give;
    fp32 instead would count the encoder's activations about twice.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise LofiError("device: cuda was asked for but no CUDA device is visible; use --set device=auto")
    if device == "auto":
        cuda = amp == "fp16" and torch.cuda.is_available()
        encoder_device, head_device = ("cuda" if cuda else "meta" if amp == "none" else "cpu"), "cpu"
    else:
        encoder_device, head_device = device, ("cpu" if device == "meta" else device)
    if amp == "fp16" and encoder_device != "cuda":
        return "bf16", "cpu", head_device
    return amp, encoder_device, head_device


def _head_step(cfg: HeadConfig, head: nn.Module, feature_dim: int, num_snippets: int, num_classes: int,
               batch_size: int, device: str) -> StepMemory:
    """One measured step of `head` and its own loss (as training uses) on `batch_size` videos."""
    targets = synthetic_targets(batch_size, num_snippets, cfg.resolved_max_duration(num_snippets), num_classes,
                                region_snippets=cfg.boundary_region_snippets)
    return measure_head(head, feature_dim, num_snippets, targets, lambda out, t: head_loss(cfg, out, t),
                        batch_size, device)


def head_step_memory(cfg: HeadConfig, feature_dim: int, num_snippets: int, num_classes: int, batch_size: int,
                     device: str = "cpu") -> StepMemory:
    """One step of the head alone (stage 3: features in, no encoder) at `batch_size` videos, measured."""
    head = build_head(cfg, feature_dim, num_snippets, num_classes).to(device)
    return _head_step(cfg, head, feature_dim, num_snippets, num_classes, batch_size, device)


class Prober:
    """Measures each probe once: the encoder's per (encoder config, F, S), the head's per T.

    `device` as in `probe_devices`. The encoder's `checkpoint` is ignored: memory does not
    depend on the weights, and loading them (maybe from an object store) would only cost time.
    """

    def __init__(self, head: HeadConfig, num_classes: int, feature_dim: int, probe_snippets: tuple[int, int] = (2, 3),
                 device: str = "auto", optimizer_states: int = 2, progress: bool = False) -> None:
        self.head_cfg, self.num_classes, self.feature_dim = head, num_classes, feature_dim
        self.probe_snippets, self.device = probe_snippets, device
        self.optimizer_states, self.progress = optimizer_states, progress
        self._encoders: dict[EncoderConfig, tuple[nn.Module, str]] = {}
        self._encoder_probes: dict[tuple, Probes] = {}
        self._heads: dict[int, tuple[int, Probes]] = {}

    def encoder(self, cfg: EncoderConfig, level: FidelityLevel) -> Probes:
        key = (cfg, level.frames_per_snippet, level.size_px)
        if key not in self._encoder_probes:
            if cfg not in self._encoders:
                amp, device, _ = probe_devices(cfg.amp_dtype, self.device)
                measured = dataclasses.replace(cfg, checkpoint=None, amp_dtype=amp)
                self._encoders[cfg] = build_encoder(measured).to(device), device
            encoder, device = self._encoders[cfg]
            _say(self.progress, f"measuring the encoder at F={key[1]} S={key[2]} "
                                f"ckpt={bool(cfg.activation_checkpointing)} amp={cfg.amp_dtype}")
            self._encoder_probes[key] = tuple(
                (t, measure_encoder(encoder, t, level.frames_per_snippet, level.size_px, device=device))
                for t in self.probe_snippets)
        return self._encoder_probes[key]

    def head(self, num_snippets: int) -> tuple[int, Probes]:
        """The head's static bytes (BMN's sampling mask grows with T) and its probes at 2 and 3 videos."""
        if num_snippets not in self._heads:
            _say(self.progress, f"measuring the {self.head_cfg.name} head at T={num_snippets}")
            _, _, device = probe_devices("none", self.device)
            head = build_head(self.head_cfg, self.feature_dim, num_snippets, self.num_classes).to(device)
            probes = tuple((b, _head_step(self.head_cfg, head, self.feature_dim, num_snippets, self.num_classes, b,
                                          device)) for b in HEAD_PROBE_VIDEOS)
            self._heads[num_snippets] = static_bytes([head], self.optimizer_states), probes
        return self._heads[num_snippets]

    def level(self, cfg: EncoderConfig, level: FidelityLevel, head_snippets: int | None = None) -> LevelMemory:
        """The step of encoder `cfg` at `level`, its head at `head_snippets` (None: the level's T)."""
        _, head = self.head(level.num_snippets if head_snippets is None else head_snippets)  # first, as progress reads
        return LevelMemory(level.num_snippets, self.encoder(cfg, level), head)


def saved_bytes_by_level(encoder: EncoderConfig, head: HeadConfig, levels: Iterable[FidelityLevel], num_classes: int,
                         batch_size: int, head_snippets: int | None = None, device: str = "auto") -> dict[str, int]:
    """Saved-tensor bytes of one training step of `batch_size` videos (per worker) at each level.

    The figure stage 2 logs, a sweep filters on and the report prints: the tensors autograd
    saves for backward, each storage once, parameters left out (lofi/memory.py). `encoder` as
    it trains (amp_dtype, activation_checkpointing, freeze_bn); `head_snippets`: the head's grid.
    """
    feature_dim = build_encoder(dataclasses.replace(encoder, checkpoint=None)).feature_dim
    prober = Prober(head, num_classes, feature_dim, device=device)
    return {level.name: prober.level(encoder, level, head_snippets).saved_bytes(batch_size) for level in levels}


@dataclass(frozen=True)
class PlanMemoryConfig:
    """What to plan: the model (encoder + head), the levels, the switches and the budget."""

    model: EncoderConfig = EncoderConfig()
    head: HeadConfig = HeadConfig()
    num_classes: int = 200
    levels: tuple[str, ...] = ("full", "s_lofi", "t_lofi", "st_lofi")
    level_overrides: dict[str, LevelOverride] = field(default_factory=dict)
    checkpointing: tuple[bool, ...] = (False, True)  # rows without and with checkpointing
    checkpoint_stages: tuple[str, ...] = CHECKPOINTABLE  # the stages a "ckpt" row checkpoints
    amp: tuple[str, ...] = ("none", "bf16")  # rows per autocast dtype
    budget_gb: float = 16.0
    headroom_gb: float = 0.0
    optimizer_states: int = 2
    probe_snippets: tuple[int, ...] = (2, 3)  # the two snippet counts the encoder is measured at
    device: Literal["auto", "cpu", "meta", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("levels: name at least one fidelity level")
        if len(self.probe_snippets) != 2 or not 2 <= self.probe_snippets[0] < self.probe_snippets[1]:
            # one snippet is degenerate (see LevelMemory)
            raise ValueError(f"probe_snippets: need two sizes 2 <= t1 < t2, got {list(self.probe_snippets)}")
        bad = [a for a in self.amp if a not in ("none", "bf16", "fp16")]
        if bad or not self.amp:
            raise ValueError(f"amp: {list(self.amp)} must be a non-empty list from none, bf16, fp16")
        if "fp16" in self.amp and self.device != "cuda":
            # a row labelled fp16 must hold fp16 figures: probe_devices would measure it as bf16
            raise ValueError("amp: fp16 autocast needs device: cuda; on the CPU use bf16")
        if not self.checkpointing:
            raise ValueError("checkpointing: give [false], [true] or [false, true]")
        if self.budget_gb <= 0 or self.headroom_gb < 0 or self.optimizer_states < 0:
            raise ValueError("budget_gb must be > 0, headroom_gb and optimizer_states >= 0")

    def __hash__(self) -> int:  # the dict field is not hashable; the plain-data form is
        return hash(repr(dataclasses.astuple(self)))

    def row_encoder(self, checkpointing: bool, amp: str) -> EncoderConfig:
        """The encoder of one row: `model` with that row's memory switches."""
        stages = tuple(self.checkpoint_stages) if checkpointing else ()
        return dataclasses.replace(self.model, checkpoint=None, amp_dtype=amp, activation_checkpointing=stages)


@dataclass(frozen=True)
class PlanRow:
    """One (level, switches) combination: its memory and the most videos per device."""

    level: FidelityLevel
    checkpointing: bool
    amp: str
    memory: LevelMemory
    static_bytes: int  # parameters, buffers and optimizer state of encoder + head
    max_batch: int


def run(cfg: PlanMemoryConfig, progress: bool = False) -> list[PlanRow]:
    """Measure every (level, checkpointing, amp) row and what fits `budget_gb - headroom_gb`."""
    levels = [resolve_level(name, cfg.level_overrides) for name in cfg.levels]
    encoder = build_encoder(dataclasses.replace(cfg.model, checkpoint=None))
    encoder_static = static_bytes([encoder], cfg.optimizer_states)
    budget = int((cfg.budget_gb - cfg.headroom_gb) * GIB)
    # levels sharing (F, S) share encoder probes, levels sharing T share head probes
    prober = Prober(cfg.head, cfg.num_classes, encoder.feature_dim, tuple(cfg.probe_snippets), cfg.device,
                    cfg.optimizer_states, progress)
    rows = []
    for level in levels:
        for ckpt in cfg.checkpointing:
            for amp in cfg.amp:
                memory = prober.level(cfg.row_encoder(ckpt, amp), level)
                static = encoder_static + prober.head(level.num_snippets)[0]
                rows.append(PlanRow(level, ckpt, amp, memory, static, memory.max_batch(budget, static)))
    return rows


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)
