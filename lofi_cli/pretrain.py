"""`lofi pretrain`: the argparse front end over `pipelines.stages.pretrain.run`.

The stage module is imported inside the functions, so that `lofi --help` and the other commands
do not pay for importing Ray.
"""

from __future__ import annotations

import argparse

from lofi_cli.args import cli_errors, pipeline_config, stage_arguments


def build_parser() -> argparse.ArgumentParser:
    from pipelines.stages import pretrain as stage

    parser = argparse.ArgumentParser(
        prog="lofi pretrain",
        description="Stage 1: train the video encoder as a clip classifier on labelled trimmed clips: a separate "
                    "clip set (data.pretrain_shards: `lofi prepare` of a Kinetics-style CSV or of `lofi synth-clips`) "
                    "or the snippets of the TAL training videos (one per snippet inside a segment, plus a "
                    "background class), with Ray Train (DDP over scaling.num_workers workers, a checkpoint "
                    "every epoch; rerunning with the same run.name resumes). Writes <run.storage>/<run.name>/"
                    "pretrain/encoder.pt for encoder.checkpoint of the later stages.",
        epilog="Config keys used (YAML or --set): data.pretrain_shards, data.shards, data.pretrain_level, "
               "data.pretrain_background, data.pretrain_clip_frames, data.pretrain_min_crop_scale, "
               "data.pretrain_min_side_scale, data.pretrain_balanced, data.full_level, data.train_subset, data.val_subset; encoder.* (name, width, checkpoint, "
               "checkpoint_format, shift_div, activation_checkpointing, freeze_bn, frozen_stages, amp_dtype); "
               "pretrain.* (optimizer sgd|adamw, lr, momentum, weight_decay, epochs, lr_step_epochs, lr_gamma, "
               "batch_size (global, in clips), grad_clip_norm, shuffle_buffer_rows); run.name, run.storage, "
               "run.seed, run.max_failures, run.deterministic; scaling.num_workers, scaling.use_gpu, "
               "scaling.cpus_per_worker; tracking.*; ray.address, ray.num_cpus.")
    return stage_arguments(parser, stage.CONFIG_SECTIONS)


@cli_errors("pretrain")
def main(argv: list[str] | None = None) -> int:
    from pipelines.stages import pretrain as stage

    stage.run(pipeline_config(build_parser().parse_args(argv)))
    return 0
