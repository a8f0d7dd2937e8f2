"""`lofi demo`: the main job (`make demo`): the LoFi effect on a synthetic dataset, end to end.

Phases (each prints progress and a summary; all tracked in MLflow as one parent run whose
children are the stages):

    1. data      `lofi synth` videos + annotations in OUT/data; `lofi prepare` shards in
                 OUT/prepared at the full level and every level of the fidelity schedule
    2. stage 1   `lofi pretrain`: clip classification       -> OUT/runs/stage1/pretrain/encoder.pt
    3. baseline  the frozen stage-1 encoder: extract full-fidelity features, train the head
                 on them, detect on the validation videos   -> OUT/runs/baseline/
    4. LoFi      `lofi train` (stage 2: encoder + head end to end at reduced fidelity, from the
                 stage-1 encoder), then the same extract -> train-head -> detect with the
                 stage-2 encoder                            -> OUT/runs/lofi/
    5. report    table + OUT/report.json: mAP per tIoU, average mAP, activation memory, wall
                 time per stage; and how to open the MLflow UI

Fair comparison: both branches start from the same stage-1 encoder, train the same head
config with the same recipe (`train_head`) and seed, and are scored on the same validation
videos; the LoFi branch differs only by stage 2, which trains the encoder.

Reuse: every stage writes a record (OUT/runs/<branch>/demo_records/<stage>.json) holding a
hash of the config sections it reads and of its inputs; a rerun skips a stage whose record
matches (synth and prepare check their own outputs the same way). `--overwrite` starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lofi.config import apply_overrides, from_dict, load_yaml, replace, to_dict
from lofi.errors import LofiError, cli_errors
from pipelines.config import PipelineConfig, StageResult

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "deploy/configs/pipeline/demo.yaml"
SMOKE_CONFIG = "deploy/configs/pipeline/demo_smoke.yaml"
# The synthetic dataset (lofi.synth.SynthConfig fields); frames are drawn at the full level's size.
SYNTH = {"num_videos": 80, "min_duration_sec": 20.0, "max_duration_sec": 60.0, "fps": 10.0}
SMOKE_SYNTH = {"num_videos": 6, "min_duration_sec": 10.0, "max_duration_sec": 16.0, "fps": 8.0}
# stage -> (module with run(cfg, parent_run_id), config sections its output depends on)
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pretrain": ("pipelines.pretrain", ("run.seed", "data", "encoder", "pretrain", "scaling")),
    "train": ("pipelines.train", ("run.seed", "data", "encoder", "head", "fidelity", "train", "scaling")),
    "extract": ("pipelines.extract", ("data", "encoder", "extract")),
    "train_head": ("pipelines.train_head", ("run.seed", "data", "head", "train_head", "scaling")),
    "detect": ("pipelines.detect", ("data", "head", "detect")),
}


@dataclass(frozen=True)
class DemoOptions:
    out: str = "demo_out"
    config: str | None = None  # default: DEFAULT_CONFIG (SMOKE_CONFIG with smoke)
    overrides: tuple[str, ...] = ()
    videos: int | None = None
    seed: int | None = None  # seeds the dataset and training (run.seed)
    smoke: bool = False
    overwrite: bool = False


@dataclass
class Stage:
    """One stage run (or reused) by the demo: what the report needs from it."""

    result: StageResult
    key: str
    seconds: float
    reused: bool


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
    derived: list[tuple[str, Any]] = [("run.storage", str(out / "runs")), ("data.shards", str(out / "prepared")),
                                      ("data.annotations", str(out / "data" / "annotations.json"))]
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


def make_data(cfg: PipelineConfig, opts: DemoOptions, parent) -> dict[str, float]:
    """Synthesise (or reuse) the videos, then prepare (or resume) the shards; return seconds."""
    from lofi.synth import SUMMARY_FILE, generate
    from pipelines import prepare

    data_dir = Path(cfg.data.annotations).parent
    synth = synth_config(cfg, opts)
    start = time.perf_counter()
    summary_file = data_dir / SUMMARY_FILE
    with parent.child("synth", tags={"stage": "synth"}) as run:
        if summary_file.is_file() and json.loads(summary_file.read_text()).get("config") == to_dict(synth):
            print(f"lofi demo: reusing the dataset in {data_dir}", flush=True)
        else:
            if summary_file.is_file():
                raise LofiError(f"{data_dir} holds a dataset made with other settings (--videos, --seed, "
                                "--smoke or the full level's size_px); pass --overwrite to start over")
            print("\n".join(generate(data_dir, synth, overwrite=True).lines()), flush=True)
        run.log_config(synth)
        timings = {"synth": time.perf_counter() - start}
    start = time.perf_counter()
    with parent.child("prepare", tags={"stage": "prepare"}) as run:
        pcfg = prepare_config(cfg, data_dir)
        run.log_config(pcfg)
        result = prepare.run(pcfg)
        if result.videos_failed:
            raise LofiError(f"{result.videos_failed} videos failed to prepare; see {result.manifest_path}")
        timings["prepare"] = time.perf_counter() - start
        run.log_metrics({"videos_ok": result.videos_ok, "seconds": timings["prepare"]}, step=0)
    return timings


def prepare_config(cfg: PipelineConfig, data_dir: Path):
    """Shards at the full level and at every level the stages read, named as the schedule names them."""
    from lofi.fidelity import FidelitySchedule, resolve_level
    from pipelines.prepare import PrepareConfig

    names = [cfg.data.full_level, getattr(cfg.data, "pretrain_level", "") or cfg.data.full_level]
    names += [level.name for level in FidelitySchedule(cfg.fidelity).levels()]
    levels = []
    for name in dict.fromkeys(names):
        level = resolve_level(name, cfg.fidelity.overrides)
        levels.append({"name": name, "num_snippets": level.num_snippets,
                       "frames_per_snippet": level.frames_per_snippet, "size_px": level.size_px})
    return from_dict(PrepareConfig, {
        "input": {"annotations": str(data_dir / "annotations.json"), "videos": str(data_dir / "videos")},
        "output": cfg.data.shards, "levels": levels, "num_workers": 2, "videos_per_part": 4,
        "max_error_fraction": 0.0, "ray": to_dict(cfg.ray)})


# 2. stages, with reuse -----------------------------------------------------------------------

def stage_key(cfg: PipelineConfig, stage: str, upstream: str) -> str:
    plain = to_dict(cfg)
    picked = {}
    for section in STAGES[stage][1]:
        head, _, rest = section.partition(".")
        picked[section] = plain[head][rest] if rest else plain[head]
    text = json.dumps({"stage": stage, "config": picked, "upstream": upstream}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def stage_outputs(cfg: PipelineConfig, stage: str) -> list[Path]:
    run = cfg.run.dir()
    outputs = {"pretrain": [run / "pretrain"], "train": [run / "train"], "extract": [run / "features"],
               "train_head": [run / "head"], "detect": [run / "detect"]}[stage]
    return outputs + [run / "ray" / name for name in (stage, stage.replace("_", "-"))]


def run_stage(stage: str, cfg: PipelineConfig, upstream: Stage | None, parent_run_id: str | None) -> Stage:
    """Run `stage` unless its record says the same config and inputs already produced its outputs
    (a stage whose input stage ran again always runs: its inputs changed)."""
    key = stage_key(cfg, stage, upstream.key if upstream else "")
    record = cfg.run.dir() / "demo_records" / f"{stage}.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved["key"] == key and saved.get("result") and (upstream is None or upstream.reused):
            result = StageResult(**saved["result"])
            if all(Path(p).exists() for p in result.artifacts.values()):
                print(f"lofi demo: reusing {cfg.run.name}/{stage} ({result.out_dir})", flush=True)
                return Stage(result, key, saved["seconds"], reused=True)
        if saved["key"] != key:  # other settings: a checkpoint left there must not be resumed
            for path in stage_outputs(cfg, stage):
                shutil.rmtree(path, ignore_errors=True)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"key": key}))
    print(f"\n== lofi demo: {cfg.run.name}/{stage}", flush=True)
    start = time.perf_counter()
    result = importlib.import_module(STAGES[stage][0]).run(cfg, parent_run_id=parent_run_id)
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"key": key, "seconds": seconds, "result": dataclasses.asdict(result)}))
    return Stage(result, key, seconds, reused=False)


def run_branches(cfg: PipelineConfig, parent_run_id: str | None) -> dict[str, dict[str, Stage]]:
    """Stage 1, then the baseline and the LoFi branch, both from the stage-1 encoder."""
    stage1 = run_stage("pretrain", replace(cfg, [("run.name", "stage1")]), None, parent_run_id)
    encoder1 = stage1.result.artifacts["encoder"]
    branches: dict[str, dict[str, Stage]] = {"baseline": {"pretrain": stage1}, "lofi": {"pretrain": stage1}}
    lofi_cfg = replace(cfg, [("run.name", "lofi"), ("encoder.checkpoint", encoder1)])
    # Stage 2 keeps stage 1's BatchNorm statistics: its levels differ in frame size, and
    # statistics re-estimated at the last level's size would not fit full-fidelity extraction.
    train = run_stage("train", replace(lofi_cfg, [("encoder.freeze_bn", True)]), stage1, parent_run_id)
    branches["lofi"]["train"] = train
    inputs = {"baseline": (replace(cfg, [("run.name", "baseline"), ("encoder.checkpoint", encoder1)]), stage1),
              "lofi": (replace(lofi_cfg, [("encoder.checkpoint", train.result.artifacts["encoder"])]), train)}
    for name, (branch_cfg, upstream) in inputs.items():
        for stage in ("extract", "train_head", "detect"):
            upstream = branches[name][stage] = run_stage(stage, branch_cfg, upstream, parent_run_id)
    return branches


# 3. memory and report ------------------------------------------------------------------------

def activation_memory(cfg: PipelineConfig, branches: dict[str, dict[str, Stage]]) -> dict[str, Any]:
    """Saved-tensor bytes of one training step (per worker): head-only, LoFi, and full fidelity end to end.

    Head-only (baseline): the head's step on full-level features (the frozen encoder saves
    nothing). End to end: encoder + head at each level, from lofi.memory's planner (meta
    device, exact); LoFi uses stage 2's own measurement when it reports one.
    """
    import torch

    from lofi.fidelity import FidelitySchedule, resolve_level
    from lofi.heads import build_head, head_loss
    from lofi.memory import measure_head, synthetic_targets
    from lofi.memory_cli import PlanMemoryConfig, run as plan
    from lofi.models.resnet import STAGES as ENCODER_STAGES
    from pipelines.features import read_features_manifest

    manifest = read_features_manifest(branches["baseline"]["extract"].result.out_dir)
    dim, num_classes = manifest["feature_dim"], len(manifest["labels"])
    full = resolve_level(cfg.data.full_level, cfg.fidelity.overrides)
    head_batch = cfg.train_head.per_worker_batch(cfg.scaling.num_workers)
    head = build_head(cfg.head, dim, full.num_snippets, num_classes)
    targets = synthetic_targets(head_batch, full.num_snippets, cfg.head.resolved_max_duration(full.num_snippets),
                                num_classes, region_snippets=cfg.head.boundary_region_snippets)
    head_only = measure_head(head, dim, full.num_snippets, targets, lambda out, t: head_loss(cfg.head, out, t),
                             head_batch).saved_bytes
    levels = [level.name for level in FidelitySchedule(cfg.fidelity).levels()]
    amp = cfg.encoder.amp_dtype if cfg.encoder.amp_dtype != "fp16" or torch.cuda.is_available() else "none"
    ckpt = tuple(cfg.encoder.activation_checkpointing)
    rows = plan(PlanMemoryConfig(
        model=dataclasses.replace(cfg.encoder, checkpoint=None), head=cfg.head, num_classes=num_classes,
        levels=tuple(dict.fromkeys([*levels, full.name])), level_overrides=dict(cfg.fidelity.overrides),
        checkpointing=(bool(ckpt),), checkpoint_stages=ckpt or ENCODER_STAGES, amp=(amp,),
        device="cuda" if amp == "fp16" else "auto"))
    batch = cfg.train.per_worker_batch(cfg.scaling.num_workers)
    planned = {row.level.name: row.memory.saved_bytes(batch) for row in rows}
    measured = branches["lofi"]["train"].result.metrics.get("activation_memory_bytes")
    return {"baseline": head_only, "lofi": int(measured) if measured else max(planned[n] for n in levels),
            "full_fidelity_end_to_end": planned[full.name], "planned_per_level": planned,
            "lofi_source": "stage 2 measurement" if measured else "lofi.memory planner",
            "batch_per_worker": {"train": batch, "train_head": head_batch}}


def branch_report(stages: dict[str, Stage], memory_bytes: int) -> dict[str, Any]:
    detect = stages["detect"].result
    scores = json.loads(Path(detect.artifacts["eval"]).read_text())
    return {"tiou_thresholds": scores["tiou_thresholds"], "mAP": scores["mAP"], "average_mAP": scores["average_mAP"],
            "activation_memory_bytes": memory_bytes,
            "stage_seconds": {name: round(s.seconds, 2) for name, s in stages.items()},
            "reused_stages": [name for name, s in stages.items() if s.reused],
            "num_validation_videos": scores["num_videos"], "predictions": detect.artifacts["predictions"],
            "eval": detect.artifacts["eval"],
            "mlflow_run_ids": {name: s.result.mlflow_run_id for name, s in stages.items()}}


def _at(branch: dict[str, Any], tiou: float) -> str:
    for t, m in zip(branch["tiou_thresholds"], branch["mAP"]):
        if abs(t - tiou) < 1e-6:
            return f"{100 * m:6.2f}%"
    return f"{'-':>7}"


def table_lines(report: dict[str, Any]) -> list[str]:
    mib = 2**20
    lines = [f"{'':<18}{'avg mAP':>9}{'mAP@.5':>9}{'mAP@.75':>9}{'mAP@.95':>9}{'act. memory':>14}   wall time per stage (s)"]
    for name, title in (("baseline", "baseline (frozen)"), ("lofi", "LoFi (stage 2)")):
        b = report[name]
        times = ", ".join(f"{k} {v:.0f}" + ("*" if k in b["reused_stages"] else "") for k, v in b["stage_seconds"].items())
        lines.append(f"{title:<18}{100 * b['average_mAP']:8.2f}%{_at(b, 0.5):>9}{_at(b, 0.75):>9}{_at(b, 0.95):>9}"
                     f"{b['activation_memory_bytes'] / mib:10.1f} MiB   {times}")
    m = report["memory"]
    lines.append(f"full fidelity end to end would save {report['full_fidelity_activation_memory_bytes'] / mib:.1f} MiB "
                 f"of activations per step ({m['batch_per_worker']['train']} videos per worker; LoFi: "
                 f"{m['lofi_source']}; baseline: the head's training step, the frozen encoder saves nothing)")
    lines.append(f"data: synth {report['data_seconds']['synth']:.0f} s, prepare {report['data_seconds']['prepare']:.0f} s; "
                 f"total {report['total_seconds']:.0f} s" + ("; * = reused from an earlier run" if any(
                     report[b]["reused_stages"] for b in ("baseline", "lofi")) else ""))
    return lines


# 4. entry points -----------------------------------------------------------------------------

def clear_outputs(out: Path) -> None:
    """--overwrite: remove what earlier runs wrote (the MLflow database keeps their history)."""
    for name in ("data", "prepared", "runs", "report.json"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run(opts: DemoOptions) -> dict[str, Any]:
    """The whole demo; returns the report (also written to OUT/report.json)."""
    from pipelines.plots import memory_vs_map
    from pipelines.tracking import Tracker, mlflow_ui_command

    start = time.perf_counter()
    cfg = resolve_config(opts)
    out = Path(opts.out).resolve()
    if opts.overwrite:
        clear_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    with Tracker.start(cfg.tracking, cfg.run.name, tags={"stage": "demo", "lofi.out_dir": str(out)}) as parent:
        parent.log_config(cfg)
        data_seconds = make_data(cfg, opts, parent)
        branches = run_branches(cfg, parent.run_id)
        memory = activation_memory(cfg, branches)
        report = {name: branch_report(branches[name], memory[name]) for name in ("baseline", "lofi")}
        report.update({"full_fidelity_activation_memory_bytes": memory["full_fidelity_end_to_end"], "memory": memory,
                       "data_seconds": {k: round(v, 2) for k, v in data_seconds.items()},
                       "total_seconds": round(time.perf_counter() - start, 2), "out_dir": str(out),
                       "mlflow": {"parent_run_id": parent.run_id, "experiment": cfg.tracking.experiment,
                                  "ui": mlflow_ui_command(cfg.tracking)}})
        (out / "report.json").write_text(json.dumps(report, indent=1))
        parent.log_metrics({f"{b}_{k}": report[b][k] for b in ("baseline", "lofi")
                            for k in ("average_mAP", "activation_memory_bytes")}, step=0)
        parent.log_artifact(str(out / "report.json"))
        parent.log_figure(memory_vs_map([("baseline (frozen)", memory["baseline"], report["baseline"]["average_mAP"]),
                                         ("LoFi", memory["lofi"], report["lofi"]["average_mAP"])]),
                          "plots/memory_vs_map.png")
    print("\n".join(["", f"lofi demo: done in {report['total_seconds']:.0f} s", *table_lines(report), "",
                     f"MLflow: parent run {report['mlflow']['parent_run_id']} in experiment {cfg.tracking.experiment!r} "
                     "(stages are its child runs); browse with:", f"  {report['mlflow']['ui']}",
                     f"files in {out}: report.json; data/ (videos, annotations.json); prepared/ (shards); "
                     "runs/stage1/pretrain/encoder.pt; runs/{baseline,lofi}/ features/, head/model.pt, "
                     "detect/predictions.json, detect/eval.json; runs/lofi/train/ (stage 2 encoder and model)"]),
          flush=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofi demo",
        description="The main job: generate a synthetic TAL dataset, prepare shards at full and LoFi fidelity, "
                    "pre-train the encoder (stage 1), then compare (a) the baseline, head trained on the frozen "
                    "stage-1 encoder's full-fidelity features, with (b) LoFi, stage-2 end-to-end training at "
                    "reduced fidelity before the same feature extraction and head training. Prints a table "
                    "(mAP per tIoU, activation memory, wall time per stage), writes OUT/report.json, tracks all "
                    "stages in MLflow (one parent run, stages as child runs) and says how to open the MLflow UI. "
                    "A rerun reuses finished stages whose settings did not change. About 15 minutes on 2 CPU cores.",
        epilog="Sizes of the dataset, fidelity levels, encoder, head and training are in the config "
               f"({DEFAULT_CONFIG}, with comments); the demo sets run.storage, data.shards, data.annotations under "
               "OUT and, without tracking.tracking_uri or MLFLOW_TRACKING_URI, tracks to sqlite:///OUT/mlflow.db.")
    parser.add_argument("--out", default="demo_out", metavar="DIR",
                        help="folder for everything the demo writes (default: demo_out)")
    parser.add_argument("--config", metavar="FILE",
                        help=f"pipeline config (default: {DEFAULT_CONFIG}; with --smoke: {SMOKE_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one pipeline config value by its dotted key, e.g. --set train.epochs=4; repeatable")
    parser.add_argument("--videos", type=int, metavar="N",
                        help=f"number of synthetic videos (default {SYNTH['num_videos']}, with --smoke "
                             f"{SMOKE_SYNTH['num_videos']}); 20%% of them are validation videos")
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
    run(DemoOptions(out=args.out, config=args.config, overrides=tuple(args.overrides), videos=args.videos,
                    seed=args.seed, smoke=args.smoke, overwrite=args.overwrite))
    return 0
