"""Tune's overhead: the same stage-2 trials run by `lofi sweep` and one after another by `lofi train`.

Both sides run the same trials (a grid of `--trials` fidelity kinds, `--epochs` epochs each) on
a generated dataset, in one process on one local Ray cluster, one trial at a time (the sweep
with max_concurrent_trials 1 and no early stopping), so the difference is what Tune adds: its
trial actors, result plumbing (TuneReportCallback), experiment-state saving and the
sweep's planning and results. Printed side by side:
  - the Tune phase of the sweep (the trials) vs the sum of the `lofi train` runs;
  - the whole sweep (planning, data check, results, MLflow review) vs the same sum.
Goal (issue 9): the sweep's trials cost at most 15% more than running them by hand.
The order alternates over `--repeats` rounds (sweep first, then train first), as this machine
is shared and noisy.

Run:  .venv/bin/python bench/sweep_overhead.py            (--help for the options)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

KINDS = ("s_lofi", "t_lofi", "st_lofi", "c_lofi", "full")
LEVELS = {"full": (8, 32), "s_lofi": (8, 16), "t_lofi": (4, 32), "st_lofi": (6, 24)}  # name -> (T, S); F = 2


def write_configs(tmp: Path, data: Path, kinds: list[str], epochs: int) -> Path:
    from lofi.models.encoders import EncoderConfig, build_encoder

    torch.manual_seed(0)
    torch.save(build_encoder(EncoderConfig(width=8, shift_div=4)).state_dict(), tmp / "encoder.pt")
    pipeline = {
        "run": {"name": "base", "storage": str(tmp / "runs"), "seed": 1},
        "data": {"videos": str(data / "videos"), "annotations": str(data / "annotations.json")},
        "prepare": {"num_workers": 2, "videos_per_part": 4},
        "encoder": {"width": 8, "shift_div": 4, "checkpoint": str(tmp / "encoder.pt")},
        "head": {"name": "bmn", "hidden": 16, "num_sample": 4},
        "fidelity": {"overrides": {n: {"num_snippets": t, "frames_per_snippet": 2, "size_px": s}
                                   for n, (t, s) in LEVELS.items()}},
        "train": {"optimizer": "adamw", "lr": 1e-3, "epochs": epochs, "batch_size": 4},
        "detect": {"top_k": 20},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "sweep-overhead"},
    }
    (tmp / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    sweep = {"name": "overhead", "storage": str(tmp / "sweeps"), "pipeline": str(tmp / "pipeline.yaml"),
             "space": {"fidelity.kind": {"grid": kinds}},
             "search": {"scheduler": "none", "max_concurrent_trials": 1}}
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return tmp / "sweep.yaml"


def run_sweep(config: Path, name: str) -> dict:
    from lofi.config import load_config
    from tuning.config import SweepConfig
    from tuning.sweep import run

    return run(load_config(SweepConfig, config, [f"name={name}"]))


def run_by_hand(config: Path, kinds: list[str], tag: str) -> list[float]:
    """`lofi train` of each trial, one after another; seconds of each `run` call."""
    from lofi.config import load_config, replace
    from pipelines.stages import pipeline, train
    from pipelines.tracking import Tracker
    from tuning.config import SweepConfig

    scfg = load_config(SweepConfig, config)
    base = scfg.base_config()
    with Tracker.start(base.tracking, f"by-hand-{tag}") as parent:  # the data, as the sweep's upstream
        base, _ = pipeline.run_upstream(base, pipeline.PipelineOptions(log_prefix="bench"), parent)
        seconds = []
        for kind in kinds:
            cfg = replace(base, [("fidelity.kind", kind), ("run.name", f"{tag}-{kind}")])
            start = time.perf_counter()
            train.run(cfg, parent_run_id=parent.run_id)
            seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3, help=f"fidelity kinds swept, from {', '.join(KINDS)}")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2, help="rounds, alternating which side runs first")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    from lofi_cli.commands import main as lofi
    from pipelines.cluster import RayConfig, connect_ray

    kinds = list(KINDS[: args.trials])
    tmp = Path(tempfile.mkdtemp(prefix="lofi-sweep-bench-"))
    try:
        data = tmp / "data"
        assert lofi(["synth", str(data), "--videos", str(args.videos), "--seed", "3", "--size-px", "32",
                     "--min-duration-sec", "12", "--max-duration-sec", "16", "--set", "min_instance_sec=2",
                     "--set", "max_instance_sec=4", "--quiet"]) == 0
        config = write_configs(tmp, data, kinds, args.epochs)
        connect_ray(RayConfig())
        rows = []
        for r in range(args.repeats):
            order = ("sweep", "hand") if r % 2 == 0 else ("hand", "sweep")
            measured = {}
            for side in order:
                if side == "sweep":
                    summary = run_sweep(config, f"overhead-{r}")
                    measured["tune"], measured["sweep"] = summary["phase_seconds"]["tune"], summary["seconds"]
                else:
                    measured["hand"] = sum(run_by_hand(config, kinds, f"r{r}"))
            rows.append(measured)
            print(f"round {r + 1} ({order[0]} first): lofi train x{len(kinds)} {measured['hand']:.1f} s | "
                  f"sweep trials (Tune phase) {measured['tune']:.1f} s ({measured['tune'] / measured['hand']:.3f}x) | "
                  f"whole sweep {measured['sweep']:.1f} s ({measured['sweep'] / measured['hand']:.3f}x)", flush=True)
        hand = sum(m["hand"] for m in rows)
        tune = sum(m["tune"] for m in rows)
        sweep = sum(m["sweep"] for m in rows)
        print(f"\n{len(kinds)} trials x {args.epochs} epochs, {args.videos} videos, {args.repeats} rounds:")
        print(f"  lofi train, one after another: {hand / len(rows):7.1f} s per round")
        print(f"  lofi sweep, Tune phase:        {tune / len(rows):7.1f} s per round   overhead {100 * (tune / hand - 1):+.1f}%")
        print(f"  lofi sweep, whole job:         {sweep / len(rows):7.1f} s per round   overhead {100 * (sweep / hand - 1):+.1f}%")
        print("  goal: Tune phase overhead <= +15%")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
