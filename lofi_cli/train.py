"""`lofi train`: the argparse front end over `pipelines.stages.train.run`.

The stage module is imported inside the functions, so that `lofi --help` and the other commands
do not pay for importing Ray.
"""

from __future__ import annotations

import argparse

from lofi_cli.args import cli_errors, pipeline_config, stage_arguments


def build_parser() -> argparse.ArgumentParser:
    from pipelines.stages import train as stage

    parser = argparse.ArgumentParser(
        prog="lofi train",
        description="Stage 2 (LoFi): train the encoder and the TAL head end to end with Ray Train, each batch at the "
                    "fidelity level the schedule picks (fidelity.kind full, s_lofi, t_lofi, st_lofi or c_lofi), read "
                    "from the `lofi prepare` shard level of the same name (same T, F, S; whole videos per row). "
                    "DDP over scaling.num_workers workers at the same global batch; a checkpoint every epoch; "
                    "rerunning with the same run.name resumes. Writes <run.storage>/<run.name>/train/encoder.pt, "
                    "model.pt and model.json.",
        epilog="Config keys used (YAML or --set): data.shards, data.full_level (sets the head's grid), "
               "data.train_subset, data.val_subset; fidelity.kind, fidelity.cycle (epoch|batches), "
               "fidelity.every_batches, fidelity.overrides.<level>.{num_snippets,frames_per_snippet,size_px}; "
               "encoder.* (checkpoint: e.g. the stage-1 encoder.pt; activation_checkpointing, amp_dtype, freeze_bn, "
               "frozen_stages); head.*; train.* (optimizer, lr, momentum, weight_decay, epochs, lr_step_epochs, "
               "lr_gamma, batch_size (global), encoder_lr_scale, grad_clip_norm (default 1), freeze_encoder_bn "
               "(default true), shuffle_buffer_rows); run.name, "
               "run.storage, run.seed, run.max_failures, run.deterministic; scaling.num_workers, scaling.use_gpu, "
               "scaling.cpus_per_worker; tracking.*; ray.address, ray.num_cpus.")
    return stage_arguments(parser, stage.CONFIG_SECTIONS)


@cli_errors("train")
def main(argv: list[str] | None = None) -> int:
    from pipelines.stages import train as stage

    stage.run(pipeline_config(build_parser().parse_args(argv)))
    return 0
