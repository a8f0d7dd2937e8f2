"""Activation memory and CPU step time of one training step per fidelity level.

The paper's setting: TSM-ResNet18 (width 64) + G-TAD (hidden 256, 200 classes), 8 frames per
snippet, one video per step; levels full (T=100, S=224), S-LoFi (100, 112), T-LoFi (25, 224)
and ST-LoFi (50, 158); with and without activation checkpointing of all four ResNet stages.

How it stays within this machine's memory and ~5 minutes:
- memory: `lofi.memory_plan.run` (the `lofi plan-memory` planner): the encoder is measured on
  the meta device (exact bytes, no data) at 2 and 3 snippets and scaled exactly to T; the
  head runs on the CPU at its full T (2 and 3 videos). Full fidelity would need ~19 GiB of
  activations for one video.
- step time: the encoder's forward + backward is timed on the CPU on `--time-snippets`
  snippets (default 2) and scaled by T / time_snippets (its work is per frame); the head's
  is timed at the level's full T; the two are added. One warm-up step first. On a machine
  shared with other jobs these times are noisy; the GPU check below gives reliable ones.
- GPU check (`--direct --set device=cuda`): planner estimate vs a direct full-size step of
  every row, with CUDA's max_memory_allocated and the step time (no scaling).

Run:  .venv/bin/python bench/memory_by_fidelity.py        (--help for the options)
      python bench/memory_by_fidelity.py --direct --repeats 3 --set device=cuda --set "amp=[none,fp16]"
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from lofi.config import replace
from lofi.fidelity import FidelityLevel
from lofi.heads import HeadConfig, build_head, head_loss
from lofi.memory import StepMemory, measure_encoder, measure_step, mib, synthetic_targets
from lofi.memory_plan import PlanMemoryConfig, PlanRow, extrapolate, run
from lofi.models.encoders import EncoderConfig, build_encoder
from lofi.models.resnet import CHECKPOINTABLE
from lofi.targets import TALTargets

LEVELS = ("full", "s_lofi", "t_lofi", "st_lofi")


def _time(step, repeats: int = 1) -> float:
    """Best of `repeats` after one warm-up: the machine is shared, the minimum is the least noisy."""
    step()  # warm-up: allocator, kernels, lazy init
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best


def encoder_sec_per_snippet(cfg: EncoderConfig, frames: int, size_px: int, time_snippets: int, repeats: int) -> float:
    """Forward + backward seconds per snippet, timed on `time_snippets` snippets."""
    encoder = build_encoder(cfg).train()
    shape = (1, time_snippets, frames, size_px, size_px, 3)

    def step() -> None:
        x = torch.randint(0, 256, shape, dtype=torch.uint8)
        encoder(x).sum().backward()
        encoder.zero_grad(set_to_none=True)

    return _time(step, repeats) / time_snippets


def head_step_sec(cfg: HeadConfig, feature_dim: int, num_snippets: int, num_classes: int, repeats: int) -> float:
    head = build_head(cfg, feature_dim, num_snippets, num_classes).train()
    targets = synthetic_targets(1, num_snippets, cfg.resolved_max_duration(num_snippets), num_classes)

    def step() -> None:
        x = torch.randn(1, feature_dim, num_snippets, requires_grad=True)
        head_loss(cfg, head(x), targets)["total"].backward()
        head.zero_grad(set_to_none=True)

    return _time(step, repeats)


def encoder_activation_per_snippet(model: EncoderConfig, ckpt: bool, frames: int, size_px: int) -> tuple[int, int]:
    """(forward-saved, peak live activation) bytes per snippet of the encoder alone at T=100 (meta)."""
    cfg = dataclasses.replace(model, activation_checkpointing=CHECKPOINTABLE if ckpt else ())
    encoder = build_encoder(cfg).to("meta")
    probes = tuple((t, measure_encoder(encoder, t, frames, size_px, device="meta")) for t in (1, 2))
    return tuple(extrapolate(probes, f, 100) // 100 for f in ("activation", "activation_peak"))


def print_table(rows: list[PlanRow], times: dict[tuple[str, bool], float]) -> None:
    full = {r.checkpointing: r.memory.activation_peak_bytes(1) for r in rows if r.level.name == "full"}
    print(f"{'level':<8} {'T':>4} {'S':>4} {'ckpt':>5} {'saved MiB':>10} {'act peak MiB':>13} "
          f"{'step peak MiB':>14} {'act / full':>11} {'step s (CPU)':>13}")
    for r in rows:
        m = r.memory
        ckpt = "yes" if r.checkpointing else "no"
        print(f"{r.level.name:<8} {r.level.num_snippets:>4} {r.level.size_px:>4} {ckpt:>5} "
              f"{mib(m.saved_bytes(1)):>10.0f} {mib(m.activation_peak_bytes(1)):>13.0f} {mib(m.peak_bytes(1)):>14.0f} "
              f"{m.activation_peak_bytes(1) / full[r.checkpointing]:>11.3f} "
              f"{times[(r.level.name, r.checkpointing)]:>13.1f}")


def verdict(name: str, value: float, ok: bool) -> None:
    print(f"  {'PASS' if ok else 'FAIL'}  {name}: {value:.3f}")


def cpu_report(cfg: PlanMemoryConfig, time_snippets: int, repeats: int) -> None:
    """The table and the targets: memory by the planner, CPU step time timed small and scaled."""
    started = time.perf_counter()
    rows = run(cfg, progress=True)
    print(f"memory measured in {time.perf_counter() - started:.0f} s; "
          f"timing on {torch.get_num_threads()} CPU threads ...")
    times: dict[tuple[str, bool], float] = {}
    head_times: dict[int, float] = {}
    encoder_times: dict[tuple[int, int, bool], float] = {}
    for r in rows:
        lv = r.level
        if lv.num_snippets not in head_times:
            head_times[lv.num_snippets] = head_step_sec(cfg.head, 512, lv.num_snippets, cfg.num_classes, repeats)
        key = (lv.frames_per_snippet, lv.size_px, r.checkpointing)
        if key not in encoder_times:
            enc_cfg = dataclasses.replace(cfg.model, activation_checkpointing=CHECKPOINTABLE if r.checkpointing else ())
            encoder_times[key] = encoder_sec_per_snippet(enc_cfg, *key[:2], time_snippets, repeats)
        times[(lv.name, r.checkpointing)] = encoder_times[key] * lv.num_snippets + head_times[lv.num_snippets]

    print(f"\nOne training step, one video, TSM-ResNet18 w64 + G-TAD h256, F=8 "
          f"(total {time.perf_counter() - started:.0f} s)")
    print(f"step time: encoder timed on {time_snippets} snippets x T/{time_snippets}, plus the head at full T\n")
    print_table(rows, times)
    act = {(r.level.name, r.checkpointing): r.memory.activation_peak_bytes(1) for r in rows}
    saved_plain, peak_plain = encoder_activation_per_snippet(cfg.model, False, 8, 224)
    saved_ckpt, peak_ckpt = encoder_activation_per_snippet(cfg.model, True, 8, 224)
    print(f"\nencoder alone at S=224, per snippet: forward-saved {mib(saved_plain):.1f} -> {mib(saved_ckpt):.1f} MiB "
          f"with checkpointing; peak live activations (with the recompute) {mib(peak_plain):.1f} -> "
          f"{mib(peak_ckpt):.1f} MiB")
    print("\ntargets (activation peak of the whole step; ratios to full fidelity):")
    full = act[("full", False)]
    verdict("S-LoFi / full <= 0.3", act[("s_lofi", False)] / full, act[("s_lofi", False)] <= 0.3 * full)
    verdict("T-LoFi / full <= 0.3", act[("t_lofi", False)] / full, act[("t_lofi", False)] <= 0.3 * full)
    verdict("ST-LoFi / full (no target)", act[("st_lofi", False)] / full, True)
    verdict("checkpointing: encoder forward-saved activations, no ckpt / ckpt >= 2",
            saved_plain / saved_ckpt, saved_plain >= 2 * saved_ckpt)
    verdict("checkpointing: encoder peak live activations (recompute included), no ckpt / ckpt >= 2",
            peak_plain / peak_ckpt, peak_plain >= 2 * peak_ckpt)


def direct_step(
    cfg: PlanMemoryConfig, level: FidelityLevel, ckpt: bool, amp: str, repeats: int
) -> tuple[StepMemory, float]:
    """One full-size step of encoder + head + loss on `cfg.device`, measured, then timed."""
    device = torch.device(cfg.device)
    encoder = build_encoder(cfg.row_encoder(ckpt, amp)).to(device).train()
    head = build_head(cfg.head, encoder.feature_dim, level.num_snippets, cfg.num_classes).to(device).train()
    T = level.num_snippets
    targets = synthetic_targets(1, T, cfg.head.resolved_max_duration(T), cfg.num_classes)

    def step() -> torch.Tensor:
        frames = torch.randint(0, 256, (1, T, level.frames_per_snippet, level.size_px, level.size_px, 3),
                               dtype=torch.uint8, device=device)
        parts = (targets.start, targets.end, targets.iou_map, targets.classes)
        batch = TALTargets(*(x.to(device, copy=True) for x in parts))
        return head_loss(cfg.head, head(encoder(frames)), batch)["total"]

    params = [*encoder.parameters(), *encoder.buffers(), *head.parameters(), *head.buffers()]
    memory = measure_step(step, params, device)

    def timed() -> None:
        step().backward()
        for p in params:
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return memory, _time(timed, repeats)


def direct_report(cfg: PlanMemoryConfig, repeats: int) -> None:
    """Planner estimate vs a direct full-size step (and CUDA's allocator) for every row."""
    rows = run(cfg, progress=True)
    print(f"\n{'level':<8} {'T':>4} {'S':>4} {'ckpt':>5} {'amp':>5} {'est act':>9} {'act':>9} {'est peak':>9} "
          f"{'peak':>9} {'device peak':>12} {'step ms':>9}   (MiB; est = planner from probes, one video)")
    for r in rows:
        mem, sec = direct_step(cfg, r.level, r.checkpointing, r.amp, repeats)
        device_peak = f"{mib(mem.device_peak_bytes):12.0f}" if mem.device_peak_bytes is not None else f"{'-':>12}"
        ckpt = "yes" if r.checkpointing else "no"
        print(f"{r.level.name:<8} {r.level.num_snippets:>4} {r.level.size_px:>4} {ckpt:>5} "
              f"{r.amp:>5} {mib(r.memory.activation_peak_bytes(1)):9.0f} {mib(mem.activation_peak_bytes):9.0f} "
              f"{mib(r.memory.peak_bytes(1)):9.0f} {mib(mem.peak_bytes):9.0f} {device_peak} {1000 * sec:9.1f}",
              flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-snippets", type=int, default=2, help="snippets the encoder is timed on (scaled to T)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--direct", action="store_true",
                        help="instead: compare the planner with direct full-size steps (on a GPU: --set device=cuda)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed steps per measurement after a warm-up; the best is shown")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a planner config key (lofi plan-memory --help), e.g. --set amp=[none,fp16]")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = PlanMemoryConfig(levels=LEVELS, amp=("none",), checkpointing=(False, True), device="auto")
    cfg = replace(base, args.overrides)
    if args.direct:
        direct_report(cfg, args.repeats)
    else:
        cpu_report(cfg, args.time_snippets, args.repeats)


if __name__ == "__main__":
    main()
