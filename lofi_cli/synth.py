"""`lofi synth OUT`: write the demo dataset (encoded videos + ActivityNet annotations)."""

from __future__ import annotations

import argparse

from lofi.config import load_config
from lofi.errors import LofiError
from lofi.synth import generate, MOTION_CLASSES, SCENES, SynthConfig
from lofi_cli.args import add_config_arguments, cli_errors

# flag -> SynthConfig field; a flag given on the command line wins over --config and --set.
FLAG_FIELDS: dict[str, str] = {
    "videos": "num_videos",
    "seed": "seed",
    "scene": "scene",
    "size_px": "size_px",
    "fps": "fps",
    "corrupt": "num_corrupt",
    "min_duration_sec": "min_duration_sec",
    "max_duration_sec": "max_duration_sec",
    "min_instance_sec": "min_instance_sec",
    "max_instance_sec": "max_instance_sec",
    "val_fraction": "val_fraction",
}


def build_parser() -> argparse.ArgumentParser:
    d = SynthConfig()
    parser = argparse.ArgumentParser(
        prog="lofi synth",
        description=(
            "Generate the demo dataset: untrimmed H.264 videos in OUT/videos/<id>.mp4 with several "
            f"action instances each, whose classes ({', '.join(MOTION_CLASSES)}) differ only in how "
            "an object moves, plus OUT/annotations.json (ActivityNet v1.3, training/validation "
            "subsets) and OUT/synth_summary.json (counts, speed, corrupt ids). The same seed gives "
            "the same files, byte for byte, on any machine."
        ),
    )
    parser.add_argument("out", metavar="OUT", help="folder to write into (created if missing)")
    parser.add_argument("--videos", type=int, metavar="N", help=f"number of intact videos (default {d.num_videos})")
    parser.add_argument("--seed", type=int, metavar="S", help=f"random seed of the whole dataset (default {d.seed})")
    parser.add_argument("--scene", choices=SCENES,
                        help="simple: a plain background and one object per action instance, which acts once and "
                             "is static otherwise, with motions that stay unambiguous at the demo's sparse "
                             "sampling (learnable by a small encoder from scratch); cluttered: textured "
                             "backgrounds, 2-4 actors plus gliding, spinning distractors and fast motions, a "
                             f"stress test (default {d.scene})")
    parser.add_argument("--size-px", type=int, metavar="P",
                        help=f"frame width and height in pixels, even, >= 32 (default {d.size_px})")
    parser.add_argument("--fps", type=float, metavar="F", help=f"frames per second (default {d.fps:g})")
    parser.add_argument("--corrupt", type=int, metavar="K",
                        help="add K damaged files on top of the intact ones, listed in the annotations like any "
                             "other video: truncated mp4, zero bytes, not a video, in turn; their ids go to "
                             f"synth_summary.json under corrupt_ids (default {d.num_corrupt})")
    parser.add_argument("--min-duration-sec", type=float, metavar="SEC",
                        help=f"shortest video in seconds (default {d.min_duration_sec:g})")
    parser.add_argument("--max-duration-sec", type=float, metavar="SEC",
                        help="longest video in seconds; durations are uniform in between "
                             f"(default {d.max_duration_sec:g})")
    parser.add_argument("--min-instance-sec", type=float, metavar="SEC",
                        help=f"shortest action instance in seconds (default {d.min_instance_sec:g})")
    parser.add_argument("--max-instance-sec", type=float, metavar="SEC",
                        help=f"longest action instance in seconds (default {d.max_instance_sec:g}); every video "
                             "holds at least two instances with at least 1 s of background around each")
    parser.add_argument("--val-fraction", type=float, metavar="X",
                        help=f"share of videos in the validation subset (default {d.val_fraction:g})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset already in OUT (its synth_*.mp4 files and annotations)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_workers_argument(parser)
    add_config_arguments(parser)
    parser.epilog = (
        f"The x264 quality (crf, default {d.crf}) is set with --set crf=N or a YAML --config file; explicit "
        "flags above win over both. The cluttered dataset as first made: --scene cluttered --size-px 128 "
        "--min-duration-sec 20 --max-duration-sec 120 --min-instance-sec 1 --max-instance-sec 20."
    )
    return parser


def add_workers_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="processes that render and encode (default 0: one per core, up to 8); every file is "
                             "drawn from its own seed, so any number writes the same bytes")


def run_generator(args: argparse.Namespace, config_cls: type, flag_fields: dict[str, str], make) -> int:
    """The body of `lofi synth` and `lofi synth-clips`: config from --config, --set and the flags
    (flags win), then `make(out, cfg, overwrite=, progress=)` and its summary printed."""
    overrides: list = list(args.overrides)
    overrides += [(key, getattr(args, flag)) for flag, key in flag_fields.items() if getattr(args, flag) is not None]
    cfg = load_config(config_cls, args.config, overrides)
    if args.workers < 0:
        raise LofiError(f"--workers {args.workers}: use 0 (one per core) or a positive number")
    summary = make(args.out, cfg, overwrite=args.overwrite, progress=not args.quiet, workers=args.workers)
    print("\n".join(summary.lines()))
    return 0


@cli_errors("synth")
def main(argv: list[str] | None = None) -> int:
    return run_generator(build_parser().parse_args(argv), SynthConfig, FLAG_FIELDS, generate)
