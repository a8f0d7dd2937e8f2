"""The `lofi` command: one subcommand per stage.

Each entry names the module whose `main(argv) -> int` runs the subcommand. Modules are
imported only when their subcommand runs, so `lofi --help` stays fast and a stage that
needs Ray does not slow down one that does not.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv) -> int, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("lofi.synth_cli", "generate the demo dataset: encoded untrimmed videos + ActivityNet annotations"),
    "synth-clips": ("lofi.synth_clips_cli", "generate trimmed clips of the demo's motion classes for stage-1 pre-training"),
    "annotations": ("lofi.annotations_cli", "validate, summarise or convert an annotation file"),
    "eval": ("lofi.eval_cli", "score detections (mAP at tIoU thresholds) or proposals (AR@AN)"),
    "plan-memory": ("lofi.memory_cli", "activation memory per fidelity level and what fits a GPU budget"),
    "prepare": ("pipelines.data.prepare", "decode videos with Ray Data into Arrow shards at fidelity levels"),
    "pretrain": ("pipelines.stages.pretrain", "stage 1: train the encoder as a clip classifier on trimmed clips (Ray Train)"),
    "train": ("pipelines.stages.train", "stage 2 (LoFi): train encoder + TAL head end to end at reduced fidelity (Ray Train)"),
    "train-head": ("pipelines.stages.train_head", "stage 3: train the TAL head on extracted features (Ray Train)"),
    "extract": ("pipelines.stages.extract", "run the frozen encoder over every video (Ray Data batch inference) into feature shards"),
    "export-features": ("pipelines.stages.export", "a features folder as npy + annotation JSON + class map for ActionFormer / OpenTAD"),
    "detect": ("pipelines.stages.detect", "head on the validation features -> ActivityNet predictions (Soft-NMS, top-k) -> mAP"),
    "pipeline": ("pipelines.stages.pipeline", "the whole method on your dataset as one job: prepare, stage 1, LoFi, features, "
                                       "head, detections, report"),
    "sweep": ("tuning.sweep", "sweep stage 2 over fidelity levels and other config keys with Ray Tune, "
                              "memory-aware, tracked in MLflow"),
    "demo": ("pipelines.stages.demo", "the main job: generate the demo dataset and run the pipeline on it"),
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
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
