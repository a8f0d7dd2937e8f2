"""`lofi synth-clips OUT`: write trimmed clips of the demo's motion classes for stage-1 pre-training."""

from __future__ import annotations

import argparse

from lofi.synth import ClipSynthConfig, generate_clips, MOTION_CLASSES
from lofi_cli.args import add_config_arguments, cli_errors
from lofi_cli.synth import add_workers_argument, run_generator

# flag -> ClipSynthConfig field; a flag given on the command line wins over --config and --set.
FLAG_FIELDS: dict[str, str] = {
    "clips": "num_clips",
    "seed": "seed",
    "size_px": "size_px",
    "fps": "fps",
    "clip_sec": "clip_sec",
    "val_fraction": "val_fraction",
    "still_class": "still_class",
    "leave_out": "leave_out",
}


def build_parser() -> argparse.ArgumentParser:
    d = ClipSynthConfig()
    parser = argparse.ArgumentParser(
        prog="lofi synth-clips",
        description=(
            "Generate trimmed clips for stage-1 pre-training (prepare them with `lofi prepare`, then point "
            "`lofi pretrain`'s data.pretrain_shards at the shards): each "
            f"clip shows one object on a plain background doing one motion class ({', '.join(MOTION_CLASSES)}) "
            "from its first frame to its last beside 0-2 static objects: a window of an instance of `lofi synth "
            "--scene simple`, its motion drawn for a 3-6 s instance (the same rates). Writes "
            "Kinetics-style OUT/videos/clip_<i>_000000_<end>.mp4, OUT/clips.csv "
            "(label,youtube_id,time_start,time_end,split; split train or val, classes balanced in both) and "
            "OUT/clips_summary.json (counts per class and split, speed). The same seed gives the same files, "
            "byte for byte, on any machine."
        ),
    )
    parser.add_argument("out", metavar="OUT", help="folder to write into (created if missing)")
    parser.add_argument("--clips", type=int, metavar="N", help=f"number of clips (default {d.num_clips})")
    parser.add_argument("--seed", type=int, metavar="S", help=f"random seed of the whole set (default {d.seed})")
    parser.add_argument("--size-px", type=int, metavar="P",
                        help="frame width and height in pixels, even, >= 32; use the TAL videos' size "
                             f"(default {d.size_px})")
    parser.add_argument("--fps", type=float, metavar="F",
                        help=f"frames per second; use the TAL videos' rate (default {d.fps:g})")
    parser.add_argument("--clip-sec", type=int, metavar="SEC",
                        help="length of every clip in whole seconds, >= 2 (one bounce hop); the file name and "
                             f"the CSV say time_start 0, time_end SEC (default {d.clip_sec})")
    parser.add_argument("--val-fraction", type=float, metavar="X",
                        help=f"share of each class's clips in split val (default {d.val_fraction:g})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace clips already in OUT (its videos/clip_*.mp4 files and clips.csv)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--still", dest="still_class", action="store_true", default=None,
                        help="add a class 'still' of clips in which nothing acts (a TAL video's background)")
    parser.add_argument("--leave-out", type=_class_list, metavar="A,B",
                        help="motion classes no clip shows, comma-separated: a stage 1 that never sees some TAL "
                             "classes, as Kinetics' classes are not ActivityNet's (default: none)")
    add_workers_argument(parser)
    add_config_arguments(parser)
    parser.epilog = (f"The x264 quality (crf, default {d.crf}) is set with --set crf=N or a YAML --config file; "
                     "explicit flags above win over both.")
    return parser


def _class_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


@cli_errors("synth-clips")
def main(argv: list[str] | None = None) -> int:
    return run_generator(build_parser().parse_args(argv), ClipSynthConfig, FLAG_FIELDS, generate_clips)
