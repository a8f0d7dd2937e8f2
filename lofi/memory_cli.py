"""`lofi plan-memory`: activation memory per fidelity level and what fits a GPU budget.

For each fidelity level and each combination of the memory switches (activation
checkpointing, mixed precision) the planner measures one training step of the configured
encoder + head + loss at a reduced size, scales it exactly to the level (lofi/memory.py
explains the scaling), and prints the memory per video and the most videos per device that
fit the budget. `run(cfg)` returns the rows for other code (Tune, the demo).

The budget is in GiB (2^30 bytes, as GPU memory is quoted). It must hold the parameters,
buffers and optimizer state (`optimizer_states` per parameter: Adam keeps 2) plus the step's
peak, which counts tensors only: keep `headroom_gb` for the CUDA context, cuDNN workspaces
and allocator rounding (on an H200, CUDA's max_memory_allocated exceeded the tensor peak of a
full-fidelity step by up to 4%). AMP rows measured on the CPU use bf16 with CPU autocast's op
lists; CUDA's lists differ, so run with device=cuda on the target GPU for its exact figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch

from lofi.config import add_config_arguments, config_from_args, dump_yaml
from lofi.errors import LofiError, cli_errors
from lofi.fidelity import FidelityLevel, LevelOverride, resolve_level
from lofi.heads import HeadConfig, build_head, head_loss
from lofi.memory import GIB, StepMemory, measure_encoder, measure_head, mib, static_bytes, synthetic_targets
from lofi.models.encoders import EncoderConfig, build_encoder
from lofi.models.resnet import CHECKPOINTABLE


Probes = tuple[tuple[int, StepMemory], tuple[int, StepMemory]]  # ((x1, measured at x1), (x2, ...)), x1 < x2


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
    snippets) and head probes (b1 and b2 videos of `num_snippets`). Probe sizes of 1 are
    degenerate: with one snippet or video some tensors are contiguous already, so an op (a
    copy) is skipped and the traces no longer line up; the planner probes at 2 and 3.

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
            raise ValueError("amp: fp16 autocast needs device: cuda; on the CPU use bf16")
        if not self.checkpointing:
            raise ValueError("checkpointing: give [false], [true] or [false, true]")
        if self.budget_gb <= 0 or self.headroom_gb < 0 or self.optimizer_states < 0:
            raise ValueError("budget_gb must be > 0, headroom_gb and optimizer_states >= 0")

    def __hash__(self) -> int:  # the dict field is not hashable; the plain-data form is
        return hash(repr(dataclasses.astuple(self)))


@dataclass(frozen=True)
class PlanRow:
    """One (level, switches) combination: its memory and the most videos per device."""

    level: FidelityLevel
    checkpointing: bool
    amp: str
    memory: LevelMemory
    static_bytes: int  # parameters, buffers and optimizer state of encoder + head
    max_batch: int


def _devices(cfg: PlanMemoryConfig, amp: str) -> tuple[str, str]:
    """(encoder device, head device): meta where it measures the same bytes for free."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise LofiError("device: cuda was asked for but no CUDA device is visible; use --set device=auto")
    if cfg.device != "auto":
        return cfg.device, ("cpu" if cfg.device == "meta" else cfg.device)
    # meta runs no autocast, and G-TAD's sparse matmul has no meta kernel
    return ("meta" if amp == "none" else "cpu"), "cpu"


def _measure_encoder_probes(cfg: PlanMemoryConfig, level: FidelityLevel, ckpt: bool, amp: str):
    enc_cfg = dataclasses.replace(
        cfg.model, checkpoint=None, amp_dtype=amp, activation_checkpointing=tuple(cfg.checkpoint_stages) if ckpt else ()
    )
    device, _ = _devices(cfg, amp)
    encoder = build_encoder(enc_cfg).to(device)
    return tuple(
        (t, measure_encoder(encoder, t, level.frames_per_snippet, level.size_px, device=device))
        for t in cfg.probe_snippets
    )


def _measure_head_probes(cfg: PlanMemoryConfig, feature_dim: int, num_snippets: int) -> tuple[int, Probes]:
    """The head's static bytes (BMN's sampling mask grows with T) and its probes at 2 and 3 videos."""
    _, device = _devices(cfg, "none")
    head = build_head(cfg.head, feature_dim, num_snippets, cfg.num_classes).to(device)
    max_duration = cfg.head.resolved_max_duration(num_snippets)

    def loss(out, targets):  # noqa: ANN001, ANN202 (the head's own loss, as training uses)
        return head_loss(cfg.head, out, targets)

    probes = []
    for batch_size in (2, 3):
        targets = synthetic_targets(batch_size, num_snippets, max_duration, cfg.num_classes,
                                    region_snippets=cfg.head.boundary_region_snippets)
        probes.append((batch_size, measure_head(head, feature_dim, num_snippets, targets, loss, batch_size, device)))
    return static_bytes([head], cfg.optimizer_states), tuple(probes)


def run(cfg: PlanMemoryConfig, progress: bool = False) -> list[PlanRow]:
    """Measure every (level, checkpointing, amp) row and what fits `budget_gb - headroom_gb`."""
    levels = [resolve_level(name, cfg.level_overrides) for name in cfg.levels]
    encoder = build_encoder(dataclasses.replace(cfg.model, checkpoint=None))
    encoder_static = static_bytes([encoder], cfg.optimizer_states)
    budget = int((cfg.budget_gb - cfg.headroom_gb) * GIB)
    # levels sharing (F, S) share encoder probes, levels sharing T share head probes
    encoder_cache: dict[tuple, tuple] = {}
    head_cache: dict[int, tuple[int, Probes]] = {}
    rows = []
    for level in levels:
        if level.num_snippets not in head_cache:
            _say(progress, f"measuring the {cfg.head.name} head at T={level.num_snippets}")
            head_cache[level.num_snippets] = _measure_head_probes(cfg, encoder.feature_dim, level.num_snippets)
        for ckpt in cfg.checkpointing:
            for amp in cfg.amp:
                key = (level.frames_per_snippet, level.size_px, ckpt, amp)
                if key not in encoder_cache:
                    _say(progress, f"measuring the encoder at F={key[0]} S={key[1]} ckpt={ckpt} amp={amp}")
                    encoder_cache[key] = _measure_encoder_probes(cfg, level, ckpt, amp)
                head_static, head_probes = head_cache[level.num_snippets]
                memory = LevelMemory(level.num_snippets, encoder_cache[key], head_probes)
                static = encoder_static + head_static
                rows.append(PlanRow(level, ckpt, amp, memory, static, memory.max_batch(budget, static)))
    return rows


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def format_table(rows: list[PlanRow], cfg: PlanMemoryConfig) -> str:
    """The plan as a fixed-width table with a header that states the budget and the basis."""
    lines = [
        f"budget {cfg.budget_gb:g} GiB per device, headroom {cfg.headroom_gb:g} GiB; "
        f"model {cfg.model.name} width {cfg.model.width}, head {cfg.head.name} hidden {cfg.head.hidden}",
        "MiB/video: peak memory of a one-video step (activations, gradients, temporaries); act: its live",
        f"activations; static: parameters, buffers, optimizer state (x{cfg.optimizer_states}); max batch: most videos "
        "whose step peak fits beside static",
        "",
        f"{'level':<10} {'T':>4} {'F':>3} {'S':>4} {'ckpt':>5} {'amp':>5} {'MiB/video':>10} {'act MiB':>9} "
        f"{'static MiB':>10} {'max batch':>10}",
    ]
    for r in rows:
        lv = r.level
        fit = str(r.max_batch) if r.max_batch else "0 (no fit)"
        lines.append(
            f"{lv.name:<10} {lv.num_snippets:>4} {lv.frames_per_snippet:>3} {lv.size_px:>4} "
            f"{'yes' if r.checkpointing else 'no':>5} {r.amp:>5} {mib(r.memory.peak_bytes(1)):>10.1f} "
            f"{mib(r.memory.activation_peak_bytes(1)):>9.1f} {mib(r.static_bytes):>10.1f} {fit:>10}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofi plan-memory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Measure one training step's memory per fidelity level and memory switch, scaled
exactly from small probes, and print the most videos per device that fit the budget.

config keys (YAML file or --set KEY=VALUE):
  model.*            the encoder (name, width, shift_div, frozen_stages, freeze_bn, ...)
  head.*             the TAL head (name: gtad|bmn, hidden, cardinality, ...); num_classes
  levels             fidelity levels to plan: presets full, s_lofi, t_lofi, st_lofi or names
                     defined in level_overrides.NAME.{num_snippets,frames_per_snippet,size_px}
  checkpointing      [false, true]: rows without / with activation checkpointing of
                     checkpoint_stages (default: the stem and all four ResNet stages)
  amp                [none, bf16] autocast rows; fp16 needs device: cuda
  budget_gb          memory per device, GiB; headroom_gb is kept free of it
  optimizer_states   optimizer tensors per parameter (Adam: 2)
  probe_snippets     the two snippet counts the encoder is measured at (default [2, 3])
  device             auto (meta where it is exact and free, else cpu), cpu, meta, cuda

example: lofi plan-memory --config deploy/configs/plan_memory/paper.yaml --budget-gb 16""",
    )
    add_config_arguments(parser)
    parser.add_argument("--budget-gb", type=float, default=None, metavar="GB",
                        help="memory per device in GiB (overrides budget_gb of the config; default 16)")
    parser.add_argument("--save-config", default=None, metavar="FILE",
                        help="also write the resolved config (defaults, file and overrides applied) to FILE as YAML")
    parser.add_argument("--quiet", action="store_true", help="do not print progress to stderr")
    return parser


@cli_errors("plan-memory")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.budget_gb is not None:
        args.overrides = [*args.overrides, f"budget_gb={args.budget_gb}"]
    cfg = config_from_args(PlanMemoryConfig, args)
    if args.save_config:
        dump_yaml(cfg, args.save_config)
    rows = run(cfg, progress=not args.quiet)
    print(format_table(rows, cfg))
    return 0
