"""The LoFi effect and the paper's ablation over seeds, paired per seed: frozen vs each stage-2 schedule.

Each seed is one `lofi demo` run (its own synthetic videos and clips, and training seed) in
OUT/seed-<s>/; a rerun reuses finished stages (the demo's stage records). Every row starts from
the same stage-1 encoder of its seed, trains the same head with the same recipe and is scored
on the same validation videos; the rows differ only in stage 2:

    baseline (frozen)   no stage 2
    LoFi                the config's schedule (the demo: C-LoFi, long cycle)   every seed
    full end to end     stage 2 at full fidelity                               every seed
    T-LoFi, S-LoFi, ST-LoFi, C-LoFi short (the other cycle, same steps)      --ablation-seeds

Printed and written (OUT/summary.json, OUT/summary.csv): per row the average mAP of every
seed, mean +- sample sd, mAP at tIoU 0.5 / 0.75 / 0.95, the activation memory of one training
step and the wall time of the branch (stage 2 + extract + head + detect); the paired per-seed
differences against the frozen baseline and against full end to end with their mean and a 95%
t interval (the seeds are the unit: data and training vary together), and the share of full end
to end's gain over the frozen baseline that LoFi recovers; AP per class, mean over the seeds.

    .venv/bin/python bench/lofi_effect.py                                # 5 seeds, ablation on 0-2 (~2.5 h)
    .venv/bin/python bench/lofi_effect.py --seeds 0 1 --ablation-seeds   # a quick look, no ablation
    .venv/bin/python bench/lofi_effect.py --smoke --seeds 0              # plumbing only, numbers mean nothing
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

from pipelines.stages.demo import DemoOptions, run as run_demo
from pipelines.logs import output_to
from pipelines.stages.report import BRANCH_TITLES

# two-sided 95% quantiles of Student's t by degrees of freedom (n - 1 seeds)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
COLUMNS = (("avg mAP", None), ("mAP@0.5", 0.5), ("mAP@0.75", 0.75), ("mAP@0.95", 0.95))
STAGE2_STAGES = ("train", "extract", "train_head", "detect")  # a branch's own wall time (stage 1 is shared)


def figure(branch: dict, tiou: float | None) -> float:
    if tiou is None:
        return 100 * branch["average_mAP"]
    index = min(range(len(branch["tiou_thresholds"])), key=lambda i: abs(branch["tiou_thresholds"][i] - tiou))
    return 100 * branch["mAP"][index]


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):6.2f} +- {sd:5.2f}"


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval of paired differences (nan bounds for one seed)."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return mean, mean - half, mean + half


def rows(reports: dict[int, dict]) -> list[dict]:
    """One row per branch present in any seed: the seeds it ran on and its figures there."""
    out = []
    for branch, title in BRANCH_TITLES.items():
        seeds = sorted(s for s, r in reports.items() if branch in r)
        if not seeds:
            continue
        bs = [reports[s][branch] for s in seeds]
        seconds = [sum(b["stage_seconds"].get(k, 0.0) for k in STAGE2_STAGES) for b in bs]
        out.append({"branch": branch, "title": title, "seeds": seeds,
                    "average_mAP": [figure(b, None) for b in bs],
                    **{name: [figure(b, t) for b in bs] for name, t in COLUMNS[1:]},
                    "activation_memory_mib": statistics.fmean(b["activation_memory_bytes"] for b in bs) / 2**20,
                    "branch_seconds": statistics.fmean(seconds),
                    "per_class": {label: statistics.fmean(100 * b["per_class_average_AP"][label] for b in bs)
                                  for label in bs[0].get("per_class_average_AP", {})}})
    return out


def paired(reports: dict[int, dict], a: str, b: str) -> dict | None:
    seeds = sorted(s for s, r in reports.items() if a in r and b in r)
    if not seeds:
        return None
    diffs = [figure(reports[s][a], None) - figure(reports[s][b], None) for s in seeds]
    mean, lo, hi = interval(diffs)
    return {"a": a, "b": b, "seeds": seeds, "diffs": diffs, "mean": mean, "ci95": [lo, hi],
            "positive": sum(d > 0 for d in diffs)}


def recovered(reports: dict[int, dict]) -> float | None:
    """The share of full end to end's mean gain over the frozen baseline that LoFi's mean gain is."""
    gain = paired(reports, "full_end_to_end", "baseline")
    lofi = paired(reports, "lofi", "baseline")
    if not gain or not lofi or gain["seeds"] != lofi["seeds"] or gain["mean"] <= 0:
        return None
    return lofi["mean"] / gain["mean"]


def table(reports: dict[int, dict]) -> tuple[list[str], dict]:
    found = rows(reports)
    lines = [f"LoFi effect over seeds {sorted(reports)} (mAP in %, mean +- sample sd over the seeds a row ran on)",
             f"{'':<18}{'seeds':>9}" + "".join(f"{name:>17}" for name, _ in COLUMNS) + f"{'act. memory':>14}{'time':>8}"]
    for row in found:
        cells = [mean_sd(row["average_mAP"])] + [mean_sd(row[name]) for name, _ in COLUMNS[1:]]
        lines.append(f"{row['title']:<18}{len(row['seeds']):>9}" + "".join(f"{c:>17}" for c in cells)
                     + f"{row['activation_memory_mib']:10.1f} MiB{row['branch_seconds']:7.0f}s")
    full = next((r for r in found if r["branch"] == "full_end_to_end"), None)
    if full:
        lines.append("act. memory: one training step's saved tensors; as a share of full end to end's: " + ", ".join(
            f"{r['title']} {r['activation_memory_mib'] / full['activation_memory_mib']:.2f}"
            for r in found if r["branch"] not in ("baseline", "full_end_to_end")))
    lines.append("time: the branch's own stages (stage 2, extract, head, detect), mean over its seeds")
    pairs = []
    for row in found:
        for other in ("baseline", "full_end_to_end"):
            if row["branch"] in ("baseline", other):
                continue
            p = paired(reports, row["branch"], other)
            if p:
                pairs.append(p)
                lines.append(f"{row['branch']} - {other}, average mAP per seed: "
                             + ", ".join(f"{s}: {d:+.2f}" for s, d in zip(p["seeds"], p["diffs"]))
                             + f"; mean {p['mean']:+.2f}, 95% CI [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]; "
                             f"positive in {p['positive']}/{len(p['diffs'])}")
    share = recovered(reports)
    if share is not None:
        lines.append(f"LoFi recovers {100 * share:.0f}% of full end to end's mean gain over the frozen baseline")
    labels = list(found[0]["per_class"]) if found and found[0]["per_class"] else []
    if labels:
        lines.append("AP per class (mean over tIoU and seeds):".ljust(42) + "".join(f"{lb[:10]:>11}" for lb in labels))
        lines += [f"{row['title']:<42}" + "".join(f"{row['per_class'][lb]:10.2f}%" for lb in labels) for row in found]
    return lines, {"rows": found, "pairs": pairs, "lofi_recovers_share_of_full_gain": share}


def write(out: Path, reports: dict[int, dict], lines: list[str], summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"seeds": sorted(reports), "table": lines, **summary,
                                                  "reports": {str(s): r for s, r in reports.items()}}, indent=1))
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["branch", "seed", "average_mAP", "mAP@0.5", "mAP@0.75", "mAP@0.95", "activation_memory_mib",
                         "branch_seconds"])
        for seed, report in sorted(reports.items()):
            for branch in BRANCH_TITLES:
                if branch in report:
                    b = report[branch]
                    writer.writerow([branch, seed, *(round(figure(b, t), 3) for _, t in COLUMNS),
                                     round(b["activation_memory_bytes"] / 2**20, 2),
                                     round(sum(b["stage_seconds"].get(k, 0.0) for k in STAGE2_STAGES), 1)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Frozen baseline vs LoFi vs full end to end (and the paper's "
                                                 "ablation) on the demo over several seeds, paired per seed.")
    parser.add_argument("--out", default="bench_out/lofi_effect", help="folder for the runs (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4], help="seeds (default: 0 1 2 3 4)")
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="seeds that also run T-LoFi, S-LoFi, ST-LoFi and C-LoFi short (default: 0 1 2; none: "
                             "give the flag alone)")
    parser.add_argument("--videos", type=int, help="synthetic videos per seed (default: the demo's)")
    parser.add_argument("--smoke", action="store_true", help="the demo's smoke sizes (plumbing only)")
    parser.add_argument("--overwrite", action="store_true", help="start every seed over (needed after changing --videos)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="pipeline config override passed to every demo run; repeatable")
    parser.add_argument("--include", action="append", default=[], metavar="SEED=REPORT",
                        help="add a finished `lofi demo --seed SEED` run's report.json (same config); repeatable")
    args = parser.parse_args(argv)
    reports = {}
    for item in args.include:
        seed, _, path = item.partition("=")
        reports[int(seed)] = json.loads(Path(path).read_text())
    with output_to(Path(args.out) / "lofi.log", "bench/lofi_effect.py"):
        for seed in args.seeds:
            print(f"\n===== seed {seed} =====", flush=True)
            opts = DemoOptions(out=str(Path(args.out) / f"seed-{seed}"), overrides=tuple(args.overrides),
                               videos=args.videos, seed=seed, smoke=args.smoke, overwrite=args.overwrite,
                               ablation=seed in args.ablation_seeds)
            reports[seed] = run_demo(opts)
    lines, summary = table(reports)
    print("\n" + "\n".join(lines))
    write(Path(args.out), reports, lines, summary)
    print(f"\nwrote {Path(args.out) / 'summary.json'} and {Path(args.out) / 'summary.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
