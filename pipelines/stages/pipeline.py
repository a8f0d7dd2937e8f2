"""`lofi pipeline`: the whole method on one dataset, as one job; the one orchestrator of the stages.

Phases (each stage prints its progress and a summary; one MLflow parent run named `run.name`
holds every stage as a child run `<branch>/<stage>`):

    1. prepare   `lofi prepare` of the TAL videos (`data.videos` + `data.annotations`) at the
                 full level and every level of the fidelity schedule (derived from `fidelity`,
                 so they cannot disagree), and of stage 1's trimmed clips
                 (`data.pretrain_videos` + `data.pretrain_annotations`, one level "clip": T=1,
                 `prepare.clip_frames_per_snippet` frames at the full level's size). Skipped
                 for data already prepared (`data.shards`, `data.pretrain_shards` given alone).
    2. stage 1   `lofi pretrain`, unless `encoder.checkpoint` is given without a clip set:
                 that encoder is then the starting point.
    3. branches  from the same starting encoder, each ending in extract -> train-head -> detect:
                   lofi             stage 2 on the config's fidelity schedule (always)
                   baseline         no stage 2: the frozen encoder (--baseline)
                   full_end_to_end  stage 2 at full fidelity, the upper bound (--full-end-to-end)
                   t_lofi, s_lofi, st_lofi, c_lofi_long, c_lofi_short
                                    the paper's ablation (--ablation): each reduced level
                                    alone, and C-LoFi with either cycle at the same steps
    4. report    `<run>/report.json` (pipelines.stages.report), the table, and the MLflow UI command.

Layout under `<run>` = `run.storage/run.name`: `prepared/`, `prepared_clips/` (when the
pipeline prepares them), `stage1/pretrain/`, `<branch>/{train,features,head,detect}/`,
`<branch>/ray/<stage>/` (checkpoints), `records/` (one JSON per stage run), `report.json`.

Reuse and resume: each stage's record holds a hash of the config sections it reads and of its
inputs (the upstream stage's hash; for prepare, the annotation file's bytes and the video
folder's listing). A rerun skips a stage whose record matches and whose outputs exist; a stage
whose inputs changed runs again and so does everything after it. An interrupted training
stage resumes from its last epoch checkpoint (same run name and storage). `--from STAGE`
reruns that stage and every later one.

Errors that can be seen before work starts (missing video folders or annotation files, bad
annotations, levels that cannot be prepared, a checkpoint that does not load, too few
videos) are all reported at once, each naming the config key to fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lofi.config import from_dict, replace, to_dict
from lofi.errors import LofiError
from pipelines.config import PipelineConfig, StageResult
from pipelines.data import prepare
from pipelines.stages.branches import BRANCHES, PipelineOptions, stage2_config
from pipelines.stages import detect, extract, pretrain, train, train_head
from pipelines.storage import Location, location

# The one place stages are composed: stage -> its module, whose run(cfg, parent_run_id) -> StageResult
# runs it and whose CONFIG_SECTIONS (declared beside run) are the sections its reuse key hashes.
STAGE_MODULES = {"pretrain": pretrain, "train": train, "extract": extract, "train_head": train_head, "detect": detect}
@dataclass
class Stage:
    """One stage run (or reused) by the pipeline: what the report needs from it."""

    result: StageResult
    key: str
    seconds: float
    reused: bool


# 1. inputs -----------------------------------------------------------------------------------

def resolve_paths(cfg: PipelineConfig) -> PipelineConfig:
    """Shard folders the pipeline writes when it prepares the data itself (`<run>/prepared...`)."""
    changes: list[tuple[str, Any]] = []
    if cfg.data.videos and not cfg.data.shards:
        changes.append(("data.shards", str(cfg.run.location() / "prepared")))
    if cfg.data.pretrain_annotations and not cfg.data.pretrain_shards:
        changes.append(("data.pretrain_shards", str(cfg.run.location() / "prepared_clips")))
    return replace(cfg, changes) if changes else cfg


def _annotation_problems(key: str, path: str, videos_key: str, videos: str, options: dict[str, Any]) -> list[str]:
    from lofi.annotations import load_annotations

    problems = []
    if "://" not in videos and not Path(videos).expanduser().is_dir():
        problems.append(f"{videos_key}: {videos} is not a folder of videos; set {videos_key} to the video folder")
    if not path:
        problems.append(f"{key} is empty: set it to the annotation file of {videos_key}")
        return problems
    try:
        load_annotations(path, **options)
    except LofiError as err:
        problems.append(f"{key}: {err}")
    return problems


def check_inputs(cfg: PipelineConfig) -> None:
    """Everything that can be checked before work starts; all problems in one error."""
    from lofi.models.encoders import build_encoder

    data, problems = cfg.data, []
    pcfgs = _prepare_configs_or_problems(cfg, problems)  # validates the levels
    if data.videos:
        options = pcfgs["prepare"].input.annotation_options() if "prepare" in pcfgs else {}
        problems += _annotation_problems("data.annotations", data.annotations, "data.videos", data.videos, options)
    elif not data.shards:
        problems.append("data.videos and data.shards are empty: set data.videos (+ data.annotations) to prepare the "
                        "TAL videos, or data.shards to a `lofi prepare` output")
    elif not (location(data.shards, "data.shards") / "manifest.json").is_file():
        problems.append(f"data.shards: {data.shards}/manifest.json does not exist; run `lofi prepare` into it, or set "
                        "data.videos to let the pipeline prepare the videos")
    if data.pretrain_annotations:
        problems += _annotation_problems("data.pretrain_annotations", data.pretrain_annotations,
                                         "data.pretrain_videos", data.pretrain_videos, {})
    elif data.pretrain_shards and not (location(data.pretrain_shards, "data.pretrain_shards")
                                       / "manifest.json").is_file():
        problems.append(f"data.pretrain_shards: {data.pretrain_shards}/manifest.json does not exist")
    if cfg.encoder.checkpoint:
        try:
            build_encoder(cfg.encoder)
        except (LofiError, OSError, RuntimeError, ValueError) as err:
            problems.append(f"encoder.checkpoint: {cfg.encoder.checkpoint} does not load: {err}")
    if problems:
        raise LofiError(f"lofi pipeline cannot start ({len(problems)} problem(s)):\n  - " + "\n  - ".join(problems))


def _prepare_configs_or_problems(cfg: PipelineConfig, problems: list[str]) -> dict[str, Any]:
    try:
        return prepare_configs(cfg)
    except LofiError as err:
        problems.append(f"fidelity.overrides / prepare: the levels cannot be prepared: {err}")
        return {}


def prepare_configs(cfg: PipelineConfig, extra_levels: tuple[Any, ...] = ()) -> dict[str, Any]:
    """The `lofi prepare` configs the pipeline runs: "prepare" (TAL videos at the full level and
    every schedule level, plus `extra_levels`: FidelityLevels, e.g. a sweep's variants) and
    "prepare_clips" (stage 1's clips), each only when its videos are set."""
    from lofi.fidelity import FidelitySchedule, resolve_level
    from pipelines.data.prepare_config import PrepareConfig

    cfg = resolve_paths(cfg)
    out: dict[str, Any] = {}

    def make(annotations: str, videos: str, output: str, levels: list[dict[str, Any]], per_part: int,
             subsets: tuple[str, ...] = (), tuning: float = 0.0) -> Any:
        levels = [{**level, "storage": cfg.prepare.storage} for level in levels]
        return from_dict(PrepareConfig, {
            "input": {"annotations": annotations, "videos": videos, "metadata": cfg.prepare.metadata,
                      "subsets": list(subsets), "annotation_errors": cfg.prepare.annotation_errors,
                      "tuning_fraction": tuning, "tuning_seed": cfg.run.seed},
            "output": output, "levels": levels, "num_workers": cfg.prepare.num_workers,
            "videos_per_part": per_part, "max_error_fraction": cfg.prepare.max_error_fraction,
            "ray": to_dict(cfg.ray)})

    if cfg.data.videos:
        names = [cfg.data.full_level] + [level.name for level in FidelitySchedule(cfg.fidelity).levels()]
        levels = []
        resolved = {name: resolve_level(name, cfg.fidelity.overrides) for name in names}
        resolved.update((level.name, level) for level in extra_levels if level.name not in resolved)
        for level in resolved.values():
            levels.append({"name": level.name, "num_snippets": level.num_snippets,
                           "frames_per_snippet": level.frames_per_snippet, "size_px": level.size_px,
                           "spacing_snippets": level.spacing_snippets})
        out["prepare"] = make(cfg.data.annotations, cfg.data.videos, cfg.data.shards, levels,
                              cfg.prepare.videos_per_part, cfg.prepare.subsets, cfg.prepare.tuning_fraction)
    if cfg.data.pretrain_annotations:
        full = cfg.head_level()
        clip = {"name": "clip", "num_snippets": 1, "size_px": full.size_px,
                "frames_per_snippet": max(cfg.prepare.clip_frames_per_snippet, full.frames_per_snippet)}
        out["prepare_clips"] = make(cfg.data.pretrain_annotations, cfg.data.pretrain_videos, cfg.data.pretrain_shards,
                                    [clip], cfg.prepare.clip_videos_per_part)
    return out


# 2. stages, with reuse -----------------------------------------------------------------------

def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_key(cfg: PipelineConfig, stage: str, upstream: str) -> str:
    plain = to_dict(cfg)
    picked = {}
    for section in STAGE_MODULES[stage].CONFIG_SECTIONS:
        head, _, rest = section.partition(".")
        picked[section] = plain[head][rest] if rest else plain[head]
    return _digest({"stage": stage, "config": picked, "upstream": upstream})


def prepare_key(pcfg: Any) -> str:
    """The prepared data's identity: what defines its bytes, the annotations' bytes, the videos' listing."""
    annotations = Path(pcfg.input.annotations)
    videos = Path(pcfg.input.videos).expanduser()
    listing = sorted((p.name, p.stat().st_size) for p in videos.iterdir() if p.is_file()) if videos.is_dir() else []
    return _digest({"data": pcfg.data_key(), "annotations": hashlib.sha1(annotations.read_bytes()).hexdigest(),
                    "videos": listing})


def _record(root: Location, name: str) -> Location:
    return root / "records" / f"{name}.json"


def _reuse(record: Location, key: str, opts: PipelineOptions, stage: str, upstream: Stage | None) -> Stage | None:
    """The recorded stage when it may be reused: same key, outputs there, inputs not rerun, not forced."""
    if not record.is_file() or opts.forced(stage) or (upstream is not None and not upstream.reused):
        return None
    saved = record.read_json()
    if saved["key"] != key or not saved.get("result"):
        return None
    result = StageResult(**saved["result"])
    if not all(location(p, f"{stage} output").exists() for p in result.artifacts.values()):
        return None
    return Stage(result, key, saved["seconds"], reused=True)


def recorded(record: Location, key: str, stage: str, opts: PipelineOptions, upstream: Stage | None,
             names: tuple[str, str], work: Callable[[bool], StageResult], outputs: tuple[Location, ...] = ()) -> Stage:
    """One stage run through its record, for prepare and the other stages alike: the recorded stage
    when the same key already produced outputs that are still there (and nothing forces a rerun),
    else `work(stale)` (stale: the record is of other settings, or --from forces the stage), its
    result recorded after its outputs (the commit point, pipelines.storage). `names`: (what the
    reuse line shows, what the start line shows); `outputs` are deleted first when stale, before the
    new record, so a checkpoint of other settings is never resumed."""
    reused = _reuse(record, key, opts, stage, upstream)
    if reused is not None:
        print(f"{opts.log_prefix}: reusing {names[0]}", flush=True)
        return reused
    stale = record.is_file() and (record.read_json()["key"] != key or opts.forced(stage))
    for path in outputs if stale else ():
        path.delete()
    record.write_json({"key": key}, indent=None)
    print(f"\n== {opts.log_prefix}: {names[1]}", flush=True)
    start = time.perf_counter()
    result = work(stale)
    seconds = time.perf_counter() - start
    record.write_json({"key": key, "seconds": seconds, "result": dataclasses.asdict(result)}, indent=None)
    return Stage(result, key, seconds, reused=False)


def run_stage(stage: str, cfg: PipelineConfig, upstream: Stage | None, parent_run_id: str | None,
              opts: PipelineOptions, root: Location) -> Stage:
    """Run `stage` unless its record says the same config and inputs already produced its outputs
    (a stage whose input stage ran again always runs: its inputs changed)."""

    name = f"{cfg.run.name}/{stage}"
    return recorded(_record(root, f"{cfg.run.name}.{stage}"), stage_key(cfg, stage, upstream.key if upstream else ""),
                    stage, opts, upstream, (f"{name} ({cfg.run.stage_location(stage)})", name),
                    lambda stale: STAGE_MODULES[stage].run(cfg, parent_run_id=parent_run_id),
                    cfg.run.stage_outputs(stage))


def run_prepare(name: str, pcfg: Any, parent: Any, opts: PipelineOptions, root: Location) -> Stage:
    """`lofi prepare` unless its record matches; a changed config rewrites the pipeline's shard folder."""

    def work(stale: bool) -> StageResult:
        start = time.perf_counter()
        with parent.child(name, tags={"stage": "prepare"}) as run:
            run.log_config(pcfg)
            # resumes an interrupted run of the same data; other data (or --from prepare) starts over
            result = prepare.run(dataclasses.replace(pcfg, overwrite=stale))
            seconds = time.perf_counter() - start
            run.log_metrics({"videos_ok": result.videos_ok, "videos_failed": result.videos_failed,
                             "seconds": seconds}, step=0)
            run_id = run.run_id
        if result.too_many_errors:
            raise LofiError(f"{name}: {result.videos_failed} of {result.videos_total} videos failed, more than "
                            f"prepare.max_error_fraction={pcfg.max_error_fraction}; see the errors in "
                            f"{result.manifest_path}")
        return StageResult(stage="prepare", out_dir=result.out_dir, seconds=seconds, mlflow_run_id=run_id,
                           metrics={"videos_ok": result.videos_ok, "videos_failed": result.videos_failed},
                           artifacts={"manifest": result.manifest_path})

    return recorded(_record(root, name), prepare_key(pcfg), "prepare", opts, None,
                    (f"{name} ({pcfg.output})", f"{name} -> {pcfg.output}"), work)


def prepare_levels(cfg: PipelineConfig, levels: tuple[Any, ...], shards: str, name: str, parent: Any,
                   log_prefix: str, root: Location) -> PipelineConfig:
    """`cfg` pointing at `shards`, which `lofi prepare` fills (or a record reuses) with the TAL
    videos at cfg's levels plus `levels` (FidelityLevels): how a caller that needs more levels than
    the config's schedule (a sweep's trials) gets them without wiring prepare itself."""
    target = replace(cfg, [("data.shards", shards)])
    pcfg = prepare_configs(target, extra_levels=levels)["prepare"]
    run_prepare(name, pcfg, parent, PipelineOptions(log_prefix=log_prefix), root)
    return target


def run_stage1(cfg: PipelineConfig, opts: PipelineOptions, parent_run_id: str | None,
               prepared: dict[str, Stage]) -> tuple[Stage | None, Stage, str]:
    """Stage 1 unless a checkpoint is the starting point: (its stage or None, the stage every
    branch starts after, the starting encoder's path)."""
    root = cfg.run.location()
    upstream_key = "+".join(s.key for s in prepared.values())
    data_stage = Stage(StageResult("prepare", "", {}, 0.0), upstream_key, 0.0,
                       reused=all(s.reused for s in prepared.values()))
    if cfg.encoder.checkpoint and not cfg.data.pretrain_shards:
        return None, data_stage, cfg.encoder.checkpoint
    stage1 = run_stage("pretrain", replace(cfg, [("run.storage", str(root)), ("run.name", "stage1")]), data_stage,
                       parent_run_id, opts, root)
    return stage1, stage1, stage1.result.artifacts["encoder"]


def run_upstream(cfg: PipelineConfig, opts: PipelineOptions, parent: Any) -> tuple[PipelineConfig, Stage | None]:
    """Inputs checked, data prepared and stage 1 run (each reused when unchanged): the config every
    branch (or a sweep's trial) starts from, with data.shards and encoder.checkpoint set, and stage 1."""
    cfg = resolve_paths(cfg)
    check_inputs(cfg)
    prepared = {name: run_prepare(name, pcfg, parent, opts, cfg.run.location())
                for name, pcfg in prepare_configs(cfg).items()}
    stage1, _, encoder = run_stage1(cfg, opts, parent.run_id, prepared)
    return replace(cfg, [("encoder.checkpoint", encoder)]), stage1


def run_branches(cfg: PipelineConfig, opts: PipelineOptions, parent_run_id: str | None,
                 prepared: dict[str, Stage]) -> tuple[Stage | None, dict[str, dict[str, Stage]]]:
    """Stage 1 (unless a checkpoint is the starting point), then each branch from that encoder."""
    root = cfg.run.location()
    at_root = [("run.storage", str(root))]
    stage1, start, encoder = run_stage1(cfg, opts, parent_run_id, prepared)
    branches: dict[str, dict[str, Stage]] = {}
    for name in opts.branches(cfg):
        branch_cfg = replace(cfg, [*at_root, ("run.name", name), ("encoder.checkpoint", encoder)])
        branches[name] = {"pretrain": stage1} if stage1 else {}
        upstream = start
        if BRANCHES[name] is not None:
            upstream = branches[name]["train"] = run_stage("train", stage2_config(branch_cfg, name),
                                                           start, parent_run_id, opts, root)
            branch_cfg = replace(branch_cfg, [("encoder.checkpoint", upstream.result.artifacts["encoder"])])
        for stage in ("extract", "train_head", "detect"):
            upstream = branches[name][stage] = run_stage(stage, branch_cfg, upstream, parent_run_id, opts, root)
    return stage1, branches


# 3. the job ----------------------------------------------------------------------------------

def run(cfg: PipelineConfig, opts: PipelineOptions, parent: Any = None,
        data_seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """The whole pipeline; returns the report (also written to `<run>/report.json`).

    `parent`: an open MLflow parent run (pipelines.tracking.Tracker) to log into; without one
    the pipeline opens its own, named `run.name`."""
    from pipelines.tracking import Tracker

    if parent is None:
        with Tracker.start(cfg.tracking, cfg.run.name, tags={"stage": "pipeline"}) as own:
            own.log_config(cfg)
            return run(cfg, opts, own, data_seconds)
    start = time.perf_counter()
    cfg = resolve_paths(cfg)
    check_inputs(cfg)
    root = cfg.run.location()
    seconds = dict(data_seconds or {})
    prepared = {}
    for name, pcfg in prepare_configs(cfg, opts.extra_levels(cfg)).items():
        prepared[name] = run_prepare(name, pcfg, parent, opts, root)
        seconds[name] = prepared[name].seconds
    stage1, branches = run_branches(cfg, opts, parent.run_id, prepared)
    return finish(cfg, opts, parent, stage1, branches, seconds, time.perf_counter() - start)


def finish(cfg: PipelineConfig, opts: PipelineOptions, parent: Any, stage1: Stage | None,
           branches: dict[str, dict[str, Stage]], data_seconds: dict[str, float], seconds: float) -> dict[str, Any]:
    from pipelines.stages.report import build_report, log_report, table_lines
    from pipelines.tracking import mlflow_ui_command

    report = build_report(cfg, branches, stage1, data_seconds, seconds)
    report.update({"out_dir": str(cfg.run.location()),
                   "mlflow": {"parent_run_id": parent.run_id, "experiment": cfg.tracking.experiment,
                              "ui": mlflow_ui_command(cfg.tracking)}})
    path = cfg.run.location() / "report.json"
    path.write_json(report)
    log_report(parent, report)
    print("\n".join(["", f"{opts.log_prefix}: done in {seconds:.0f} s", *table_lines(report), "",
                     f"MLflow: parent run {parent.run_id} in experiment {cfg.tracking.experiment!r} (stages are its "
                     "child runs); browse with:", f"  {report['mlflow']['ui']}",
                     f"report: {path}; stage outputs under {cfg.run.location()}/"
                     f"{{{','.join((['stage1'] if stage1 else []) + list(branches))}}}/"]), flush=True)
    return report


def log_path(cfg: PipelineConfig) -> Path:
    """`<run>/lofi.log` for Ray's and MLflow's own messages; with an object-store run folder, ./lofi-<name>.log."""
    run = cfg.run.location()
    return Path(run.uri) / "lofi.log" if run.is_local else Path(f"lofi-{cfg.run.name}.log").resolve()
