"""`lofi sweep`: the argparse front end over `tuning.sweep.run`.

The stage module is imported inside the functions, so that `lofi --help` and the other commands
do not pay for importing Ray.
"""

from __future__ import annotations

import argparse

from lofi_cli.args import add_config_arguments, cli_errors, config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofi sweep",
        description="Sweep stage 2 (LoFi end-to-end training) over config keys with Ray Tune, e.g. fidelity kinds "
                    "and level sizes, learning rates, memory switches. Data preparation and stage 1 come from the "
                    "pipeline config (reused when `lofi pipeline` already ran them). Trials whose activation memory "
                    "per step exceeds search.budget_gb are not launched; ASHA stops trials that fall behind on "
                    "the per-epoch validation mAP. Ends with a table sorted by the metric; MLflow holds one parent "
                    "run per sweep (results.csv, pareto.png, best_config.yaml) and one child run per trial.",
        epilog="Config: a sweep YAML (deploy/configs/sweep/*.yaml) with name, storage, pipeline (the pipeline YAML "
               "the trials start from), set (its overrides), space (dotted key -> {grid|choice: [...]} or "
               "{uniform|loguniform: [low, high]}) and search (num_samples, seed, metric, mode, budget_gb, "
               "scheduler asha|none, grace_period_epochs, reduction_factor, max_concurrent_trials). Watch a running "
               "sweep in the Ray dashboard (http://127.0.0.1:8265, Jobs/Actors) and compare trials in the MLflow "
               "UI (the command is printed at the end).")
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep of the same name: finished trials are kept, unfinished "
                             "and errored ones run again from their last epoch checkpoint")
    return parser


@cli_errors("sweep")
def main(argv: list[str] | None = None) -> int:
    from pipelines.logs import output_to
    from tuning import sweep as stage
    from tuning.config import SweepConfig

    args = build_parser().parse_args(argv)
    scfg = config_from_args(SweepConfig, args)
    with output_to(scfg.dir() / "lofi.log", stage.LOG):
        stage.run(scfg, resume=args.resume)
    return 0
