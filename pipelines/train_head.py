"""`lofi train-head`: stage 3, the TAL head trained from scratch on extracted features.

Reads the feature shards `lofi extract` wrote under `<run>/features/` (pipelines/features.py:
one row per video, features (T, D) float32) as Ray Datasets, the `data.train_subset` videos
for training and the `data.val_subset` ones for validation. The features must lie on a fixed
grid (every video the same T, `fixed_grid` in the features manifest): the head is built for
that T and the features' D, with one class per label of the manifest.

Trained by the shared harness (pipelines/trainer.py) with the `train_head` section (AdamW,
lr 1e-3 by default); the loss of a batch is the mean of per-video head losses. Each epoch
reports the validation loss and the validation detection mAP: decoded detections
(`lofi.heads.common.decode_detections`) -> class-aware Soft-NMS (`lofi.postprocess.soft_nms`,
`detect.soft_nms_sigma`, `detect.top_k` per video) -> `lofi.evaluation.evaluate_detection`
at the `detect.protocol` tIoU thresholds.

Writes `<run>/head/model.pt` (the head's state dict, as `lofi.heads.build_head` names it) and
`model.json` (head config, num_snippets, feature_dim, num_classes, labels) to rebuild it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any, Iterator

import numpy as np
import torch.distributed as dist
from torch import nn

from lofi.config import add_config_arguments, config_from_args, to_dict
from lofi.errors import LofiError, cli_errors
from lofi.heads import build_head
from lofi.heads.common import decode_detections
from pipelines.batches import (VIDEO_INDEX, VideoLabel, add_video_index, batch_targets, index_videos, read_video_labels,
                               tal_batch_loss, video_seed)
from pipelines.cluster import connect_ray
from pipelines.config import PipelineConfig, StageResult
from pipelines.extract import features_location
from pipelines.features import feature_files, features_dataset, read_features, read_features_manifest
from pipelines.trainer import (StepOutput, WorkerContext, all_reduce, epoch_history, final_state, finish_stage, fit,
                               fits_in_memory, log_training, stage_tracker, table_dataset, torch_bytes, worker_loop,
                               write_outputs)

STAGE = "train_head"
LOSS_KEYS = ("boundary", "iou_cls", "iou_reg", "classes", "total")
FEATURE_COLUMNS = ("features", VIDEO_INDEX, "duration_sec")


def check_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """The features manifest, checked for what head training needs; all problems at once."""
    folder = features_location(cfg)
    manifest = read_features_manifest(folder)
    counts = manifest["counts"]["per_subset"]
    problems = []
    if not manifest.get("fixed_grid", True):
        problems.append(f"{folder}: features of level {manifest.get('level')!r} have a fixed stride (videos differ "
                        "in T); the head needs one grid: extract from a level with num_snippets (data.full_level)")
    if not counts.get(cfg.data.train_subset):
        problems.append(f"{folder}: no features of subset {cfg.data.train_subset!r} (subsets: {counts}); "
                        "set data.train_subset")
    elif counts[cfg.data.train_subset] < cfg.train_head.batch_size:
        problems.append(f"{folder}: {counts[cfg.data.train_subset]} training videos, fewer than "
                        f"train_head.batch_size={cfg.train_head.batch_size}; lower it")
    if not manifest.get("labels"):
        problems.append(f"{folder}/features_manifest.json: no class labels")
    if problems:
        raise LofiError(f"lofi train-head cannot start ({len(problems)} problem(s)):\n  - " + "\n  - ".join(problems))
    return manifest


def feature_rows(cfg: PipelineConfig, manifest: dict[str, Any], subset: str, index: dict[str, int]) -> Any:
    """Ray Dataset of one subset's features (B, T, D), video_index and duration_sec."""
    num_bytes = manifest["counts"]["per_subset"][subset] * manifest["num_snippets"] * manifest["feature_dim"] * 4
    if fits_in_memory(cfg, num_bytes):
        table = read_features(features_location(cfg), subset, columns=["video_id", "features", "duration_sec"])
        return table_dataset(add_video_index(table, index).select(list(FEATURE_COLUMNS)))
    ds = features_dataset(features_location(cfg), subset)
    ds = ds.map_batches(add_video_index, batch_format="pyarrow", fn_kwargs={"index": index})
    return ds.select_columns(list(FEATURE_COLUMNS))


class HeadLoop:
    name = STAGE
    samples = "videos"

    def __init__(self, config: dict[str, Any]) -> None:
        self.labels = {int(i): VideoLabel(**v) for i, v in config["labels"].items()}
        self.class_names = list(config["class_names"])
        self.num_snippets, self.feature_dim = int(config["num_snippets"]), int(config["feature_dim"])
        self.has_val = bool(config["has_val"])

    def build_model(self, ctx: WorkerContext) -> nn.Module:
        return build_head(ctx.cfg.head, self.feature_dim, self.num_snippets, len(self.class_names))

    def param_groups(self, model: nn.Module, optim: Any) -> list[dict[str, Any]]:
        return [{"params": list(model.parameters()), "name": "head"}]

    def epoch_batches(self, ctx: WorkerContext, epoch: int, global_batch: int) -> Iterator[Any]:
        return iter(ctx.batches("train", epoch, train=True))

    def _forward(self, ctx: WorkerContext, model: nn.Module, data: Any, epoch: int) -> tuple[Any, dict, list[int]]:
        indices = data[VIDEO_INDEX].tolist()
        targets = batch_targets(indices, self.labels, self.num_snippets, ctx.cfg.head, len(self.class_names))
        out = model(data["features"].transpose(1, 2))  # (B, T, D) -> (B, D, T)
        seeds = [video_seed(ctx.cfg.run.seed, epoch, i) for i in indices]
        return out, tal_batch_loss(ctx.cfg.head, out, targets.to(ctx.device), seeds), indices

    def step(self, ctx: WorkerContext, model: nn.Module, batch: Any, epoch: int) -> StepOutput:
        _, losses, indices = self._forward(ctx, model, batch, epoch)
        return StepOutput(losses, len(indices), 0)

    def validate(self, ctx: WorkerContext, model: nn.Module, epoch: int) -> dict[str, float]:
        if not self.has_val:
            return {}
        sums = {key: 0.0 for key in LOSS_KEYS} | {"videos": 0.0}
        rows: list[tuple[str, float, float, float, str]] = []
        for data in ctx.batches("val", epoch, train=False):
            # epoch -1: a fixed seed per video, so the validation loss moves only with the model
            out, losses, indices = self._forward(ctx, model, data, -1)
            for key in LOSS_KEYS:
                sums[key] += float(losses[key]) * len(indices)
            sums["videos"] += len(indices)
            rows += self._detections(ctx, out, indices)
        sums = all_reduce(sums, ctx.device)
        if not sums["videos"]:
            return {}
        metrics = {f"val_loss_{k}": sums[k] / sums["videos"] for k in LOSS_KEYS}
        return metrics | self._map(ctx, _gather(rows))

    def _detections(self, ctx: WorkerContext, out: Any, indices: list[int]) -> list[tuple]:
        from lofi.postprocess import soft_nms

        videos = [self.labels[i] for i in indices]
        rows = []
        decoded = decode_detections(out, [v.duration_sec for v in videos], ctx.cfg.head.top_k_classes)
        for video, det in zip(videos, decoded):
            segments, scores, keep = soft_nms(det["segments_sec"], det["scores"], sigma=ctx.cfg.detect.soft_nms_sigma,
                                              top_k=ctx.cfg.detect.top_k, labels=det["label_ids"])
            labels = det["label_ids"][keep]
            rows += [(video.video_id, float(s), float(e), float(p), self.class_names[int(k)])
                     for (s, e), p, k in zip(segments, scores, labels)]
        return rows

    def _map(self, ctx: WorkerContext, rows: list[tuple]) -> dict[str, float]:
        from lofi.annotations import AnnotationSet, Detections, LabelVocab, Segment, Video
        from lofi.evaluation import PROTOCOLS, evaluate_detection

        val = [v for v in self.labels.values() if v.subset == ctx.cfg.data.val_subset]
        if not any(v.segments_sec for v in val):
            return {}
        truth = AnnotationSet(tuple(Video(v.video_id, v.subset, v.duration_sec, segments=tuple(
            Segment(s, e, label) for (s, e), label in zip(v.segments_sec, v.labels))) for v in val),
            LabelVocab.from_names(self.class_names))
        columns = list(zip(*rows)) if rows else [[], [], [], [], []]
        detections = Detections(np.array(columns[0], dtype=object), np.array(columns[1], dtype=np.float64),
                                np.array(columns[2], dtype=np.float64), np.array(columns[3], dtype=np.float64),
                                np.array(columns[4], dtype=object))
        result = evaluate_detection(truth, detections, PROTOCOLS[ctx.cfg.detect.protocol])
        metrics = {"val_average_mAP": result.average_mAP}
        metrics |= {f"val_mAP_{t:.2f}": float(m) for t, m in zip(result.tiou_thresholds, result.mAP)}
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"num_snippets": self.num_snippets, "feature_dim": self.feature_dim}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["num_snippets"], state["feature_dim"]) != (self.num_snippets, self.feature_dim):
            raise LofiError(f"the head checkpoint was trained on features (T={state['num_snippets']}, "
                            f"D={state['feature_dim']}), the features are now (T={self.num_snippets}, "
                            f"D={self.feature_dim}); use a new run.name or re-extract")


def _gather(rows: list[tuple]) -> list[tuple]:
    """Every worker's detection rows, on every worker (their validation splits differ)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def _loop(config: dict[str, Any]) -> None:
    worker_loop(HeadLoop(config), config)


def run(cfg: PipelineConfig, parent_run_id: str | None = None) -> StageResult:
    """Stage 3: train the head on <run>/features; write <run>/head/model.pt."""
    start = time.perf_counter()
    manifest = check_inputs(cfg)
    index, by_index = index_videos(read_video_labels(feature_files(features_location(cfg))))
    has_val = bool(manifest["counts"]["per_subset"].get(cfg.data.val_subset))
    loop = {"labels": {i: dataclasses.asdict(v) for i, v in by_index.items()}, "class_names": manifest["labels"],
            "num_snippets": manifest["num_snippets"], "feature_dim": manifest["feature_dim"], "has_val": has_val}
    connect_ray(cfg.ray)
    out_dir = cfg.run.location() / "head"
    with stage_tracker(cfg, STAGE, parent_run_id) as tracker:
        tracker.log_config(cfg)
        datasets = {"train": feature_rows(cfg, manifest, cfg.data.train_subset, index)}
        if has_val:
            datasets["val"] = feature_rows(cfg, manifest, cfg.data.val_subset, index)
        result = fit(cfg, STAGE, _loop, loop, datasets, tracker=tracker)  # rank 0 logs epochs live
        state = final_state(result)
        history = epoch_history(result, state)
        log_training(tracker, history)
        model_config = {"head": to_dict(cfg.head), "num_snippets": manifest["num_snippets"],
                        "feature_dim": manifest["feature_dim"], "num_classes": len(manifest["labels"]),
                        "labels": manifest["labels"], "features": str(features_location(cfg))}
        artifacts = write_outputs(out_dir, {"model": ("model.pt", torch_bytes(state["model"])),
                                            "model_config": ("model.json", json.dumps(model_config, indent=1).encode())},
                                  tracker)
        run_id = tracker.run_id
    return finish_stage(cfg, STAGE, start, history, artifacts, out_dir, run_id)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofi train-head",
        description="Stage 3: train the TAL head from scratch on the features `lofi extract` wrote under "
                    "<run.storage>/<run.name>/features/, with Ray Train (DDP over scaling.num_workers workers, a "
                    "checkpoint every epoch, resume by run.name). Reports validation loss and detection mAP every "
                    "epoch. Writes <run.storage>/<run.name>/head/model.pt (head state dict) and model.json.",
        epilog="Config keys used (YAML or --set): run.name and run.storage (where the features are and the head "
               "goes), run.seed, run.max_failures, run.deterministic; data.train_subset, data.val_subset; head.* "
               "(name bmn|gtad, hidden, max_duration, loss weights, top_k_classes, ...); train_head.* (optimizer, lr, "
               "momentum, weight_decay, epochs, lr_step_epochs, lr_gamma, batch_size (global), grad_clip_norm, "
               "shuffle_buffer_rows); detect.soft_nms_sigma, detect.top_k, detect.protocol (anet|thumos: the mAP "
               "thresholds); scaling.num_workers, scaling.use_gpu, scaling.cpus_per_worker; tracking.*; "
               "ray.address, ray.num_cpus.")
    add_config_arguments(parser)
    return parser


@cli_errors("train-head")
def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(PipelineConfig, build_parser().parse_args(argv))
    run(cfg)
    return 0
