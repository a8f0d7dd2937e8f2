"""What a pipeline run reports: mAP per branch, activation memory per training step, stage times.

`build_report` turns the branches' stage results (`pipelines.stages.pipeline.Stage`) into the report
(`report.json`): per branch (baseline, lofi, full_end_to_end) `tiou_thresholds`, `mAP`,
`average_mAP`, `activation_memory_bytes`, `stage_seconds`, `reused_stages`,
`num_validation_videos`, paths of predictions and eval, MLflow run ids; and at the top
`full_fidelity_activation_memory_bytes`, `memory` (per level), `stage1` (final accuracies),
`stage1_classes` (the clip classifier's classes: the per-class table marks the TAL classes stage 1
was not trained on), `data_seconds`, `total_seconds`. `table_lines` prints it; `log_report` puts it on the parent
MLflow run with the plot of average mAP against activation memory.
"""

from __future__ import annotations

from typing import Any

from pipelines.config import PipelineConfig
from pipelines.storage import location

# stage 1's final metrics that the report shows (held-out clips, TAL validation snippets)
STAGE1_KEYS = ("val_accuracy", "val_balanced_accuracy", "val_tal_accuracy", "val_tal_balanced_accuracy",
               "val_tal_background_top_share")
BRANCH_TITLES = {"baseline": "baseline (frozen)", "lofi": "LoFi (stage 2)", "full_end_to_end": "full end to end",
                 "t_lofi": "T-LoFi", "s_lofi": "S-LoFi", "st_lofi": "ST-LoFi", "c_lofi_long": "C-LoFi long",
                 "c_lofi_short": "C-LoFi short"}


def activation_memory(cfg: PipelineConfig, branches: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Saved-tensor bytes of one training step (per worker): head-only, LoFi, and full fidelity end to end.

    Head-only (baseline): the head's step on full-level features (the frozen encoder saves
    nothing). End to end: encoder + head at each level from lofi.memory_plan, the same figure
    stage 2 logs and a sweep filters on; LoFi uses stage 2's own figure when it reports one.
    """
    from lofi.fidelity import FidelitySchedule, resolve_level
    from lofi.memory_plan import head_step_memory, saved_bytes_by_level
    from pipelines.data.features import read_features_manifest

    manifest = read_features_manifest(next(iter(branches.values()))["extract"].result.out_dir)
    dim, num_classes = manifest.feature_dim, len(manifest.labels)
    full = cfg.head_level()
    head_batch = cfg.train_head.per_worker_batch(cfg.scaling.num_workers)
    head_only = head_step_memory(cfg.head, dim, full.num_snippets, num_classes, head_batch).saved_bytes
    levels = FidelitySchedule(cfg.fidelity).levels()
    names = [level.name for level in levels]
    if full.name not in names:  # full fidelity end to end, what LoFi is compared with
        levels = (*levels, resolve_level(full.name, cfg.fidelity.overrides))
    batch = cfg.train.per_worker_batch(cfg.scaling.num_workers)
    # as stage 2 trains: every level's features are resampled to the head's grid
    planned = saved_bytes_by_level(cfg.stage2_encoder(), cfg.head, levels, num_classes, batch,
                                   head_snippets=full.num_snippets)
    measured = {name: stages["train"].result.metrics.get("activation_memory_bytes")
                for name, stages in branches.items() if "train" in stages}
    lofi = measured.get("lofi")
    full_e2e = measured.get("full_end_to_end") or planned[full.name]
    others = {name: int(value) for name, value in measured.items() if value and name not in ("lofi", "full_end_to_end")}
    return {"baseline": head_only, "lofi": int(lofi) if lofi else max(planned[n] for n in names), **others,
            "full_end_to_end": int(full_e2e), "full_fidelity_end_to_end": int(full_e2e), "planned_per_level": planned,
            "lofi_source": "stage 2 measurement" if lofi else "lofi.memory_plan planner",
            "batch_per_worker": {"train": batch, "train_head": head_batch}}


def branch_report(stages: dict[str, Any], memory_bytes: int) -> dict[str, Any]:
    detect = stages["detect"].result
    scores = location(detect.artifacts["eval"], "detect output").read_json()
    per_class = {label: sum(aps) / len(aps) for label, aps in scores.get("per_class_ap", {}).items()}
    return {"tiou_thresholds": scores["tiou_thresholds"], "mAP": scores["mAP"], "average_mAP": scores["average_mAP"],
            "per_class_average_AP": per_class, "activation_memory_bytes": memory_bytes,
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
    for name, title in BRANCH_TITLES.items():
        if name not in report:
            continue
        b = report[name]
        times = ", ".join(f"{k} {v:.0f}" + ("*" if k in b["reused_stages"] else "") for k, v in b["stage_seconds"].items())
        lines.append(f"{title:<18}{100 * b['average_mAP']:8.2f}%{_at(b, 0.5):>9}{_at(b, 0.75):>9}{_at(b, 0.95):>9}"
                     f"{b['activation_memory_bytes'] / mib:10.1f} MiB   {times}")
    lines += per_class_lines(report)
    m = report["memory"]
    lines.append(f"activation memory: the tensors autograd saves in one training step ({m['batch_per_worker']['train']} "
                 f"videos per worker); baseline: the head's step (the frozen encoder saves nothing); LoFi: "
                 f"{m['lofi_source']}; full fidelity end to end: {report['full_fidelity_activation_memory_bytes'] / mib:.1f} MiB")
    stage1 = report.get("stage1", {})
    if stage1:
        lines.append("stage 1: " + ", ".join(f"{k} {v:.3f}" for k, v in stage1.items()))
    data = ", ".join(f"{k} {v:.0f} s" for k, v in report["data_seconds"].items())
    lines.append(f"data: {data}; total {report['total_seconds']:.0f} s" + ("; * = reused from an earlier run" if any(
        report[b]["reused_stages"] for b in BRANCH_TITLES if b in report) else ""))
    return lines


def per_class_lines(report: dict[str, Any]) -> list[str]:
    """Each class's AP (mean over the tIoU thresholds) per branch: where a gain comes from."""
    branches = [b for b in BRANCH_TITLES if b in report and report[b].get("per_class_average_AP")]
    if not branches:
        return []
    labels = list(report[branches[0]]["per_class_average_AP"])
    untaught = untaught_classes(labels, report.get("stage1_classes", []))
    width = max(9, *(len(label) + 2 for label in labels))
    names = [label[:width - 2] + ("*" if label in untaught else "") for label in labels]
    lines = ["AP per class (mean over tIoU):".ljust(18) + "".join(f"{name:>{width}}" for name in names)]
    for b in branches:
        aps = report[b]["per_class_average_AP"]
        lines.append(f"{BRANCH_TITLES[b]:<18}" + "".join(f"{100 * aps.get(label, 0.0):{width - 1}.2f}%" for label in labels))
    if untaught:
        lines.append("* a class stage 1 was not trained on (no clip class of that name): only end-to-end training "
                     "teaches the encoder it")
    return lines


def untaught_classes(labels: list[str], stage1_classes: list[str]) -> set[str]:
    """The TAL classes missing from stage 1's classes, when the two share names at all (else they are
    other vocabularies, e.g. Kinetics' and ActivityNet's, and nothing can be said by name)."""
    taught = set(stage1_classes)
    return {label for label in labels if label not in taught} if taught & set(labels) else set()


def stage1_class_names(stage1: Any | None) -> list[str]:
    """The clip classifier's class names (stage 1's classes.json), [] without a stage 1."""
    path = stage1.result.artifacts.get("classes") if stage1 is not None else None
    return list(location(path, "stage 1 output").read_json()["classes"]) if path else []


def build_report(cfg: PipelineConfig, branches: dict[str, dict[str, Any]], stage1: Any | None,
                 data_seconds: dict[str, float], total_seconds: float) -> dict[str, Any]:
    memory = activation_memory(cfg, branches)
    report: dict[str, Any] = {name: branch_report(branches[name], memory[name]) for name in branches}
    metrics = stage1.result.metrics if stage1 is not None else {}
    report.update({"full_fidelity_activation_memory_bytes": memory["full_fidelity_end_to_end"], "memory": memory,
                   "stage1": {k: metrics[k] for k in metrics if k in STAGE1_KEYS or k.startswith("val_tal_background_as_")},
                   "stage1_classes": stage1_class_names(stage1),
                   "data_seconds": {k: round(v, 2) for k, v in data_seconds.items()},
                   "total_seconds": round(total_seconds, 2)})
    return report


def log_report(parent: Any, report: dict[str, Any]) -> None:
    """The report on the parent MLflow run: headline metrics, report.json, mAP against memory."""
    from pipelines.plots import memory_vs_map

    branches = [b for b in BRANCH_TITLES if b in report]
    parent.log_metrics({f"{b}_{k}": report[b][k] for b in branches for k in ("average_mAP", "activation_memory_bytes")},
                       step=0)
    parent.log_metrics({f"stage1_{k}": v for k, v in report["stage1"].items()}, step=0)
    parent.log_dict(report, "report.json")  # the bytes of <run>/report.json, wherever run.storage is
    parent.log_figure(memory_vs_map([(BRANCH_TITLES[b], report[b]["activation_memory_bytes"], report[b]["average_mAP"])
                                     for b in branches]), "plots/memory_vs_map.png")
