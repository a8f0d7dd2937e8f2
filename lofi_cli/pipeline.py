"""`lofi pipeline`: the argparse front end over `pipelines.stages.pipeline.run`.

The stage module is imported inside the functions, so that `lofi --help` and the other commands
do not pay for importing Ray.
"""

from __future__ import annotations

import argparse

from lofi_cli.args import add_config_arguments, cli_errors, pipeline_config


def build_parser() -> argparse.ArgumentParser:
    from pipelines.config import STAGE_ORDER

    parser = argparse.ArgumentParser(
        prog="lofi pipeline",
        description="Run the whole method on your dataset as one job: prepare the TAL videos (data.videos, "
                    "data.annotations) at the full level and every level of the fidelity schedule, and stage 1's "
                    "trimmed clips (data.pretrain_videos, data.pretrain_annotations: e.g. a Kinetics-style CSV); "
                    "stage 1 (clip classification; skipped when encoder.checkpoint is given without clips); stage 2 "
                    "(LoFi end-to-end training); full-fidelity feature extraction; head training; detection and "
                    "mAP. Prints a table and writes <run.storage>/<run.name>/report.json; every stage is a child "
                    "run of one MLflow parent run. A rerun reuses finished stages whose config and inputs did not "
                    "change and resumes an interrupted one.",
        epilog="Config: a pipeline YAML (deploy/configs/pipeline/*.yaml). Keys the pipeline adds to the stages': "
               "data.videos, data.pretrain_videos, data.pretrain_annotations, prepare.* (num_workers, "
               "videos_per_part, max_error_fraction, clip_frames_per_snippet, clip_videos_per_part, metadata, "
               "annotation_errors raise|skip|keep, subsets, storage uint8|jpeg). On a "
               "cluster: ray job submit --runtime-env deploy/runtime_env.yaml --working-dir . -- lofi pipeline "
               "--config deploy/configs/pipeline/anet_tsm_r18_gtad_c_lofi_long.yaml (see deploy/README.md).")
    add_config_arguments(parser)
    parser.add_argument("--baseline", action="store_true",
                        help="add the baseline branch: the head on the frozen stage-1 (or given) encoder's features")
    parser.add_argument("--full-end-to-end", action="store_true",
                        help="add stage 2 at full fidelity, the upper bound LoFi approximates (it needs the most "
                             "memory: see `lofi plan-memory`)")
    parser.add_argument("--ablation", action="store_true",
                        help="add the paper's ablation branches, each from the same starting encoder and with the "
                             "same head recipe: T-LoFi, S-LoFi and ST-LoFi alone, and C-LoFi with the long (per "
                             "epoch) and the short (every fidelity.every_batches batches, a third of the epochs: the "
                             "same steps) cycle; one that trains what the lofi branch trains is left out")
    parser.add_argument("--from", dest="from_stage", choices=STAGE_ORDER, metavar="STAGE",
                        help=f"rerun this stage and every later one ({', '.join(STAGE_ORDER)}); earlier ones are "
                             "reused when unchanged")
    return parser


@cli_errors("pipeline")
def main(argv: list[str] | None = None) -> int:
    from pipelines.logs import output_to
    from pipelines.stages import pipeline as stage

    args = build_parser().parse_args(argv)
    cfg = pipeline_config(args)
    with output_to(stage.log_path(cfg), "lofi pipeline"):
        stage.run(cfg, stage.PipelineOptions(baseline=args.baseline, full_end_to_end=args.full_end_to_end,
                                             ablation=args.ablation, from_stage=args.from_stage or ""))
    return 0
