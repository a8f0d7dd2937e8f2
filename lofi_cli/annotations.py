"""`lofi annotations`: validate an annotation file, summarise it, optionally convert it to ActivityNet JSON."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from lofi.annotations import (FORMATS, SUBSETS, AnnotationSet, end_tolerance_sec, load_annotations, quiet_annotation_log,
                              save_activitynet)
from lofi_cli.args import cli_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lofi annotations",
        description="Validate a ground-truth file and print a summary (videos per subset, segments, labels, "
                    "durations). Every problem is listed at once, each naming the file, video id and field; "
                    f"the command then exits with status 2. Segment ends past the video's duration by at most "
                    f"max(1 s, 1%%) (e.g. {end_tolerance_sec(60):.0f} s for a 60 s video) are clipped.")
    p.add_argument("file", metavar="FILE", help="ActivityNet/HACS JSON, THUMOS14 TSP CSV, Kinetics-style trimmed-clip "
                   "CSV (label,youtube_id,time_start,time_end,split: one clip per row, id <youtube_id>_<start:06d>_"
                   "<end:06d>), or ground truth in the prediction format {results: ...} (needs --metadata)")
    p.add_argument("--metadata", metavar="CSV", help="per-video durations/fps: filename (v_<id>.mp4 or <id>.mp4), "
                   "video-duration and fps columns; wins over durations in FILE")
    p.add_argument("--skip-invalid", action="store_true",
                   help="drop invalid segments/videos and say how many, instead of failing")
    p.add_argument("--lenient", action="store_true", help="keep zero-length segments and segments past the video's end "
                   "as written (the official evaluator does) and list them as warnings")
    p.add_argument("--subset", choices=SUBSETS, help="summarise (and convert) only this subset")
    p.add_argument("--labels", metavar="FILE",
                   help="known class names (JSON list or one per line); other labels are errors")
    p.add_argument("--format", default="auto", choices=FORMATS, help="file format (default: detect from the content)")
    p.add_argument("--assign-subset", choices=SUBSETS, help="subset for formats without one (prediction format: "
                   "validation by default; THUMOS CSV: inferred from video_test_*/video_validation_* names)")
    p.add_argument("--to-activitynet", metavar="OUT.json",
                   help="also write the (validated) annotations as ActivityNet v1.3 JSON")
    return p


def _stats(values: list[float]) -> str:
    if not values:
        return "none"
    a = np.asarray(values)
    return f"min {a.min():.2f}  median {np.median(a):.2f}  mean {a.mean():.2f}  max {a.max():.2f}"


def summary(ann: AnnotationSet) -> str:
    counts = ann.subset_counts()
    segment_sec = [s.duration_sec for v in ann.videos for s in v.segments]
    used = {s.label for v in ann.videos for s in v.segments}
    coverage = [s.duration_sec / v.duration_sec for v in ann.videos for s in v.segments]
    lines = [
        f"videos: {len(ann)} (" + ", ".join(f"{k} {n}" for k, n in counts.items()) + ")",
        f"segments: {ann.num_segments} ({ann.num_segments / max(len(ann), 1):.2f} per video)",
        f"labels: {len(ann.labels)} in the vocabulary, {len(used)} with segments",
        f"video duration (s): {_stats([v.duration_sec for v in ann.videos])}",
        f"segment duration (s): {_stats(segment_sec)}",
        f"segment length / video duration: {_stats(coverage)}",
    ]
    fps = sorted({v.fps for v in ann.videos if v.fps is not None})
    shown = ", ".join(f"{f:g}" for f in fps[:8]) + (" ..." if len(fps) > 8 else "")
    lines.append(f"fps: {shown}" if fps else "fps: unknown")
    return "\n".join(lines)


@cli_errors("annotations")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with quiet_annotation_log():
        ann = load_annotations(args.file, metadata=args.metadata, skip_invalid=args.skip_invalid, fmt=args.format,
                               labels=args.labels, lenient=args.lenient, assign_subset=args.assign_subset)
    for line in ann.warnings:
        print(line if line.startswith(" ") else f"lofi annotations: warning: {line}", file=sys.stderr)
    if args.subset:
        ann = ann.subset(args.subset)
    print(f"{args.file}: valid")
    print(summary(ann))
    if args.to_activitynet:
        save_activitynet(ann, args.to_activitynet)
        print(f"wrote {len(ann)} videos, {ann.num_segments} segments to {args.to_activitynet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
