"""`lofi export-features`: the argparse front end over `pipelines.stages.export.run`.

The stage module is imported inside the functions, so that `lofi --help` and the other commands
do not pay for importing Ray.
"""

from __future__ import annotations

import argparse

from lofi_cli.args import cli_errors


def build_parser() -> argparse.ArgumentParser:
    from pipelines.stages import export as stage

    p = argparse.ArgumentParser(
        prog="lofi export-features",
        description="Write a `lofi extract` features folder in the layout of the feature-based TAL toolkits "
                    "ActionFormer and OpenTAD: OUT/features/<prefix><video_id>.npy (float32 (T, D)), "
                    "OUT/annotations.json (ActivityNet-style database with subset, duration, fps, frame and "
                    "segments with label and label_id), OUT/category_idx.txt (class map: line i = label id i) "
                    "and OUT/toolkits.json (the dataset keys to put into each toolkit's config: feature stride, "
                    "num_frames / offset_frames, fps, or for a whole-video grid ActionFormer's feat_stride -1 and "
                    "OpenTAD's resize dataset). Works on any features folder (npy written or not). Exits 2 on an "
                    "input error.",
        epilog="Time base: lofi's snippets are placed in seconds; the toolkits count frames. --fps is the frame rate "
               "the export states for every video (it need not be the videos' own): a fixed-stride level of s "
               "seconds becomes a stride of s x fps frames, each feature centred s x fps / 2 frames after its start, "
               "and OpenTAD needs both whole, e.g. s=0.5 needs --fps a multiple of 4. See docs/architecture.md "
               "(Features).")
    p.add_argument("features", metavar="FEATURES", help="the features folder or URI (<run>/features)")
    p.add_argument("out", metavar="OUT", help="local folder to create (replaced only with --overwrite)")
    p.add_argument("--fps", type=float, default=stage.ExportOptions.fps,
                   help=f"time base in frames per second (default {stage.ExportOptions.fps:g})")
    p.add_argument("--file-prefix", default="", metavar="PREFIX",
                   help="prefix of every feature file name, e.g. v_ for ActivityNet's convention (JSON keys stay "
                        "the video ids; tell the toolkit the same prefix)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


@cli_errors("export-features")
def main(argv: list[str] | None = None) -> int:
    from pipelines.stages import export as stage

    args = build_parser().parse_args(argv)
    opts = stage.ExportOptions(fps=args.fps, file_prefix=args.file_prefix, overwrite=args.overwrite)
    print("\n".join(stage.summary_lines(stage.run(args.features, args.out, opts))), flush=True)
    return 0
