"""`lofi eval`: score detections (mAP at tIoU thresholds) or proposals (AR@AN) against ground truth."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lofi.annotations import quiet_annotation_log
from lofi.config import load_config
from lofi.evaluation import EvalConfig, run_eval
from lofi_cli.args import add_config_arguments, cli_errors


def _tiou_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers, e.g. 0.5,0.75,0.95") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lofi eval",
        description="Score detections against ground truth as the official ActivityNet evaluator does: "
                    "mAP per tIoU threshold and its average, or with --proposals the AR@AN curve. "
                    "Ground truth is read leniently (zero-length segments and segments past the video's end "
                    "are kept, as officially) and such segments are listed on stderr.")
    p.add_argument("--ground-truth", metavar="GT", help="ground truth: ActivityNet/HACS JSON, THUMOS14 TSP CSV, "
                   "or ground truth in the prediction format (then --metadata is required)")
    p.add_argument("--predictions", metavar="P.json",
                   help="predictions {results: {video_id: [{label, score, segment}]}}")
    p.add_argument("--subset",
                   help="ground-truth subset to score: training, validation, testing or tuning (default validation)")
    p.add_argument("--tuning-videos", metavar="FILE",
                   help="the tuning split: the shards' manifest.json (`lofi prepare` with prepare.tuning_fraction) or a "
                        "file of video ids (JSON list or one per line); those training videos form subset tuning")
    p.add_argument("--protocol", choices=("anet", "thumos"),
                   help="tIoU thresholds: anet = 0.50:0.05:0.95 (default), thumos = 0.3:0.1:0.7")
    p.add_argument("--tiou", type=_tiou_list, metavar="T1,T2,...", help="explicit tIoU thresholds; override --protocol")
    p.add_argument("--blocked", metavar="FILE",
                   help="video ids to leave out of ground truth and predictions (one per line or a JSON list)")
    p.add_argument("--metadata", metavar="CSV", help="per-video durations/fps (filename, video-duration, fps columns)")
    p.add_argument("--labels", metavar="FILE",
                   help="known class names (JSON list or one per line) to check labels against")
    p.add_argument("--proposals", action="store_true", default=None,
                   help="evaluate class-agnostic proposals (AR@AN, AUC) instead of detection mAP")
    p.add_argument("--max-avg-proposals", type=float, metavar="N",
                   help="proposal budget per video on average for AR@AN (default 100)")
    p.add_argument("--skip-invalid", action="store_true", default=None,
                   help="drop invalid ground-truth and prediction entries (and say how many) instead of failing")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout instead of a table")
    p.add_argument("--per-class", action="store_true", help="also print the AP of every class (table output)")
    add_config_arguments(p)
    return p


FLAG_KEYS = ("ground_truth", "predictions", "subset", "protocol", "tiou", "blocked", "metadata", "labels",
             "proposals", "max_avg_proposals", "skip_invalid", "tuning_videos")


def _table(result: dict[str, Any], per_class: bool) -> str:
    if "AUC" in result:
        lines = [f"Proposals on {result['subset']}: {result['num_videos']} videos, {result['num_ground_truth']} "
                 f"ground-truth segments, {result['num_proposals']} proposals",
                 f"  AUC (AR vs AN, normalised): {100 * result['AUC']:.2f}%"]
        lines += [f"  {k:<7} {100 * result[k]:6.2f}%" for k in result if k.startswith("AR@")]
        return "\n".join(lines)
    lines = [f"Detection on {result['subset']}: {result['num_videos']} videos, {result['num_ground_truth']} "
             f"ground-truth segments, {result['num_predictions']} predictions",
             "  tIoU    mAP"]
    lines += [f"  {t:<5.2f} {100 * m:6.2f}%" for t, m in zip(result["tiou_thresholds"], result["mAP"])]
    lines.append(f"  avg   {100 * result['average_mAP']:6.2f}%")
    if per_class:
        width = max(len(k) for k in result["per_class_ap"])
        lines.append(f"  {'class':<{width}}  " + " ".join(f"{t:>6.2f}" for t in result["tiou_thresholds"]))
        lines += [f"  {k:<{width}}  " + " ".join(f"{100 * x:6.2f}" for x in v)
                  for k, v in result["per_class_ap"].items()]
    return "\n".join(lines)


@cli_errors("eval")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = [(key, getattr(args, key)) for key in FLAG_KEYS if getattr(args, key) is not None]
    cfg = load_config(EvalConfig, args.config, [*flags, *args.overrides])
    with quiet_annotation_log():  # the warnings are printed below, once
        result, warnings = run_eval(cfg)
    for line in warnings:
        print(f"lofi eval: warning: {line}" if not line.startswith(" ") else line, file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(_table(result, args.per_class))
    return 0


if __name__ == "__main__":
    sys.exit(main())
