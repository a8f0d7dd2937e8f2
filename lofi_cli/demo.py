"""`lofi demo`: the argparse front end over `pipelines.stages.demo.run`.

The stage module is imported inside the functions, so that `lofi --help` and the other commands
do not pay for importing Ray.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lofi.errors import LofiError
from lofi_cli.args import cli_errors


def build_parser() -> argparse.ArgumentParser:
    from pipelines.stages import demo as stage

    parser = argparse.ArgumentParser(
        prog="lofi demo",
        description="The main job: generate a synthetic TAL dataset (untrimmed videos whose classes only motion "
                    "tells apart) and a Kinetics-style set of trimmed clips of the same classes, then run `lofi "
                    "pipeline` on them: shards at full and LoFi fidelity, stage 1 (clip classification on the "
                    "clips), and three branches from that encoder: (a) the baseline, the head trained on the frozen "
                    "encoder's full-fidelity features; (b) LoFi, stage-2 end-to-end training at reduced fidelity "
                    "before the same feature extraction and head training; (c) stage 2 at full fidelity, the upper "
                    "bound. Prints a table (mAP per tIoU, activation memory, wall time per stage, stage-1 "
                    "accuracies), writes OUT/report.json, tracks all stages in MLflow (one parent run, stages as "
                    "child runs) and says how to open the MLflow UI. A rerun reuses finished stages whose settings "
                    "did not change. About 14 minutes on 2 CPU cores.",
        epilog="Sizes of the fidelity levels, encoder, head and training are in the config "
               f"({stage.DEFAULT_CONFIG}, with comments), those of the data in pipelines/stages/demo.py; the demo sets "
               "run.storage, data.videos, data.annotations, data.shards, data.pretrain_videos, "
               "data.pretrain_annotations and data.pretrain_shards under OUT and, without tracking.tracking_uri or "
               "MLFLOW_TRACKING_URI, tracks to sqlite:///OUT/mlflow.db.")
    parser.add_argument("--out", default="demo_out", metavar="DIR",
                        help="folder for everything the demo writes (default: demo_out)")
    parser.add_argument("--config", metavar="FILE",
                        help=f"pipeline config (default: {stage.DEFAULT_CONFIG}; with --smoke: {stage.SMOKE_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one pipeline config value by its dotted key, e.g. --set train.epochs=4; repeatable")
    parser.add_argument("--videos", type=int, metavar="N",
                        help=f"number of synthetic videos (default {stage.SYNTH['num_videos']}, with --smoke "
                             f"{stage.SMOKE_SYNTH['num_videos']}); a quarter of them are validation videos (a fifth with --smoke)")
    parser.add_argument("--clips", type=int, metavar="N",
                        help=f"number of stage 1's synthetic trimmed clips (default {stage.CLIPS_PER_CLASS} per class "
                             f"they show, with --smoke {stage.SMOKE_CLIPS_PER_CLASS}); they leave out "
                             f"{stage.UNSEEN_CLASSES} of the TAL classes, which ones turning with --seed")
    parser.add_argument("--no-full-end-to-end", dest="full_end_to_end", action="store_false",
                        help="skip the third row, stage 2 at full fidelity (the upper bound LoFi approximates; on a "
                             "GPU it may not fit in memory, which is the point of LoFi)")
    parser.add_argument("--ablation", action="store_true",
                        help="add the paper's ablation rows, from the same stage-1 encoder with the same head recipe: "
                             "T-LoFi, S-LoFi and ST-LoFi alone and C-LoFi with the short cycle (about 8 more "
                             "minutes; bench/lofi_effect.py runs it over seeds)")
    parser.add_argument("--seed", type=int, metavar="S",
                        help="seed of the synthetic dataset and of training (run.seed; default: the config's)")
    parser.add_argument("--smoke", action="store_true",
                        help="the tiniest sizes (6 short videos, tiny levels and models, one epoch per stage): "
                             "checks that everything runs, in about 2-3 minutes; its numbers mean nothing")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete OUT's data, shards, runs and report and start over (needed after changing "
                             "--videos, --seed or the level sizes); the MLflow database keeps its history")
    return parser


@cli_errors("demo")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.videos is not None and args.videos < 2:
        raise LofiError("--videos must be at least 2 (a training and a validation video)")
    from pipelines.logs import output_to
    from pipelines.stages import demo as stage

    with output_to(Path(args.out) / stage.LOG_FILE, "lofi demo"):
        stage.run(stage.DemoOptions(out=args.out, config=args.config, overrides=tuple(args.overrides),
                                    videos=args.videos, clips=args.clips, seed=args.seed, smoke=args.smoke,
                                    overwrite=args.overwrite, full_end_to_end=args.full_end_to_end,
                                    ablation=args.ablation))
    return 0
