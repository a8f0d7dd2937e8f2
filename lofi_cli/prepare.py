"""`lofi prepare`: the argparse front end over `pipelines.data.prepare.run`.

The stage module is imported inside the functions, so that `lofi --help` and the other commands
do not pay for importing Ray.
"""

from __future__ import annotations

import sys
import argparse

from lofi_cli.args import add_config_arguments, cli_errors, config_from_args


def build_parser() -> argparse.ArgumentParser:
    from pipelines.data import prepare as stage

    parser = argparse.ArgumentParser(
        prog="lofi prepare",
        description="Decode the videos of an annotation file with Ray Data into Parquet shards at one or "
                    "several fidelity levels (one decode per video), resumably. Joins the Ray cluster named "
                    "by ray.address or RAY_ADDRESS, else starts a local one. Writes OUT/manifest.json with "
                    "counts, shard files and per-video errors; exits 1 when the share of failed videos "
                    "exceeds max_error_fraction, 2 on a config or input error.",
        epilog=stage.CONFIG_KEYS, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="delete what an earlier run wrote to the output folder and start over (needed when "
                             "the config changed); without it a rerun resumes, skipping committed videos")
    parser.add_argument("--retry-failed", action="store_true",
                        help="decode again only the videos listed in the errors of the output's manifest (a plain "
                             "rerun skips failed videos); committed parts are kept, the manifest updated")
    parser.add_argument("--quiet", action="store_true", help="no Ray Data progress bars")
    return parser


@cli_errors("prepare")
def main(argv: list[str] | None = None) -> int:
    from pipelines.data import prepare as stage

    args = build_parser().parse_args(argv)
    if args.overwrite:
        args.overrides.append("overwrite=true")
    if args.retry_failed:
        args.overrides.append("retry_failed=true")
    cfg = config_from_args(stage.PrepareConfig, args)
    if args.quiet:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    result = stage.run(cfg)
    if result.too_many_errors:
        print(f"lofi prepare: {result.videos_failed} of {result.videos_total} videos failed "
              f"({result.error_fraction:.1%} > max_error_fraction {cfg.max_error_fraction:.1%}); see the errors "
              f"in {result.manifest_path}", file=sys.stderr)
        return 1
    return 0
