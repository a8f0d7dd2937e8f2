"""`lofi plan-memory`: the argparse front end over `lofi.memory_plan.run`, and its table.

For each fidelity level and each combination of the memory switches (activation
checkpointing, mixed precision) the planner measures one training step of the configured
encoder + head + loss at a reduced size and scales it exactly to the level; this prints the
memory per video and the most videos per device that fit the budget (lofi/memory_plan.py
explains the budget and the device rule).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lofi.config import dump_yaml
from lofi_cli.args import add_config_arguments, cli_errors, config_from_args

if TYPE_CHECKING:  # the planner imports torch: only when the command runs
    from lofi.memory_plan import PlanMemoryConfig, PlanRow


def format_table(rows: list[PlanRow], cfg: PlanMemoryConfig) -> str:
    """The plan as a fixed-width table with a header that states the budget and the basis."""
    from lofi.memory import mib

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
    from lofi.memory_plan import PlanMemoryConfig, run

    args = build_parser().parse_args(argv)
    if args.budget_gb is not None:
        args.overrides = [*args.overrides, f"budget_gb={args.budget_gb}"]
    cfg = config_from_args(PlanMemoryConfig, args)
    if args.save_config:
        dump_yaml(cfg, args.save_config)
    rows = run(cfg, progress=not args.quiet)
    print(format_table(rows, cfg))
    return 0
