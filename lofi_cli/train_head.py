"""`lofi train-head`: the argparse front end over `pipelines.stages.train_head.run`.

The stage module is imported inside the functions, so that `lofi --help` and the other commands
do not pay for importing Ray.
"""

from __future__ import annotations

import argparse

from lofi_cli.args import cli_errors, pipeline_config, stage_arguments


def build_parser() -> argparse.ArgumentParser:
    from pipelines.stages import train_head as stage

    parser = argparse.ArgumentParser(
        prog="lofi train-head",
        description="Stage 3: train the TAL head from scratch on the features `lofi extract` wrote under "
                    "<run.storage>/<run.name>/features/, with Ray Train (DDP over scaling.num_workers workers, a "
                    "checkpoint every epoch, resume by run.name). Reports validation loss and detection mAP every "
                    "epoch. Features of a fixed-stride level are cut into overlapping windows of data.window_snippets "
                    "snippets. Writes <run.storage>/<run.name>/head/model.pt (head state dict) and model.json.",
        epilog="Config keys used (YAML or --set): run.name and run.storage (where the features are and the head "
               "goes), run.seed, run.max_failures, run.deterministic; data.train_subset, data.val_subset, "
               "data.window_snippets, data.window_overlap, data.window_empty_fraction (fixed-stride features); head.* "
               "(name bmn|gtad, hidden, max_duration, loss weights, top_k_classes, ...); train_head.* (optimizer, lr, "
               "momentum, weight_decay, epochs, lr_step_epochs, lr_gamma, batch_size (global), grad_clip_norm, "
               "shuffle_buffer_rows); detect.soft_nms_sigma, detect.top_k, detect.protocol (anet|thumos: the mAP "
               "thresholds); scaling.num_workers, scaling.use_gpu, scaling.cpus_per_worker; tracking.*; "
               "ray.address, ray.num_cpus.")
    return stage_arguments(parser, stage.CONFIG_SECTIONS)


@cli_errors("train-head")
def main(argv: list[str] | None = None) -> int:
    from pipelines.stages import train_head as stage

    stage.run(pipeline_config(build_parser().parse_args(argv)))
    return 0
