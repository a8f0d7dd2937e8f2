"""`lofi demo`: the main job (`make demo`): the LoFi effect on a synthetic dataset, end to end.

Phases (each prints progress and a summary; all tracked in MLflow as one parent run whose
children are the stages):

    1. data      `lofi synth` untrimmed videos + annotations in OUT/data and `lofi synth-clips`
                 trimmed clips + clips.csv (Kinetics-style) in OUT/clips; `lofi prepare` shards
                 in OUT/prepared (the full level and every level of the fidelity schedule) and
                 OUT/prepared_clips (one level "clip": T=1, a clip per file)
    2. stage 1   `lofi pretrain` on the clips (as the paper's Kinetics stage), scored every
                 epoch on held-out clips and on the TAL validation videos' snippets; the clips
                 leave out UNSEEN_CLASSES of the TAL classes (which ones turns with the seed)
                                                            -> OUT/runs/stage1/pretrain/encoder.pt
    3. baseline  the frozen stage-1 encoder: extract full-fidelity features, train the head
                 on them, detect on the validation videos   -> OUT/runs/baseline/
    4. LoFi      `lofi train` (stage 2: encoder + head end to end at reduced fidelity, from the
                 stage-1 encoder), then the same extract -> train-head -> detect with the
                 stage-2 encoder                            -> OUT/runs/lofi/
    5. full e2e  the same as 4 with stage 2 at full fidelity: the upper bound LoFi approximates,
                 at several times its activation memory     -> OUT/runs/full_end_to_end/
    6. report    table + OUT/report.json: mAP per tIoU, average mAP, activation memory, wall
                 time per stage, stage-1 accuracies; and how to open the MLflow UI

Fair comparison: every branch starts from the same stage-1 encoder, trains the same head
config with the same recipe (`train_head`) and seed, and is scored on the same validation
videos; the stage-2 branches differ from the baseline only by stage 2, which trains the
encoder, and from each other only by `fidelity.kind`.

Reuse: the synthetic sets are regenerated only when their config changes (their summary
files hold it); every later stage is reused by `lofi pipeline`'s records (<run>/records/).
`--overwrite` starts over.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lofi.config import apply_overrides, from_dict, load_yaml, to_dict
from lofi.errors import LofiError
from pipelines.config import PipelineConfig

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = "deploy/configs/pipeline/demo.yaml"
SMOKE_CONFIG = "deploy/configs/pipeline/demo_smoke.yaml"
# The synthetic TAL dataset (lofi.synth.SynthConfig fields); frames are drawn at the full level's size.
# 140 videos, 35 of them validation: few validation videos make average mAP swing by points.
SYNTH = {"num_videos": 140, "val_fraction": 0.25, "min_duration_sec": 24.0, "max_duration_sec": 36.0,
         "min_instance_sec": 3.0, "max_instance_sec": 6.0, "fps": 10.0, "scene": "simple"}
SMOKE_SYNTH = {"num_videos": 6, "val_fraction": 0.2, "min_duration_sec": 10.0, "max_duration_sec": 16.0,
               "min_instance_sec": 2.0, "max_instance_sec": 4.0, "fps": 8.0, "scene": "simple"}
# Stage 1's own trimmed clips (lofi.synth.ClipSynthConfig fields), as Kinetics is the paper's stage 1.
# "still": clips where nothing acts, a class of their own (lofi.synth.clips: without one, stage 1 can tell
# rotate apart by elimination and never represent a turning object). num_clips is CLIPS_PER_CLASS times
# the classes the set shows.
CLIPS = {"still_class": True}
CLIPS_PER_CLASS, SMOKE_CLIPS_PER_CLASS = 400, 4
# The task discrepancy: stage 1's clips show only some of the TAL classes, as Kinetics-400's classes are
# not ActivityNet's. UNSEEN_CLASSES of them are in no clip: the frozen encoder was never taught to tell
# them apart, end-to-end training can learn them. Which ones turns with the seed: a fixed shuffle of the
# classes taken UNSEEN_CLASSES at a time, so any 6 / UNSEEN_CLASSES consecutive seeds leave out each once.
UNSEEN_CLASSES = 1
UNSEEN_STREAM = 0x756E7365  # "unse": the shuffle's own random stream, the same for every seed
LOG_FILE = "lofi.log"  # Ray's and MLflow's own messages (pipelines.logs), in OUT


@dataclass(frozen=True)
class DemoOptions:
    out: str = "demo_out"
    config: str | None = None  # default: DEFAULT_CONFIG (SMOKE_CONFIG with smoke)
    overrides: tuple[str, ...] = ()
    videos: int | None = None
    clips: int | None = None  # stage 1's trimmed clips
    seed: int | None = None  # seeds the dataset and training (run.seed)
    full_end_to_end: bool = True  # the third row: stage 2 at full fidelity (the upper bound LoFi approximates)
    ablation: bool = False  # the paper's ablation rows: each reduced level alone, C-LoFi's other cycle
    smoke: bool = False
    overwrite: bool = False


# 1. config and data --------------------------------------------------------------------------

def config_path(opts: DemoOptions) -> Path:
    """The config file; a default one is found in the repository when run from elsewhere."""
    name = opts.config or (SMOKE_CONFIG if opts.smoke else DEFAULT_CONFIG)
    path = Path(name)
    if not path.is_file() and opts.config is None and (REPO / name).is_file():
        path = REPO / name
    return path


def resolve_config(opts: DemoOptions) -> PipelineConfig:
    """The demo's pipeline config: the file, its paths under OUT, then --seed and --set."""
    out = Path(opts.out).resolve()
    path = config_path(opts)
    data = load_yaml(path)
    from lofi.synth import ANNOTATIONS_FILE, CLIPS_FILE, VIDEO_DIR

    derived: list[tuple[str, Any]] = [
        ("run.storage", str(out / "runs")), ("data.videos", str(out / "data" / VIDEO_DIR)),
        ("data.annotations", str(out / "data" / ANNOTATIONS_FILE)), ("data.shards", str(out / "prepared")),
        ("data.pretrain_videos", str(out / "clips" / VIDEO_DIR)),
        ("data.pretrain_annotations", str(out / "clips" / CLIPS_FILE)),
        ("data.pretrain_shards", str(out / "prepared_clips"))]
    if opts.seed is not None:
        derived.append(("run.seed", opts.seed))
    tracking = data.get("tracking", {}) or {}
    if not tracking.get("tracking_uri") and not os.environ.get("MLFLOW_TRACKING_URI"):
        derived.append(("tracking.tracking_uri", f"sqlite:///{out / 'mlflow.db'}"))
    try:
        return from_dict(PipelineConfig, apply_overrides(data, [*derived, *opts.overrides]))
    except LofiError as err:
        raise LofiError(f"{path}: {err}") from None


def synth_config(cfg: PipelineConfig, opts: DemoOptions):
    from lofi.fidelity import resolve_level
    from lofi.synth import SynthConfig

    size = resolve_level(cfg.data.full_level, cfg.fidelity.overrides).size_px
    fields = {**(SMOKE_SYNTH if opts.smoke else SYNTH), "size_px": size + size % 2, "seed": cfg.run.seed}
    if opts.videos is not None:
        fields["num_videos"] = opts.videos
    return from_dict(SynthConfig, fields)


def clip_synth_config(cfg: PipelineConfig, opts: DemoOptions):
    """The stage-1 clip set: the TAL videos' frame size and rate, its own seed stream."""
    from lofi.synth import ClipSynthConfig

    synth = synth_config(cfg, opts)
    leave_out = unseen_classes(cfg.run.seed)
    shown = len(ClipSynthConfig(leave_out=leave_out, **CLIPS).classes())
    per_class = SMOKE_CLIPS_PER_CLASS if opts.smoke else CLIPS_PER_CLASS
    fields = {**CLIPS, "num_clips": opts.clips if opts.clips is not None else per_class * shown,
              "size_px": synth.size_px, "fps": synth.fps, "seed": cfg.run.seed, "leave_out": list(leave_out)}
    return from_dict(ClipSynthConfig, fields)


def unseen_classes(seed: int) -> tuple[str, ...]:
    """The TAL classes stage 1's clips leave out for this seed, in the classes' order."""
    import numpy as np

    from lofi.synth import MOTION_CLASSES

    order = np.random.default_rng(UNSEEN_STREAM).permutation(len(MOTION_CLASSES))
    taken = {int(order[(seed * UNSEEN_CLASSES + i) % len(order)]) for i in range(UNSEEN_CLASSES)}
    return tuple(MOTION_CLASSES[k] for k in sorted(taken))


def _synthesise(parent, name: str, folder: Path, summary_name: str, config: Any, make: Callable[[], Any]) -> float:
    """Generate one synthetic set into `folder` unless the same config already made it; seconds taken."""
    start = time.perf_counter()
    summary_file = folder / summary_name
    with parent.child(name, tags={"stage": name}) as run:
        if summary_file.is_file() and json.loads(summary_file.read_text()).get("config") == to_dict(config):
            print(f"lofi demo: reusing the {name} output in {folder}", flush=True)
        else:
            if summary_file.is_file():
                raise LofiError(f"{folder} holds data made with other settings (--videos, --clips, --seed, "
                                "--smoke or the full level's size_px); pass --overwrite to start over")
            print("\n".join(make().lines()), flush=True)
        run.log_config(config)
    return time.perf_counter() - start


def make_data(cfg: PipelineConfig, opts: DemoOptions, parent) -> dict[str, float]:
    """Synthesise (or reuse) the TAL videos and stage 1's clips; seconds taken by each."""
    from lofi.synth import CLIPS_SUMMARY_FILE, SUMMARY_FILE, generate, generate_clips

    data_dir, clips_dir = Path(cfg.data.videos).parent, Path(cfg.data.pretrain_videos).parent
    synth, clips = synth_config(cfg, opts), clip_synth_config(cfg, opts)
    print(f"lofi demo: stage 1's clips show {', '.join(clips.classes())}; they leave out the TAL classes "
          f"{', '.join(clips.leave_out)} (seed {cfg.run.seed}'s turn): the task discrepancy, as Kinetics' "
          "classes are not ActivityNet's", flush=True)
    return {
        "synth": _synthesise(parent, "synth", data_dir, SUMMARY_FILE, synth,
                             lambda: generate(data_dir, synth, overwrite=True)),
        "synth_clips": _synthesise(parent, "synth_clips", clips_dir, CLIPS_SUMMARY_FILE, clips,
                                   lambda: generate_clips(clips_dir, clips, overwrite=True)),
    }


# 4. entry points -----------------------------------------------------------------------------

def clear_outputs(out: Path) -> None:
    """--overwrite: remove what earlier runs wrote (the MLflow database keeps their history)."""
    for name in ("data", "clips", "prepared", "prepared_clips", "runs", "report.json"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run(opts: DemoOptions) -> dict[str, Any]:
    """The whole demo; returns the report (also written to OUT/report.json)."""
    from pipelines.stages import pipeline
    from pipelines.tracking import Tracker

    start = time.perf_counter()
    cfg = resolve_config(opts)
    out = Path(opts.out).resolve()
    if opts.overwrite:
        clear_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    with Tracker.start(cfg.tracking, cfg.run.name, tags={"stage": "demo", "lofi.out_dir": str(out)}) as parent:
        parent.log_config(cfg)
        data_seconds = make_data(cfg, opts, parent)
        report = pipeline.run(cfg, pipeline.PipelineOptions(baseline=True, full_end_to_end=opts.full_end_to_end,
                                                            ablation=opts.ablation, log_prefix="lofi demo"),
                              parent, data_seconds)
    report["total_seconds"] = round(time.perf_counter() - start, 2)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"lofi demo: report in {out / 'report.json'}; files in {out}: data/ (videos, annotations.json), clips/ "
          "(stage 1's clips, clips.csv), prepared/ and prepared_clips/ (shards), "
          f"runs/{cfg.run.name}/ (stage1/pretrain/encoder.pt; baseline/, lofi/, full_end_to_end/ with features/, "
          "head/model.pt, detect/predictions.json, detect/eval.json; lofi/train/, full_end_to_end/train/: stage 2)",
          flush=True)
    return report
