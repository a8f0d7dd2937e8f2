"""`lofi detect`: the trained head on the validation features -> ActivityNet predictions -> mAP.

Steps: the head (`head` config section, weights from `<run>/head/model.pt`) runs on the
features of `data.val_subset` (`<run>/features/`, written by `lofi extract`);
`lofi.heads.common.decode_detections` turns its maps into scored (segment, class) candidates;
class-aware Gaussian Soft-NMS (`detect.soft_nms_sigma`) keeps the best `detect.top_k` per
video (lofi/postprocess.py); the result is `<run>/detect/predictions.json` in ActivityNet
format. It is then scored with lofi.evaluation against the ground truth (`data.annotations`,
else the annotation file the shards were prepared from) at the `detect.protocol` thresholds,
and the score is written as `<run>/detect/eval.json`: the object `lofi eval --json` prints,
so `lofi eval --ground-truth GT --predictions <run>/detect/predictions.json` rescores it.

Test-server submissions: `detect.subset` picks another subset (outputs under `<run>/detect/<subset>/`).
When none of its videos carries a segment (ActivityNet's "testing"), nothing is scored and
`predictions.json` is the submission file. Its `external_data` comes from the features manifest's
encoder origin (pipelines/stages/provenance.py): `used` is true when the encoder started from weights not
written by a lofi stage (e.g. Kinetics) or stage 1 trained on a clip set of its own.

Fixed-stride features (THUMOS14-style long videos; `predict_windows`): the head, built for
`data.window_snippets` snippets, runs on each video's overlapping windows (`data.window_overlap`,
the last one aligned to the end); each window's detections are shifted to video time, those in
padding dropped, and a video's windows merged by one class-aware Soft-NMS (pipelines/data/feature_windows.py,
lofi/windows.py).
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lofi.errors import LofiError
from lofi.postprocess import detection_entries
from pipelines.config import PipelineConfig, StageResult
from pipelines.data.feature_windows import (plan_windows, stride_sec, uses_windows, video_entries, window_features,
                                       window_problems)
from pipelines.data.features import features_array, read_features, read_features_manifest, video_features
from pipelines.data.manifests import FeaturesManifest
from pipelines.stages.provenance import external_data
from pipelines.storage import Location

_BATCH_VIDEOS = 16  # videos per head forward: the (B, D, T) maps stay small on any device
_TIMELINE_VIDEOS = 3  # detection timelines logged to MLflow


def detect_subset(cfg: PipelineConfig) -> str:
    return cfg.detect.subset or cfg.data.val_subset


def detect_dir(cfg: PipelineConfig) -> Location:
    """`<run>/detect/` for the validation subset, `<run>/detect/<subset>/` for another (`detect.subset`)."""
    other = cfg.detect.subset if cfg.detect.subset and cfg.detect.subset != cfg.data.val_subset else ""
    return cfg.run.detections(other)


def has_ground_truth(table) -> bool:
    """Whether any video of the table carries a segment: a subset without any (a test server's) is not scored."""
    import pyarrow.compute as pc

    return table.num_rows > 0 and pc.sum(pc.list_value_length(table.column("segment_label"))).as_py() > 0


def head_path(cfg: PipelineConfig) -> Location:
    return cfg.run.head() / "model.pt"


def load_head(cfg: PipelineConfig, feature_dim: int, num_snippets: int, num_classes: int):
    """The configured head with the weights `lofi train-head` saved."""
    import torch

    from lofi.heads import build_head

    path = head_path(cfg)
    if not path.is_file():
        raise LofiError(f"{path} does not exist: run `lofi train-head` with the same run.name and run.storage first")
    state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "head"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    head = build_head(cfg.head, feature_dim, num_snippets, num_classes)
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise LofiError(f"{path} does not fit head {cfg.head.name} (D={feature_dim}, T={num_snippets}, "
                        f"K={num_classes}): {str(err).splitlines()[0]}; use the head section the head was trained "
                        "with") from None
    return head.eval()


def predict(head, table, labels: list[str], cfg: PipelineConfig) -> dict[str, list[dict[str, Any]]]:
    """{video_id: ActivityNet entries} for the videos of `table` (best first, Soft-NMS applied)."""
    import torch

    feats = features_array(table)  # (N, T, D)
    ids = table.column("video_id").to_pylist()
    durations = table.column("duration_sec").to_pylist()
    results: dict[str, list[dict[str, Any]]] = {}
    for lo in range(0, len(ids), _BATCH_VIDEOS):
        batch = torch.from_numpy(feats[lo:lo + _BATCH_VIDEOS].copy()).transpose(1, 2)  # (B, T, D) -> (B, D, T)
        with torch.inference_mode():
            out = head(batch)
        results.update(detection_entries(out, ids[lo:lo + _BATCH_VIDEOS], durations[lo:lo + _BATCH_VIDEOS],
                                         labels, cfg.head.top_k_classes, cfg.detect.top_k, cfg.detect.soft_nms_sigma))
    return results


def predict_windows(head, table, labels: list[str], cfg: PipelineConfig,
                    manifest: FeaturesManifest) -> dict[str, list[dict[str, Any]]]:
    """{video_id: ActivityNet entries} for the videos of a fixed-stride `table`: the head on every
    window of data.window_snippets snippets, the windows of a video merged (best first, Soft-NMS)."""
    import torch

    from lofi.heads.common import decode_detections

    feats = video_features(table)  # video_id -> (T_i, D), padding dropped
    durations = dict(zip(table.column("video_id").to_pylist(), table.column("duration_sec").to_pylist()))
    width, stride = cfg.data.window_snippets, stride_sec(manifest)
    windows = list(plan_windows(durations, cfg.data, stride).values())
    window_dets = []
    for lo in range(0, len(windows), _BATCH_VIDEOS):
        part = windows[lo:lo + _BATCH_VIDEOS]
        batch = np.stack([window_features(w.video_id, feats[w.video_id], w.start, width) for w in part])  # (B, W, D)
        with torch.inference_mode():
            out = head(torch.from_numpy(batch).transpose(1, 2))  # (B, W, D) -> (B, D, W)
        window_dets += zip(part, decode_detections(out, [width * stride] * len(part), cfg.head.top_k_classes))
    return video_entries(window_dets, durations, labels, cfg.detect)


def ground_truth_path(cfg: PipelineConfig, manifest: FeaturesManifest) -> str:
    path = cfg.data.annotations or manifest.annotations or ""
    if not path or not Path(path).is_file():
        raise LofiError(f"ground truth {path or '(none)'} not found: set data.annotations to the annotation file")
    return path


def tuning_ids(manifest: FeaturesManifest) -> tuple[str, ...]:
    """The tuning split's videos of the shards the features came from (lofi.splits): the ground truth file
    still calls them training videos."""
    from pipelines.data import shards

    if not manifest.shards:
        return ()
    tuning = shards.read_manifest(manifest.shards).tuning
    return tuning.video_ids if tuning is not None else ()


def evaluate(cfg: PipelineConfig, gt: str, predictions: Location,
             tuning: tuple[str, ...] = ()) -> tuple[dict[str, Any], tuple[str, ...]]:
    from lofi.annotations import quiet_annotation_log
    from lofi.evaluation import EvalConfig, run_eval

    with quiet_annotation_log(), predictions.as_local_file() as path:
        return run_eval(EvalConfig(ground_truth=gt, predictions=str(path), subset=detect_subset(cfg),
                                   protocol=cfg.detect.protocol), tuning_ids=tuning)


def score(cfg: PipelineConfig, gt: str | None, predictions_path: Location, tracker,
          manifest: FeaturesManifest) -> tuple[dict[str, Any], dict[str, float], tuple[str, ...]]:
    """(eval.json's object or {} without ground truth, mAP metrics, warnings); eval.json written beside the predictions."""
    if gt is None:
        return {}, {}, ()
    result, warnings = evaluate(cfg, gt, predictions_path, tuning_ids(manifest))
    (detect_dir(cfg) / "eval.json").write_text(json.dumps(result))
    tracker.log_bytes(json.dumps(result).encode(), "eval.json")
    metrics = {"average_mAP": result["average_mAP"],
               **{f"mAP_tIoU_{t:.2f}": m for t, m in zip(result["tiou_thresholds"], result["mAP"])}}
    return result, metrics, warnings


def _log_timelines(tracker, table, results: dict[str, list[dict[str, Any]]]) -> None:
    """Ground truth vs the top predictions of a few validation videos, as figures in MLflow."""
    try:
        from pipelines import plots
    except ImportError:
        return
    for row in table.select(["video_id", "duration_sec", "segment_start_sec", "segment_end_sec",
                             "segment_label"]).to_pylist()[:_TIMELINE_VIDEOS]:
        gt = list(zip(row["segment_start_sec"], row["segment_end_sec"], row["segment_label"]))
        preds = [(e["segment"][0], e["segment"][1], e.get("label", ""), e["score"]) for e in results[row["video_id"]]]
        fig = plots.detection_timeline(row["video_id"], row["duration_sec"], gt, preds)
        tracker.log_figure(fig, f"timelines/{row['video_id']}.png")


# The config sections this stage's output depends on: `lofi pipeline` reruns it when one changes.
CONFIG_SECTIONS = ("data", "head", "detect")


def run(cfg: PipelineConfig, parent_run_id: str | None = None, verbose: bool = True) -> StageResult:
    """Write `predictions.json` (and `eval.json` when the subset has ground truth) under `detect_dir`;
    return the mAP figures (none for a subset without ground truth: a test-server submission)."""
    from pipelines.tracking import Tracker

    start = time.perf_counter()
    fdir = cfg.run.features()
    manifest = read_features_manifest(fdir)
    problems = window_problems(cfg.data, manifest, fdir)
    if problems:
        raise LofiError("; ".join(problems))
    windows = uses_windows(manifest)  # fixed-stride features: the head runs on windows of W snippets
    table = read_features(fdir, detect_subset(cfg))
    gt = ground_truth_path(cfg, manifest) if has_ground_truth(table) else None
    num_snippets = cfg.data.window_snippets if windows else manifest.num_snippets
    head = load_head(cfg, manifest.feature_dim, num_snippets, len(manifest.labels))
    out_dir = detect_dir(cfg)
    with Tracker.start(cfg.tracking, f"{cfg.run.name}/detect", parent_run_id=parent_run_id,
                       tags={"stage": "detect"}) as tracker:
        tracker.log_config(cfg)
        results = (predict_windows(head, table, list(manifest.labels), cfg, manifest) if windows else
                   predict(head, table, list(manifest.labels), cfg))
        predictions_path = out_dir / "predictions.json"
        predictions = json.dumps({"version": "VERSION 1.3", "external_data": external_data(manifest),
                                  "results": results}).encode()
        predictions_path.write_bytes(predictions)
        tracker.log_bytes(predictions, "predictions.json")
        result, scores, warnings = score(cfg, gt, predictions_path, tracker, manifest)
        seconds = time.perf_counter() - start
        metrics = {**scores, "seconds": seconds, "videos": float(table.num_rows)}
        tracker.log_metrics(metrics, step=0)
        if gt is not None:
            _log_timelines(tracker, table, results)
        run_id = tracker.run_id
    for line in warnings:
        print(f"lofi detect: warning: {line}", file=sys.stderr)
    if verbose:
        print("\n".join(summary_lines(cfg, result, results, predictions_path, seconds)), flush=True)
    artifacts = {"predictions": str(predictions_path), **({"eval": str(out_dir / "eval.json")} if result else {})}
    return StageResult(stage="detect", out_dir=str(out_dir), metrics=metrics, seconds=seconds, mlflow_run_id=run_id,
                       artifacts=artifacts)


def summary_lines(cfg: PipelineConfig, result: dict[str, Any], results: dict[str, list], predictions: Location,
                  seconds: float) -> list[str]:
    head = (f"lofi detect: {len(results)} {detect_subset(cfg)} videos, {sum(map(len, results.values()))} "
            f"detections")
    if not result:
        return [f"{head}, no ground truth in this subset: not scored ({seconds:.1f} s)",
                f"  wrote {predictions} (ActivityNet submission format: version, external_data, results)"]
    mAPs = "  ".join(f"{t:.2f}: {100 * m:.2f}%" for t, m in zip(result["tiou_thresholds"], result["mAP"]))
    return [f"{head}, average mAP {100 * result['average_mAP']:.2f}% ({seconds:.1f} s)",
            f"  mAP at tIoU  {mAPs}",
            f"  wrote {predictions} and {detect_dir(cfg) / 'eval.json'}"]
