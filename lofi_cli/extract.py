"""`lofi extract`: the argparse front end over `pipelines.stages.extract.run`.

The stage module is imported inside the functions, so that `lofi --help` and the other commands
do not pay for importing Ray.
"""

from __future__ import annotations

import argparse

from lofi_cli.args import cli_errors, pipeline_config, stage_arguments


def build_parser() -> argparse.ArgumentParser:
    from pipelines.stages import extract as stage

    parser = argparse.ArgumentParser(
        prog="lofi extract",
        description="Run the frozen encoder (encoder.checkpoint) over every video of the data.full_level shards "
                    "as Ray Data batch inference (an autoscaling actor pool of up to extract.num_actors actors, one "
                    "GPU each with scaling.use_gpu); the workers put each video's chunks together and write one "
                    "row of (T, D) snippet features per video to <run.storage>/<run.name>/features/ (Parquet + "
                    "features_manifest.json; with extract.write_npy also npy/<video_id>.npy in the (T, D) layout "
                    "feature-based TAL toolkits read; `lofi export-features` adds the annotation JSON and class map ActionFormer and "
                    "OpenTAD read). run.storage must be a folder every Ray node sees, or an s3:// / gs:// URI. Exits 2 "
                    "on a config or input error.",
        epilog="Config keys used (YAML or --set): run.name, run.storage, data.shards, data.full_level, encoder.* "
               "(name, width, checkpoint, checkpoint_format, shift_div, amp_dtype), extract.batch_size (rows per "
               "inference call), extract.num_actors (most actors in the pool), extract.chunk_snippets (snippets "
               "encoded at a time; 0: all), extract.write_npy, scaling.cpus_per_worker (CPUs per actor), "
               "scaling.use_gpu (one GPU per actor), tracking.*, ray.*. See deploy/configs/pipeline/demo.yaml.")
    stage_arguments(parser, stage.CONFIG_SECTIONS)
    parser.add_argument("--quiet", action="store_true", help="no Ray Data progress bars")
    return parser


@cli_errors("extract")
def main(argv: list[str] | None = None) -> int:
    from pipelines.stages import extract as stage

    args = build_parser().parse_args(argv)
    cfg = pipeline_config(args)
    if args.quiet:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    stage.run(cfg)
    return 0
