"""`lofi train-head`: stage 3, the TAL head trained from scratch on extracted features.

Reads the feature shards `lofi extract` wrote under `<run>/features/` (pipelines/data/features.py:
one row per video, features (T, D) float32) as Ray Datasets, the `data.train_subset` videos
for training and the `data.val_subset` ones for validation. On a fixed grid (every video the same
T, `fixed_grid` in the features manifest) the head is built for that T and the features' D, with
one class per label of the manifest. Fixed-stride features (every video its own T, e.g. THUMOS14)
are cut into windows of `data.window_snippets` snippets, which the head's grid is then built for
and which stand in for the videos in training and in the validation loss; the validation mAP
scores each video's window detections merged back into video time (pipelines/data/feature_windows.py).

Trained by the shared harness (pipelines/trainer/) with the `train_head` section (AdamW,
lr 1e-3 by default); the loss of a batch is the mean of per-video head losses. Each epoch
reports the validation loss and the validation detection mAP: decoded detections
(`lofi.heads.common.decode_detections`) -> class-aware Soft-NMS (`lofi.postprocess.soft_nms`,
`detect.soft_nms_sigma`, `detect.top_k` per video) -> `lofi.evaluation.evaluate_detection`
at the `detect.protocol` tIoU thresholds.

Writes `<run>/head/model.pt` (the head's state dict, as `lofi.heads.build_head` names it) and
`model.json` (head config, num_snippets, feature_dim, num_classes, labels, and the windows: W,
overlap, stride, or null) to rebuild it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch.distributed as dist
from torch import nn

from lofi.config import to_dict
from lofi.errors import LofiError
from lofi.heads import build_head
from lofi.heads.common import decode_detections
from pipelines.data.batches import (VIDEO_INDEX, VideoLabel, add_video_index, batch_targets, index_videos, read_video_labels,
                               tal_batch_loss, video_seed)
from pipelines.cluster import connect_ray
from pipelines.config import PipelineConfig, StageResult
from pipelines.data.feature_windows import (WINDOW_COLUMNS, Window, cut_windows, plan_windows, stride_sec, training_windows,
                                       uses_windows, video_entries, window_labels, window_problems, windows_by_video)
from pipelines.data.features import feature_files, features_dataset, read_features, read_features_manifest
from pipelines.data.manifests import FeaturesManifest
from pipelines.trainer import (StepOutput, WorkerContext, all_reduce, epoch_history, final_state, finish_stage, fit,
                               fits_in_memory, log_training, stage_tracker, table_dataset, torch_bytes, worker_loop,
                               write_outputs)

STAGE = "train_head"
LOSS_KEYS = ("boundary", "iou_cls", "iou_reg", "classes", "total")
FEATURE_COLUMNS = ("features", VIDEO_INDEX, "duration_sec")


def check_inputs(cfg: PipelineConfig) -> FeaturesManifest:
    """The features manifest, checked for what head training needs; all problems at once."""
    folder = cfg.run.features()
    manifest = read_features_manifest(folder)
    counts = manifest.counts.per_subset
    problems = window_problems(cfg.data, manifest, folder)
    if not counts.get(cfg.data.train_subset):
        problems.append(f"{folder}: no features of subset {cfg.data.train_subset!r} (subsets: {counts}); "
                        "set data.train_subset")
    elif not uses_windows(manifest) and counts[cfg.data.train_subset] < cfg.train_head.batch_size:
        problems.append(f"{folder}: {counts[cfg.data.train_subset]} training videos, fewer than "
                        f"train_head.batch_size={cfg.train_head.batch_size}; lower it")
    if not manifest.labels:
        problems.append(f"{folder}/features_manifest.json: no class labels")
    if problems:
        raise LofiError(f"lofi train-head cannot start ({len(problems)} problem(s)):\n  - " + "\n  - ".join(problems))
    return manifest


def feature_rows(cfg: PipelineConfig, manifest: FeaturesManifest, subset: str, index: dict[str, int]) -> Any:
    """Ray Dataset of one subset's features (B, T, D), video_index and duration_sec."""
    num_bytes = manifest.counts.per_subset[subset] * manifest.num_snippets * manifest.feature_dim * 4
    if fits_in_memory(cfg, num_bytes):
        table = read_features(cfg.run.features(), subset, columns=["video_id", "features", "duration_sec"])
        return table_dataset(add_video_index(table, index).select(list(FEATURE_COLUMNS)))
    ds = features_dataset(cfg.run.features(), subset)
    ds = ds.map_batches(add_video_index, batch_format="pyarrow", fn_kwargs={"index": index})
    return ds.select_columns(list(FEATURE_COLUMNS))


@dataclass(frozen=True)
class HeadLoopConfig:
    """What stage 3's workers need beyond the PipelineConfig; plain data across the Ray boundary.
    On fixed-stride features `labels` are the windows' (keyed by window index) and `videos` and
    `windows` hold the validation videos and windows; on grid features both are empty."""

    labels: dict[int, VideoLabel]
    class_names: tuple[str, ...]
    num_snippets: int  # the head's T: the grid's, or data.window_snippets
    feature_dim: int
    has_val: bool
    windowed: bool = False  # fixed-stride features: the rows are windows
    videos: tuple[VideoLabel, ...] = ()
    windows: dict[int, Window] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadLoopConfig":
        return cls({int(i): VideoLabel(**v) for i, v in d["labels"].items()}, tuple(d["class_names"]),
                   int(d["num_snippets"]), int(d["feature_dim"]), bool(d["has_val"]), bool(d["windowed"]),
                   tuple(VideoLabel(**v) for v in d["videos"]), {int(i): Window(**w) for i, w in d["windows"].items()})


class HeadLoop:
    name = STAGE
    samples = "videos"

    def __init__(self, config: HeadLoopConfig) -> None:
        self.labels = dict(config.labels)
        self.class_names = list(config.class_names)
        self.num_snippets, self.feature_dim = config.num_snippets, config.feature_dim
        self.has_val = config.has_val

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
        return self._score(ctx, rows, self.labels.values())

    def _score(self, ctx: WorkerContext, rows: list[tuple], videos: Iterable[VideoLabel]) -> dict[str, float]:
        """mAP of detection rows (video_id, start, end, score, class name) against the videos' ground truth."""
        from lofi.annotations import AnnotationSet, Detections, LabelVocab, Segment, Video
        from lofi.evaluation import PROTOCOLS, evaluate_detection

        val = [v for v in videos if v.subset == ctx.cfg.data.val_subset]
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


class WindowHeadLoop(HeadLoop):
    """Stage 3 on windows of fixed-stride features: `labels` are the windows' (keyed by window
    index, which the rows carry as video_index), so training and the validation loss are
    HeadLoop's; validation detections are merged per video and scored against the videos'."""

    def __init__(self, config: HeadLoopConfig) -> None:
        super().__init__(config)
        self.videos = list(config.videos)
        self.windows = dict(config.windows)

    def _detections(self, ctx: WorkerContext, out: Any, indices: list[int]) -> list[tuple]:
        decoded = decode_detections(out, [self.labels[i].duration_sec for i in indices], ctx.cfg.head.top_k_classes)
        return list(zip(indices, decoded))  # window-relative: merged per video once all workers' are gathered

    def _map(self, ctx: WorkerContext, rows: list[tuple]) -> dict[str, float]:
        durations = {v.video_id: v.duration_sec for v in self.videos}
        entries = video_entries([(self.windows[i], det) for i, det in rows], durations, self.class_names,
                                ctx.cfg.detect)
        flat = [(vid, e["segment"][0], e["segment"][1], e["score"], e["label"])
                for vid, video in entries.items() for e in video]
        return self._score(ctx, flat, self.videos)


def _gather(rows: list[tuple]) -> list[tuple]:
    """Every worker's detection rows, on every worker (their validation splits differ)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def _loop(config: dict[str, Any]) -> None:
    loop = HeadLoopConfig.from_dict(config["loop"])
    worker_loop(WindowHeadLoop(loop) if loop.windowed else HeadLoop(loop), config)


def window_rows(cfg: PipelineConfig, manifest: FeaturesManifest, subset: str,
                windows: dict[str, list[tuple[int, int]]]) -> Any:
    """Ray Dataset of one subset's planned windows (B, W, D), video_index (= window index) and duration_sec."""
    width, dim = cfg.data.window_snippets, manifest.feature_dim
    kwargs = {"windows": windows, "window_snippets": width, "window_sec": width * stride_sec(manifest)}
    num_windows = sum(map(len, windows.values()))
    num_bytes = (manifest.counts.per_subset[subset] * manifest.num_snippets + num_windows * width) * dim * 4
    if fits_in_memory(cfg, num_bytes):  # the subset's padded videos and their windows, both on the driver
        table = read_features(cfg.run.features(), subset, columns=["video_id", "num_snippets", "features"])
        return table_dataset(cut_windows(table, **kwargs))
    ds = features_dataset(cfg.run.features(), subset, columns=["video_id", "num_snippets", "features"])
    return ds.map_batches(cut_windows, batch_format="pyarrow", fn_kwargs=kwargs).select_columns(list(WINDOW_COLUMNS))


def plan_stage(cfg: PipelineConfig, manifest: FeaturesManifest, by_index: dict[int, VideoLabel],
               has_val: bool) -> tuple[HeadLoopConfig, dict[str, Any]]:
    """(loop config, dataset plan) of stage 3: whole videos on a grid, or windows of fixed-stride
    features. The plan maps dataset names to the windows (video_id -> [(window index, start)]) to cut,
    or to None for whole-video rows."""
    loop = HeadLoopConfig(dict(by_index), tuple(manifest.labels), manifest.num_snippets, manifest.feature_dim, has_val)
    subsets = {"train": cfg.data.train_subset} | ({"val": cfg.data.val_subset} if has_val else {})
    if not uses_windows(manifest):
        return loop, {name: None for name in subsets}
    stride, width = stride_sec(manifest), cfg.data.window_snippets
    windows = plan_windows({v.video_id: v.duration_sec for v in by_index.values()}, cfg.data, stride)
    labels = window_labels(windows, by_index, width, stride)
    chosen = {"train": training_windows(labels, cfg.data.train_subset, cfg.data.window_empty_fraction, cfg.run.seed)}
    if has_val:
        chosen["val"] = [i for i, w in labels.items() if w.subset == cfg.data.val_subset]
    if len(chosen["train"]) < cfg.train_head.batch_size:
        raise LofiError(f"{len(chosen['train'])} training windows of data.window_snippets={width} (those with ground "
                        f"truth and a data.window_empty_fraction={cfg.data.window_empty_fraction} of the others), "
                        f"fewer than train_head.batch_size={cfg.train_head.batch_size}; lower it")
    used = set(chosen["train"]) | set(chosen.get("val", []))
    loop = dataclasses.replace(
        loop, labels={i: labels[i] for i in sorted(used)}, num_snippets=width, windowed=True,
        videos=tuple(v for v in by_index.values() if v.subset == cfg.data.val_subset),
        windows={i: windows[i] for i in chosen.get("val", [])})
    return loop, {name: windows_by_video(windows, chosen[name]) for name in subsets}


def windows_record(cfg: PipelineConfig, manifest: FeaturesManifest, plan: dict[str, Any]) -> dict[str, Any] | None:
    """What model.json records of the windows the head was trained on (None: whole videos)."""
    if not uses_windows(manifest):
        return None
    return {"window_snippets": cfg.data.window_snippets, "window_overlap": cfg.data.window_overlap,
            "snippet_stride_sec": stride_sec(manifest),
            **{f"{name}_windows": sum(map(len, plan[name].values())) for name in plan}}


# The config sections this stage's output depends on: `lofi pipeline` reruns it when one changes.
CONFIG_SECTIONS = ("run.seed", "data", "head", "train_head", "scaling")


def run(cfg: PipelineConfig, parent_run_id: str | None = None) -> StageResult:
    """Stage 3: train the head on <run>/features; write <run>/head/model.pt."""
    start = time.perf_counter()
    manifest = check_inputs(cfg)
    index, by_index = index_videos(read_video_labels(feature_files(cfg.run.features())))
    has_val = bool(manifest.counts.per_subset.get(cfg.data.val_subset))
    loop, plan = plan_stage(cfg, manifest, by_index, has_val)
    connect_ray(cfg.ray)
    out_dir = cfg.run.head()
    with stage_tracker(cfg, STAGE, parent_run_id) as tracker:
        tracker.log_config(cfg)
        subsets = {"train": cfg.data.train_subset, "val": cfg.data.val_subset}
        datasets = {name: feature_rows(cfg, manifest, subsets[name], index) if windows is None else
                    window_rows(cfg, manifest, subsets[name], windows) for name, windows in plan.items()}
        result = fit(cfg, STAGE, _loop, loop, datasets, tracker=tracker)  # rank 0 logs epochs live
        state = final_state(result)
        history = epoch_history(result, state)
        log_training(tracker, history)
        model_config = {"head": to_dict(cfg.head), "num_snippets": loop.num_snippets,
                        "feature_dim": manifest.feature_dim, "num_classes": len(manifest.labels),
                        "labels": list(manifest.labels), "features": str(cfg.run.features()),
                        "windows": windows_record(cfg, manifest, plan)}
        artifacts = write_outputs(out_dir, {"model": ("model.pt", torch_bytes(state["model"])),
                                            "model_config": ("model.json", json.dumps(model_config, indent=1).encode())},
                                  tracker)
        run_id = tracker.run_id
    return finish_stage(cfg, STAGE, start, history, artifacts, out_dir, run_id)
