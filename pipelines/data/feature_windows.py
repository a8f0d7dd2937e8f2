"""Windows of fixed-stride features, for `lofi train-head` and `lofi detect` (the method: lofi/windows.py).

Features extracted from a fixed-stride level (`snippet_stride_sec`, `fixed_grid` false in the
features manifest) give every video its own T. The head runs on windows of
`data.window_snippets` (W) snippets instead of whole videos:

- the driver plans every video's windows (`plan_windows`): T follows from the video's duration
  and the stride exactly as `lofi prepare` computed it (lofi.sampling.num_stride_snippets), so the
  plan needs no feature read; each window gets a dense `window_index` (videos sorted by id,
  windows in time order) and a `VideoLabel` of its own (`window_labels`): W * stride_sec seconds
  long, its ground truth the video's clipped to it (`lofi.windows.window_ground_truth`). Training
  and validation then treat windows as the videos of a fixed grid of T = W: the harness,
  `batch_targets` and the loss are the whole-video ones, keyed by window_index;
- `training_windows`: every window holding ground truth, plus a seeded `data.window_empty_fraction`
  of the others (pure background windows would otherwise outnumber the actions in long videos);
- `cut_windows` (a map_batches function, also applied on the driver to a table read there) turns
  video rows into window rows: features (W, D) zero-padded, `video_index` = the window's index;
- `video_entries`: the decoded detections of a video's windows -> one merged, suppressed list of
  ActivityNet entries per video (`lofi.windows.merge_window_detections`), what detect writes and
  what stage 3's validation mAP scores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from lofi.errors import LofiError
from lofi.sampling import num_stride_snippets
from lofi.windows import cut_window, merge_window_detections, window_ground_truth, window_starts
from pipelines.data.batches import VIDEO_INDEX, VideoLabel
from pipelines.config import DataSection, DetectSection
from pipelines.data.tensors import tensor_numpy
from pipelines.data.manifests import FeaturesManifest

WINDOW_COLUMNS = ("features", VIDEO_INDEX, "duration_sec")


@dataclass(frozen=True)
class Window:
    """One window of one video: where it starts and where its real snippets end, in video time."""

    video_id: str
    start: int  # first snippet
    start_sec: float
    valid_end_sec: float  # min(window end, video duration): detections past it are dropped


def uses_windows(manifest: FeaturesManifest) -> bool:
    """Whether the features are fixed-stride, i.e. the head runs on windows (grid features, and folders
    whose manifest does not say: never)."""
    return manifest.fixed_grid is False


def window_problems(data: DataSection, manifest: FeaturesManifest, folder: Any) -> list[str]:
    """What keeps windows from running on these features (empty for grid features)."""
    if not uses_windows(manifest):
        return []
    problems = []
    if not data.window_snippets:
        problems.append(f"{folder}: features of level {manifest.level!r} have a fixed stride (videos differ "
                        "in T): set data.window_snippets (e.g. 256) to run the head on windows of that many snippets")
    if not (manifest.level_config and manifest.level_config.snippet_stride_sec):
        problems.append(f"{folder}/features_manifest.json: no level_config.snippet_stride_sec; re-extract with this "
                        "version of `lofi extract`")
    return problems


def stride_sec(manifest: FeaturesManifest) -> float:
    return float(manifest.level_config.snippet_stride_sec)


def plan_windows(durations_sec: Mapping[str, float], data: DataSection, stride: float) -> dict[int, Window]:
    """window_index -> Window for every video given (video_id -> duration_sec), in video_id then time order."""
    windows: dict[int, Window] = {}
    width = data.window_snippets * stride
    for vid, duration in sorted(durations_sec.items()):
        num_snippets = num_stride_snippets(duration, stride)
        for start in window_starts(num_snippets, data.window_snippets, data.window_overlap).tolist():
            windows[len(windows)] = Window(vid, start, start * stride, min(start * stride + width, duration))
    return windows


def window_labels(windows: Mapping[int, Window], videos: Mapping[int, VideoLabel], window_snippets: int,
                  stride: float) -> dict[int, VideoLabel]:
    """window_index -> the window as a video of window_snippets * stride seconds: its clipped ground truth."""
    by_id = {video.video_id: video for video in videos.values()}
    out = {}
    for index, window in windows.items():
        video = by_id[window.video_id]
        segments, kept = window_ground_truth(np.asarray(video.segments_sec).reshape(-1, 2), np.arange(len(video.labels)),
                                             window.start_sec, window_snippets * stride)
        out[index] = replace(video, video_id=f"{video.video_id}@{window.start}", duration_sec=window_snippets * stride,
                             segments_sec=tuple((float(s), float(e)) for s, e in segments),
                             label_ids=tuple(video.label_ids[k] for k in kept), labels=tuple(video.labels[k] for k in kept))
    return out


def training_windows(labels: Mapping[int, VideoLabel], subset: str, empty_fraction: float, seed: int) -> list[int]:
    """The windows of `subset` stage 3 trains on: all with ground truth, and each empty one with
    probability empty_fraction (one draw per window from run.seed: the same set on every run)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for index, label in sorted(labels.items()):
        if label.subset != subset:
            continue
        draw = rng.random()  # drawn for every window, so the choice of one does not move the others'
        if label.segments_sec or draw < empty_fraction:
            chosen.append(index)
    return chosen


def windows_by_video(windows: Mapping[int, Window], chosen: list[int]) -> dict[str, list[tuple[int, int]]]:
    """video_id -> [(window_index, start)] of the chosen windows: what `cut_windows` takes."""
    out: dict[str, list[tuple[int, int]]] = {}
    for index in chosen:
        out.setdefault(windows[index].video_id, []).append((index, windows[index].start))
    return out


def cut_windows(batch: pa.Table, windows: Mapping[str, list[tuple[int, int]]], window_snippets: int,
                window_sec: float) -> pa.Table:
    """map_batches (batch_format="pyarrow"): video rows (video_id, num_snippets, features (T_max, D))
    -> one row per planned window: features (W, D), video_index (the window's index), duration_sec
    (the window's span, W * stride)."""
    from pipelines.data.tensors import ray_tensor_column

    feats = tensor_numpy(batch.column("features"))  # (N, T_max, D)
    rows, indices = [], []
    for i, (vid, length) in enumerate(zip(batch.column("video_id").to_pylist(),
                                          batch.column("num_snippets").to_pylist())):
        for index, start in windows.get(vid, []):
            rows.append(window_features(vid, feats[i, :length], start, window_snippets))
            indices.append(index)
    features = np.stack(rows) if rows else np.zeros((0, window_snippets, feats.shape[-1]), dtype=np.float32)
    return pa.table({"features": ray_tensor_column(features), VIDEO_INDEX: pa.array(indices, pa.int64()),
                     "duration_sec": pa.array([window_sec] * len(indices), pa.float64())})


def window_features(video_id: str, features: np.ndarray, start: int, window_snippets: int) -> np.ndarray:
    """(W, D) features of the window of a video's (T, D) features starting at `start`, zero-padded."""
    if start >= len(features):
        raise LofiError(f"video {video_id}: a window starts at snippet {start}, but its features hold {len(features)} "
                        "snippets; its duration_sec and the level's stride disagree: re-extract the features")
    return cut_window(features, start, window_snippets)[0]


def video_entries(window_dets: list[tuple[Window, dict[str, np.ndarray]]], durations_sec: Mapping[str, float],
                  class_names: list[str], detect: DetectSection) -> dict[str, list[dict[str, Any]]]:
    """Decoded detections of windows (seconds from each window's start) -> {video_id: ActivityNet
    entries}: each video's windows merged (the best detect.window_candidates of each) and suppressed once
    (class-aware Soft-NMS, detect.top_k)."""
    from lofi.postprocess import to_activitynet_entries

    grouped: dict[str, list[tuple[Window, dict[str, np.ndarray]]]] = {}
    for window, det in window_dets:
        grouped.setdefault(window.video_id, []).append((window, det))
    results = {}
    for vid, parts in sorted(grouped.items()):
        merged = merge_window_detections([d for _, d in parts], [w.start_sec for w, _ in parts],
                                         [w.valid_end_sec for w, _ in parts], method="soft_nms", top_k=detect.top_k,
                                         sigma=detect.soft_nms_sigma, max_per_window=detect.window_candidates or None)
        results[vid] = to_activitynet_entries(merged["segments_sec"], merged["scores"], merged["label_ids"],
                                              class_names, durations_sec[vid])
    return results
