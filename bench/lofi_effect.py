"""The LoFi effect over seeds: the demo's baseline vs LoFi comparison, mean and standard deviation.

Each seed is one full `lofi demo` run (its own synthetic dataset and training seed) in
OUT/seed-<s>/; finished seeds are reused by a rerun (the demo's stage records). Prints a table
of average mAP and mAP at tIoU 0.5 / 0.75 / 0.95 per branch (mean +- sample standard deviation
over the seeds), the per-seed LoFi - baseline difference of average mAP, and the activation
memory of each branch.

    .venv/bin/python bench/lofi_effect.py                       # 3 seeds x the demo (about 45 min here)
    .venv/bin/python bench/lofi_effect.py --videos 16 --seeds 0 1   # a quick look
    .venv/bin/python bench/lofi_effect.py --smoke               # plumbing check only, numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from pipelines.demo import DemoOptions, run as run_demo

BRANCHES = (("baseline", "baseline (frozen)"), ("lofi", "LoFi (stage 2)"))
COLUMNS = (("avg mAP", None), ("mAP@0.5", 0.5), ("mAP@0.75", 0.75), ("mAP@0.95", 0.95))


def figure(report: dict, branch: str, tiou: float | None) -> float:
    b = report[branch]
    if tiou is None:
        return 100 * b["average_mAP"]
    index = min(range(len(b["tiou_thresholds"])), key=lambda i: abs(b["tiou_thresholds"][i] - tiou))
    return 100 * b["mAP"][index]


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):6.2f} +- {sd:5.2f}"


def table(reports: dict[int, dict]) -> list[str]:
    seeds = sorted(reports)
    lines = [f"LoFi effect over seeds {seeds} (mAP in %, mean +- sample sd over seeds)",
             f"{'':<18}" + "".join(f"{name:>17}" for name, _ in COLUMNS) + f"{'act. memory':>14}"]
    for branch, title in BRANCHES:
        cells = [mean_sd([figure(reports[s], branch, t) for s in seeds]) for _, t in COLUMNS]
        memory = statistics.fmean(reports[s][branch]["activation_memory_bytes"] for s in seeds) / 2**20
        lines.append(f"{title:<18}" + "".join(f"{c:>17}" for c in cells) + f"{memory:10.1f} MiB")
    diffs = [figure(reports[s], "lofi", None) - figure(reports[s], "baseline", None) for s in seeds]
    lines.append("LoFi - baseline, average mAP per seed: " + ", ".join(f"seed {s}: {d:+.2f}" for s, d in zip(seeds, diffs))
                 + f"; mean {mean_sd(diffs).strip()}")
    full = statistics.fmean(reports[s]["full_fidelity_activation_memory_bytes"] for s in seeds) / 2**20
    lines.append(f"full fidelity end to end would save {full:.1f} MiB of activations per step")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Baseline vs LoFi (the demo's comparison) over several seeds.")
    parser.add_argument("--out", default="bench_out/lofi_effect", help="folder for the runs (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--videos", type=int, help="synthetic videos per seed (default: the demo's 40)")
    parser.add_argument("--smoke", action="store_true", help="the demo's smoke sizes (plumbing only)")
    parser.add_argument("--overwrite", action="store_true", help="start every seed over (needed after changing --videos)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="pipeline config override passed to every demo run; repeatable")
    args = parser.parse_args(argv)
    reports = {}
    for seed in args.seeds:
        print(f"\n===== seed {seed} =====", flush=True)
        opts = DemoOptions(out=str(Path(args.out) / f"seed-{seed}"), overrides=tuple(args.overrides),
                           videos=args.videos, seed=seed, smoke=args.smoke, overwrite=args.overwrite)
        reports[seed] = run_demo(opts)
    lines = table(reports)
    print("\n" + "\n".join(lines))
    (Path(args.out) / "summary.json").write_text(json.dumps({"seeds": args.seeds, "table": lines,
                                                             "reports": {str(s): r for s, r in reports.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
