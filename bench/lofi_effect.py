"""The LoFi effect over seeds: the demo's frozen baseline vs LoFi vs full end to end, paired per seed.

Each seed is one full `lofi demo` run (its own synthetic videos and clips, and training seed) in
OUT/seed-<s>/; finished seeds are reused by a rerun (the demo's stage records). Prints a table
of average mAP and mAP at tIoU 0.5 / 0.75 / 0.95 per branch (mean +- sample standard deviation
over the seeds), stage 1's balanced accuracies, and the paired per-seed differences of average
mAP (LoFi - baseline, full end to end - baseline, LoFi - full end to end) with their mean and a
95% t interval over the seeds (the seeds are the unit: data and training vary together), and
the activation memory of each branch.

    .venv/bin/python bench/lofi_effect.py                       # 5 seeds x the demo (about 75 min here)
    .venv/bin/python bench/lofi_effect.py --videos 40 --seeds 0 1   # a quick look
    .venv/bin/python bench/lofi_effect.py --smoke               # plumbing check only, numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from pipelines.demo import DemoOptions, run as run_demo
from pipelines.report import BRANCH_TITLES

BRANCHES = tuple(BRANCH_TITLES.items())
PAIRS = (("lofi", "baseline"), ("full_end_to_end", "baseline"), ("lofi", "full_end_to_end"))
# two-sided 95% quantiles of Student's t by degrees of freedom (n - 1 seeds)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
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


def interval(diffs: list[float]) -> str:
    """Mean and 95% t interval of paired differences."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return f"mean {mean:+.2f} (one seed: no interval)"
    half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"mean {mean:+.2f}, 95% CI [{mean - half:+.2f}, {mean + half:+.2f}]"


def table(reports: dict[int, dict]) -> list[str]:
    seeds = sorted(reports)
    present = [(b, t) for b, t in BRANCHES if all(b in reports[s] for s in seeds)]
    lines = [f"LoFi effect over seeds {seeds} (mAP in %, mean +- sample sd over seeds)",
             f"{'':<18}" + "".join(f"{name:>17}" for name, _ in COLUMNS) + f"{'act. memory':>14}"]
    for branch, title in present:
        cells = [mean_sd([figure(reports[s], branch, t) for s in seeds]) for _, t in COLUMNS]
        memory = statistics.fmean(reports[s][branch]["activation_memory_bytes"] for s in seeds) / 2**20
        lines.append(f"{title:<18}" + "".join(f"{c:>17}" for c in cells) + f"{memory:10.1f} MiB")
    for key in ("val_balanced_accuracy", "val_tal_balanced_accuracy"):
        values = [reports[s].get("stage1", {}).get(key) for s in seeds]
        if all(v is not None for v in values):
            lines.append(f"stage 1 {key}: {mean_sd(values).strip()} (" + ", ".join(f"{v:.3f}" for v in values) + ")")
    names = {b for b, _ in present}
    for a, b in PAIRS:
        if a in names and b in names:
            diffs = [figure(reports[s], a, None) - figure(reports[s], b, None) for s in seeds]
            lines.append(f"{a} - {b}, average mAP per seed: " + ", ".join(f"{s}: {d:+.2f}" for s, d in zip(seeds, diffs))
                         + f"; {interval(diffs)}; positive in {sum(d > 0 for d in diffs)}/{len(diffs)} seeds")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Baseline vs LoFi (the demo's comparison) over several seeds.")
    parser.add_argument("--out", default="bench_out/lofi_effect", help="folder for the runs (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4], help="seeds (default: 0 1 2 3 4)")
    parser.add_argument("--videos", type=int, help="synthetic videos per seed (default: the demo's)")
    parser.add_argument("--no-full-end-to-end", dest="full_end_to_end", action="store_false",
                        help="skip the full-fidelity end-to-end branch")
    parser.add_argument("--smoke", action="store_true", help="the demo's smoke sizes (plumbing only)")
    parser.add_argument("--overwrite", action="store_true", help="start every seed over (needed after changing --videos)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="pipeline config override passed to every demo run; repeatable")
    parser.add_argument("--include", action="append", default=[], metavar="SEED=REPORT",
                        help="add a finished `lofi demo --seed SEED` run's report.json to the table (same config); "
                             "repeatable")
    args = parser.parse_args(argv)
    reports = {}
    for item in args.include:
        seed, _, path = item.partition("=")
        reports[int(seed)] = json.loads(Path(path).read_text())
    for seed in args.seeds:
        print(f"\n===== seed {seed} =====", flush=True)
        opts = DemoOptions(out=str(Path(args.out) / f"seed-{seed}"), overrides=tuple(args.overrides),
                           videos=args.videos, seed=seed, smoke=args.smoke, overwrite=args.overwrite,
                           full_end_to_end=args.full_end_to_end)
        reports[seed] = run_demo(opts)
    lines = table(reports)
    print("\n" + "\n".join(lines))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps({"seeds": sorted(reports), "table": lines,
                                                             "reports": {str(s): r for s, r in reports.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
