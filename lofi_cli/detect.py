"""`lofi detect`: the argparse front end over `pipelines.stages.detect.run`.

The stage module is imported inside the functions, so that `lofi --help` and the other commands
do not pay for importing Ray.
"""

from __future__ import annotations

import argparse

from lofi_cli.args import cli_errors, pipeline_config, stage_arguments


def build_parser() -> argparse.ArgumentParser:
    from pipelines.stages import detect as stage

    parser = argparse.ArgumentParser(
        prog="lofi detect",
        description="Run the head trained by `lofi train-head` (<run>/head/model.pt) on the features of the "
                    "validation subset (<run>/features/), decode detections, apply class-aware Soft-NMS, keep the "
                    "top detect.top_k per video and write <run>/detect/predictions.json (ActivityNet format); then "
                    "score them (mAP at the detect.protocol tIoU thresholds) into <run>/detect/eval.json, the "
                    "format of `lofi eval --json`. Exits 2 on a config or input error.",
        epilog="Config keys used (YAML or --set): run.name, run.storage, data.val_subset, data.annotations (ground "
               "truth; empty: the file the shards were prepared from), data.window_snippets and data.window_overlap "
               "(fixed-stride features: the windows the head runs on), detect.subset (another subset, e.g. testing: "
               "outputs under <run>/detect/<subset>/; a subset without ground truth gives a test-server submission "
               "file and no score), head.* (must match the trained head), "
               "detect.window_candidates (windows: best candidates per window before the video's Soft-NMS), "
               "detect.soft_nms_sigma, detect.top_k, detect.protocol (anet: tIoU 0.50:0.05:0.95, thumos: "
               "0.3:0.1:0.7), tracking.*. See deploy/configs/pipeline/demo.yaml.")
    return stage_arguments(parser, stage.CONFIG_SECTIONS)


@cli_errors("detect")
def main(argv: list[str] | None = None) -> int:
    from pipelines.stages import detect as stage

    args = build_parser().parse_args(argv)
    stage.run(pipeline_config(args))
    return 0
