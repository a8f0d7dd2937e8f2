"""The table of `lofi` subcommands: name -> (front end's `main(argv) -> int`, one-line summary).

The front-end modules import only argparse and the pure method library at the top; each one
imports its stage (and so Ray) inside `main`, so `lofi --help` stays fast.
"""

from __future__ import annotations

import sys
from typing import Callable

from lofi_cli import (annotations, demo, detect, eval, export_features, extract, pipeline, plan_memory, prepare,
                      pretrain, sweep, synth, synth_clips, train, train_head)

Main = Callable[[list[str] | None], int]

COMMANDS: dict[str, tuple[Main, str]] = {
    "synth": (synth.main, "generate the demo dataset: encoded untrimmed videos + ActivityNet annotations"),
    "synth-clips": (synth_clips.main, "generate trimmed clips of the demo's motion classes for stage-1 pre-training"),
    "annotations": (annotations.main, "validate, summarise or convert an annotation file"),
    "eval": (eval.main, "score detections (mAP at tIoU thresholds) or proposals (AR@AN)"),
    "plan-memory": (plan_memory.main, "activation memory per fidelity level and what fits a GPU budget"),
    "prepare": (prepare.main, "decode videos with Ray Data into Arrow shards at fidelity levels"),
    "pretrain": (pretrain.main, "stage 1: train the encoder as a clip classifier on trimmed clips (Ray Train)"),
    "train": (train.main, "stage 2 (LoFi): train encoder + TAL head end to end at reduced fidelity (Ray Train)"),
    "train-head": (train_head.main, "stage 3: train the TAL head on extracted features (Ray Train)"),
    "extract": (extract.main, "run the frozen encoder over every video (Ray Data batch inference) into feature shards"),
    "export-features": (export_features.main,
                        "a features folder as npy + annotation JSON + class map for ActionFormer / OpenTAD"),
    "detect": (detect.main, "head on the validation features -> ActivityNet predictions (Soft-NMS, top-k) -> mAP"),
    "pipeline": (pipeline.main, "the whole method on your dataset as one job: prepare, stage 1, LoFi, features, "
                                "head, detections, report"),
    "sweep": (sweep.main, "sweep stage 2 over fidelity levels and other config keys with Ray Tune, "
                          "memory-aware, tracked in MLflow"),
    "demo": (demo.main, "the main job: generate the demo dataset and run the pipeline on it"),
}


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: lofi COMMAND [options]   (lofi COMMAND --help for the options of one command)",
        "",
        "LoFi: end-to-end video encoder training for temporal action localization at reduced fidelity.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lofi: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return int(COMMANDS[name][0](rest) or 0)
