"""`lofi sweep`: fidelity (and any other config) sweeps of stage 2 on Ray Tune, reviewed in MLflow.

Phases:
    1. upstream  the pipeline's data preparation and stage 1 for the base config
                 (`pipelines.stages.pipeline.run_upstream`: reused when the pipeline already ran them)
    2. plan      every trial's overrides drawn up front (tuning/space.py); each one's activation
                 memory per training step from the memory planner (`lofi.memory_plan`, the figure stage 2 logs); a trial
                 over `search.budget_gb` is not launched and is recorded with its figure, as is
                 one equivalent to an earlier trial (it differs only in levels it does not use)
    3. data      levels the trials need that the shards lack (e.g. s_lofi at other sizes) are
                 prepared into `<sweep>/prepared` beside the base levels (one decode per video)
    4. tune      one Tune trial per launched point: a function trainable that runs `lofi train`
                 (`pipelines.stages.train.run`, a Ray Train V2 TorchTrainer with its own ScalingConfig)
                 and forwards each epoch's report to Tune (TuneReportCallback); ASHA stops
                 trials that fall behind on `search.metric` (default val_average_mAP, the stage-2
                 model's own validation mAP at full fidelity); as many at once as the cluster holds
    5. results   a table sorted by the metric (printed, results.csv), the Pareto plots and the
                 best trial's config as a pipeline YAML (`lofi train --config best_config.yaml`)

Layout of `<sweep.storage>/<sweep.name>/`: `trials.json` (the plan), `prepared/` (phase 3),
`tune/` (Tune's state: `lofi sweep --resume` restores it), `trials/<trial>/` (each trial's
`lofi train` outputs and checkpoints), `results.csv`, `pareto.png`, `best_config.yaml`,
`records/` (reuse of phase 3). MLflow: one parent run `sweep/<name>`; each trial's stage-2 run
is its child (per-epoch metrics live from the training loop; tags `lofi.trial`,
`lofi.trial_status`); the parent holds the table, plots and best config.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from lofi.config import from_dict, replace, to_dict
from lofi.errors import LofiError
from lofi.fidelity import FidelityLevel, FidelitySchedule
from pipelines.config import PipelineConfig
from pipelines.storage import location
from tuning import results
from tuning.config import SweepConfig
from tuning.space import parse_space, sample_points

PLAN_FILE = "trials.json"
PARENT_FILE = "mlflow_parent.json"  # the sweep's MLflow parent run, for a resumed sweep to adopt its trials
LOG = "lofi sweep"


# 2. plan -------------------------------------------------------------------------------------

def check_keys(base: PipelineConfig, space: dict[str, Any]) -> list[Any]:
    """The parsed space; every key must be a config key that takes its values (errors name the key)."""
    params = parse_space(space)
    problems = []
    for param in params:
        for value in param.values:  # grid/choice values, or a range's two ends
            try:
                replace(base, [(param.key, value)])
            except LofiError as err:
                problems.append(f"space.{param.key} = {value!r}: {err}")
                break
    if problems:
        raise LofiError(f"{LOG}: {len(problems)} bad search key(s):\n  - " + "\n  - ".join(problems))
    return params


def used_levels(cfg: PipelineConfig) -> tuple[FidelityLevel, ...]:
    """The levels a trial reads: its schedule's and the full level (validation, the head's grid)."""
    levels = {lv.name: lv for lv in FidelitySchedule(cfg.fidelity).levels()}
    full = cfg.head_level()
    levels.setdefault(full.name, full)
    return tuple(levels.values())


def effective_key(cfg: PipelineConfig) -> str:
    """What a trial trains, whatever its name: overrides of levels it never reads do not count."""
    plain = to_dict(cfg)
    plain.pop("run")
    used = {lv.name for lv in used_levels(cfg)}
    plain["fidelity"]["overrides"] = {k: v for k, v in plain["fidelity"]["overrides"].items() if k in used}
    return json.dumps(plain, sort_keys=True, default=str)


def plan_trials(scfg: SweepConfig, base: PipelineConfig) -> list[dict[str, Any]]:
    """Every point with its name, overrides, activation memory and whether it is launched."""
    from pipelines.data import shards
    from lofi.memory_plan import saved_bytes_by_level

    params = check_keys(base, scfg.space)
    points = sample_points(params, scfg.search.num_samples, scfg.search.seed)
    num_classes = len(shards.read_manifest(base.data.shards).labels)
    budget = scfg.search.budget_bytes()
    trials, seen = [], {}
    width = max(2, len(str(len(points) - 1)))
    for i, overrides in enumerate(points):
        name = f"trial-{i:0{width}d}"
        cfg = scfg.trial_config(base, overrides, name)
        levels = FidelitySchedule(cfg.fidelity).levels()
        head_t = cfg.head_level().num_snippets
        memory = saved_bytes_by_level(cfg.stage2_encoder(), cfg.head, levels, num_classes,
                                      cfg.train.per_worker_batch(cfg.scaling.num_workers), head_snippets=head_t)
        peak = max(memory.values())
        status, note = "launched", ""
        key = effective_key(cfg)
        if peak > budget:
            status, note = "over_budget", (f"{peak / 2**30:.3f} GiB per step > search.budget_gb "
                                           f"{scfg.search.budget_gb:g}")
        elif key in seen:
            status, note = "duplicate", f"trains what {seen[key]} trains (overrides of unused levels differ)"
        else:
            seen[key] = name
        trials.append({"trial": name, "overrides": overrides, "activation_memory_bytes": peak,
                       "memory_by_level": memory, "status": status, "note": note})
    return trials


def check_score_subset(scfg: SweepConfig, base: PipelineConfig) -> None:
    """Before any work: trials scored on the tuning split need one, from prepare.tuning_fraction (the pipeline
    prepares the videos) or in the given shards' manifest."""
    from pipelines.data import shards

    if scfg.search.score_subset != "tuning":
        return
    if base.data.videos:
        has_split = base.prepare.tuning_fraction > 0
    else:
        has_split = bool(base.data.shards) and shards.read_manifest(base.data.shards).tuning is not None
    if not has_split:
        raise LofiError(f"{LOG}: search.score_subset is tuning, but the trials' data holds no tuning split: set "
                        "prepare.tuning_fraction (e.g. 0.2) in the pipeline config (or its sweep `set`) so that "
                        "trials are scored on training videos held out from their training, or set "
                        "search.score_subset: validation to choose on the validation videos")


def load_or_plan(scfg: SweepConfig, base: PipelineConfig, resume: bool) -> list[dict[str, Any]]:
    """The plan of this sweep: written once; a resumed sweep runs the same trials."""
    path = scfg.dir() / PLAN_FILE
    identity = {"space": scfg.space, "search": to_dict(scfg.search), "base": effective_key(base)}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["identity"] == json.loads(json.dumps(identity, default=str)):
            return saved["trials"]
        if resume:
            raise LofiError(f"{LOG}: {path} was planned from another space, search section or pipeline config; "
                            f"--resume continues only the same sweep (choose another sweep name for this one)")
    trials = plan_trials(scfg, base)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"identity": identity, "trials": trials}, indent=1, default=str))
    return trials


# 3. data -------------------------------------------------------------------------------------

def ensure_levels(scfg: SweepConfig, base: PipelineConfig, trials: list[dict[str, Any]], parent: Any) -> PipelineConfig:
    """The base config pointing at shards that hold every level a launched trial reads."""
    from pipelines.stages import pipeline
    from pipelines.data import shards

    manifest = shards.read_manifest(base.data.shards)
    present = {shards.grid_level(e).frames_key for e in manifest.levels if e.num_snippets is not None}
    missing: dict[tuple[int, int, int, int], FidelityLevel] = {}
    for trial in trials:
        if trial["status"] != "launched":
            continue
        for level in used_levels(scfg.trial_config(base, trial["overrides"], trial["trial"])):
            shape = level.frames_key
            if shape not in present and shape not in missing:
                grid = f"g{level.frame_grid}" if level.frame_grid != level.num_snippets else ""
                missing[shape] = dataclasses.replace(
                    level, name=f"{level.name}-t{shape[0]}f{shape[1]}s{shape[2]}{grid}")
    if not missing:
        return base
    if not base.data.videos:
        names = ", ".join(lv.name for lv in missing.values())
        raise LofiError(f"{LOG}: the trials read levels {names} that {base.data.shards} lacks, and data.videos is "
                        "empty, so they cannot be prepared; set data.videos (and data.annotations) in the pipeline "
                        "config or its `set`, or prepare those levels into data.shards")
    return pipeline.prepare_levels(base, tuple(missing.values()), str(scfg.dir() / "prepared"), "sweep_prepare",
                                   parent, LOG, location(str(scfg.dir()), "storage"))


# 4. tune -------------------------------------------------------------------------------------

def _trial(config: dict[str, Any], base: dict[str, Any], sweep: dict[str, Any], parent_run_id: str | None) -> None:
    """One Tune trial (a function trainable): `lofi train` at the trial's overrides, every epoch's
    report forwarded to Tune by Ray Train's TuneReportCallback (Ray's pattern for Train V2)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.stages import train

    point = config["point"]
    scfg = from_dict(SweepConfig, sweep)
    cfg = scfg.trial_config(from_dict(PipelineConfig, base), point["overrides"], point["trial"])
    train.run(cfg, parent_run_id=parent_run_id, callbacks=(TuneReportCallback(),))


def concurrency(scfg: SweepConfig, base: PipelineConfig, launched: int) -> int:
    """How many trials run at once: what the cluster's CPUs (and GPUs) hold at scaling.* per trial."""
    import ray

    resources = ray.cluster_resources()
    per_trial_cpu = base.scaling.num_workers * base.scaling.cpus_per_worker
    fits = int(resources.get("CPU", 1) // per_trial_cpu) if per_trial_cpu else launched
    if base.scaling.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // base.scaling.num_workers))
    if fits < 1:
        raise LofiError(f"{LOG}: one trial needs {per_trial_cpu:g} CPUs{' and GPUs' if base.scaling.use_gpu else ''} "
                        f"(scaling.*), more than the cluster's {resources}; lower scaling.num_workers or "
                        "scaling.cpus_per_worker")
    limit = scfg.search.max_concurrent_trials or fits
    return max(1, min(fits, limit, launched))


def run_tune(scfg: SweepConfig, base: PipelineConfig, trials: list[dict[str, Any]], parent_run_id: str | None,
             resume: bool) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    launched = [{"trial": t["trial"], "overrides": t["overrides"]} for t in trials if t["status"] == "launched"]
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=to_dict(base), sweep=to_dict(scfg), parent_run_id=parent_run_id),
        # The trial function only drives: its TorchTrainer asks for the workers' resources. Tune refuses an
        # empty request and any CPU share here would leave a worker's whole CPU short: one byte of memory.
        {"memory": 1})
    path = scfg.dir() / "tune"
    if resume and tune.Tuner.can_restore(str(path)):
        print(f"{LOG}: resuming the Tune experiment in {path} (unfinished and errored trials run again)", flush=True)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, restart_errored=True)
        return tuner.fit()
    if resume and path.exists():  # killed before Tune saved its first state: nothing to restore
        shutil.rmtree(path)
    if path.exists():
        raise LofiError(f"{LOG}: {path} holds a Tune experiment of this sweep; continue it with --resume, or "
                        "choose another sweep name (--set name=...)")
    if scfg.search.scheduler == "asha":
        # max_t one past the last epoch: at max_t ASHA stops a trial, i.e. kills its actor, which at the
        # last epoch would cut off the trial's outputs and MLflow run end (the trial ends on its own instead)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=base.train.epochs + 1,
                                  grace_period=scfg.search.grace_period_epochs,
                                  reduction_factor=scfg.search.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    tuner = tune.Tuner(
        trainable, param_space={"point": tune.grid_search(launched)},
        tune_config=tune.TuneConfig(metric=scfg.search.metric, mode=scfg.search.mode, scheduler=scheduler,
                                    max_concurrent_trials=concurrency(scfg, base, len(launched)),
                                    # Without early stopping a trial's process can serve the next one, with torch,
                                    # Ray Train and MLflow imported: seconds per trial (bench/sweep_overhead.py).
                                    # Not with ASHA: an actor whose trial it stopped mid-run was measured to stall
                                    # its slot (the next trial there never ran).
                                    reuse_actors=scfg.search.scheduler == "none",
                                    trial_name_creator=lambda trial: trial.config["point"]["trial"],
                                    trial_dirname_creator=lambda trial: trial.config["point"]["trial"]),
        run_config=tune.RunConfig(name="tune", storage_path=str(scfg.dir()), verbose=1))
    return tuner.fit()


# the job -------------------------------------------------------------------------------------

def adopt_earlier_trials(scfg: SweepConfig, base: PipelineConfig, parent: Any) -> None:
    """A resumed sweep's parent run takes over the trial runs of the interrupted one (which the
    new run of the same name closed as KILLED), so one parent lists every trial; a trial run
    again then closes its own interrupted run the same way."""
    from pipelines.tracking.review import child_runs, tag_run

    record = scfg.dir() / PARENT_FILE
    if record.is_file() and parent.run_id:
        earlier = json.loads(record.read_text())["parent_run_id"]
        if earlier != parent.run_id:
            for run in child_runs(base.tracking, earlier).values():
                tag_run(base.tracking, run["run_id"], {"mlflow.parentRunId": parent.run_id})
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"parent_run_id": parent.run_id}))


PATH_KEYS = ("run.storage", "data.shards", "data.annotations", "data.videos", "data.pretrain_shards",
             "data.pretrain_annotations", "data.pretrain_videos", "encoder.checkpoint")


def absolute(scfg: SweepConfig, base: PipelineConfig) -> tuple[SweepConfig, PipelineConfig]:
    """Paths and the tracking URI made absolute: trials run in Tune's actors, in other folders."""
    from pipelines.tracking import resolve_tracking_uri

    plain = to_dict(base)
    changes: list[tuple[str, Any]] = [("tracking.tracking_uri", resolve_tracking_uri(base.tracking))]
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = plain[section][name]
        if value and "://" not in value:
            changes.append((key, str(Path(value).expanduser().resolve())))
    return dataclasses.replace(scfg, storage=str(scfg.dir().parent)), replace(base, changes)


def run(scfg: SweepConfig, resume: bool = False) -> dict[str, Any]:
    """The whole sweep; returns the summary (also `<sweep>/summary.json`)."""
    from pipelines.stages import pipeline
    from pipelines.cluster import connect_ray
    from pipelines.tracking import Tracker

    start = time.perf_counter()
    # absolute first: the pipeline's stage records hash these paths (the demo writes them absolute)
    scfg, base = absolute(scfg, scfg.base_config())
    check_keys(base, scfg.space)  # before any work
    check_score_subset(scfg, base)
    connect_ray(base.ray)
    phases: dict[str, float] = {}
    with Tracker.start(base.tracking, f"sweep/{scfg.name}", tags={"stage": "sweep"}) as parent:
        parent.log_config(scfg)
        adopt_earlier_trials(scfg, base, parent)
        base, _ = pipeline.run_upstream(base, pipeline.PipelineOptions(log_prefix=LOG), parent)
        phases["upstream"] = time.perf_counter() - start
        trials = load_or_plan(scfg, base, resume)
        phases["plan"] = time.perf_counter() - start - sum(phases.values())
        launched = sum(t["status"] == "launched" for t in trials)
        print(f"\n== {LOG}: {len(trials)} trial(s), {launched} launched; "
              + "; ".join(f"{t['trial']} {t['status']}: {t['note']}" for t in trials if t["status"] != "launched"),
              flush=True)
        if not launched:
            raise LofiError(f"{LOG}: no trial fits search.budget_gb={scfg.search.budget_gb:g}; raise it or "
                            "sample lower fidelity levels (see `lofi plan-memory`)")
        base = ensure_levels(scfg, base, trials, parent)
        phases["data"] = time.perf_counter() - start - sum(phases.values())
        grid = run_tune(scfg, base, trials, parent.run_id, resume)
        phases["tune"] = time.perf_counter() - start - sum(phases.values())
        summary = results.finish(scfg, base, trials, grid, parent, time.perf_counter() - start, phases)
    return summary
