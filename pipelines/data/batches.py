"""Shard rows -> model inputs and targets: what the training stages (and extraction) feed the models.

Rows come from `lofi prepare` shards (pipelines/data/shards.py) or `lofi extract` feature shards
(pipelines/data/features.py). Ray Train's `iter_torch_batches` stacks only fixed-shape numeric
columns, so the ragged ground truth never travels with the frames:

- the driver reads the small metadata columns once (`read_video_labels`) into plain dicts
  keyed by a dense `video_index` (videos sorted by id), which go to every worker in
  `train_loop_config`;
- `add_video_index` (a `map_batches` function) gives every row its numeric `video_index`;
- in the worker, `batch_targets` turns a batch's `video_index` column back into the videos'
  segments and builds the head's targets with `lofi.targets.make_targets`.

Stage 1 trains on clips instead of videos: `snippet_clips` (a `map_batches` function) cuts
every snippet of a whole video (or chunk) row into a clip of F frames labelled with the class
of the segment its centre lies in (`snippet_labels`: overlaps, background, vocabularies). A
trimmed clip (a Kinetics-style row: one segment over the whole file) prepared at T=1 is one clip.

For extraction and tests, `frames_tensor` turns rows (a pyarrow table of a level, JPEG or
uint8 storage, or a numpy/torch batch) into the uint8 `(B, T, F, H, W, C)` tensor every
encoder takes.
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import torch

from lofi.heads import HeadConfig, head_loss
from lofi.heads.common import HeadOutput
from lofi.targets import TALTargets, make_targets

LABEL_COLUMNS = ("video_id", "subset", "duration_sec", "segment_start_sec", "segment_end_sec", "segment_label",
                 "segment_label_id")
VIDEO_INDEX = "video_index"
# Columns a training batch of whole videos carries through iter_torch_batches.
VIDEO_BATCH_COLUMNS = ("frames", VIDEO_INDEX, "duration_sec")
CLIP_COLUMNS = ("clip", "label")


@dataclass(frozen=True)
class VideoLabel:
    """One video's ground truth, as the workers get it (plain data: it crosses Ray boundaries)."""

    video_id: str
    subset: str
    duration_sec: float
    segments_sec: tuple[tuple[float, float], ...]
    label_ids: tuple[int, ...]
    labels: tuple[str, ...]

    def target_input(self) -> tuple[np.ndarray, np.ndarray, float]:
        """The (segments_sec (N, 2), label_ids (N,), duration_sec) triple make_targets takes."""
        segments = np.asarray(self.segments_sec, dtype=np.float64).reshape(-1, 2)
        return segments, np.asarray(self.label_ids, dtype=np.int64), float(self.duration_sec)


def video_labels_from_table(table: pa.Table) -> dict[str, VideoLabel]:
    """video_id -> VideoLabel from rows holding LABEL_COLUMNS (chunks of one video repeat them)."""
    out: dict[str, VideoLabel] = {}
    for row in table.select(list(LABEL_COLUMNS)).to_pylist():
        if row["video_id"] in out:
            continue
        out[row["video_id"]] = VideoLabel(
            video_id=row["video_id"], subset=row["subset"], duration_sec=float(row["duration_sec"]),
            segments_sec=tuple((float(s), float(e)) for s, e in zip(row["segment_start_sec"], row["segment_end_sec"])),
            label_ids=tuple(int(i) for i in row["segment_label_id"]), labels=tuple(row["segment_label"]))
    return out


def read_video_labels(files: Iterable[str | Path]) -> dict[str, VideoLabel]:
    """Ground truth of every video in some Parquet files (shards or feature shards), frames unread."""
    from pipelines.storage import read_parquet

    out: dict[str, VideoLabel] = {}
    for path in files:  # paths or object-store URIs
        for vid, label in video_labels_from_table(read_parquet(path, columns=list(LABEL_COLUMNS))).items():
            out.setdefault(vid, label)
    return out


def index_videos(labels: Mapping[str, VideoLabel]) -> tuple[dict[str, int], dict[int, VideoLabel]]:
    """Dense indices over the videos sorted by id: (video_id -> index, index -> VideoLabel)."""
    ids = sorted(labels)
    return {vid: i for i, vid in enumerate(ids)}, {i: labels[vid] for i, vid in enumerate(ids)}


def add_video_index(batch: pa.Table, index: Mapping[str, int]) -> pa.Table:
    """map_batches function (batch_format="pyarrow"): append the numeric `video_index` column."""
    ids = batch.column("video_id").to_pylist()
    return batch.append_column(VIDEO_INDEX, pa.array([index[v] for v in ids], type=pa.int64()))


def numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A level table as the numpy batch Ray Data's map_batches would pass (frames decoded)."""
    from pipelines.data.tensors import frames_array

    out: dict[str, np.ndarray] = {"frames": frames_array(table)}
    for name in table.column_names:
        column = table.column(name)
        if name in ("frames", "frames_jpeg"):
            continue
        if isinstance(column.type, pa.FixedShapeTensorType):
            out[name] = column.combine_chunks().to_numpy_ndarray()
        elif pa.types.is_list(column.type):
            out[name] = np.array([np.asarray(v) for v in column.to_pylist()] + [None], dtype=object)[:-1]
        else:
            out[name] = column.to_numpy()
    return out


def frames_tensor(batch: Any) -> torch.Tensor:
    """uint8 frames `(B, T, F, H, W, C)` of a batch of whole-video rows.

    `batch` is a pyarrow table of a level (uint8 or JPEG storage), or a mapping whose
    "frames" entry is a numpy array or tensor (a Ray Data numpy or torch batch).
    """
    if isinstance(batch, pa.Table):
        from pipelines.data.tensors import frames_array

        array = frames_array(batch)
    else:
        array = batch["frames"]
    if isinstance(array, torch.Tensor):
        frames = array
    else:
        with warnings.catch_warnings():
            # Ray hands out read-only arrays; the encoder only reads frames (it normalises into
            # a new float tensor), so sharing the buffer is safe and saves a copy per batch.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            frames = torch.from_numpy(np.ascontiguousarray(array))
    if frames.dtype != torch.uint8 or frames.dim() != 6 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (B, T, F, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    return frames


def batch_targets(video_indices: Iterable[int], labels: Mapping[int, VideoLabel], num_snippets: int,
                  head: HeadConfig, num_classes: int) -> TALTargets:
    """The head's targets (on the CPU) for the videos of a batch, on a grid of num_snippets."""
    videos = [labels[int(i)].target_input() for i in video_indices]
    return make_targets(videos, num_snippets, head.resolved_max_duration(num_snippets), num_classes,
                        head.boundary_region_snippets)


def video_slice(data: HeadOutput | TALTargets, i: int) -> HeadOutput | TALTargets:
    """Video i of a batched HeadOutput or TALTargets, kept as a batch of one."""
    return type(data)(**{name: getattr(data, name)[i:i + 1] for name in data.__dataclass_fields__})


def snippet_labels(batch: dict[str, np.ndarray], num_classes: int, background: bool,
                   label_map: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, snippet, label) of every clip `snippet_clips` cuts from a batch; frames are not read.

    A snippet's centre (the mean of its frames' timestamps: they sit at the centres of F equal
    sub-bins) decides its label: the class of the first segment, in annotation order, with
    start <= centre <= end. Snippets in no segment are labelled `num_classes` ("background")
    when `background`, else dropped; padding snippets (num_valid_snippets) are always dropped.
    `label_map` maps the shards' label ids to the classifier's (another vocabulary, e.g. a
    clip classifier scored on TAL videos); a snippet whose class maps to -1 is dropped.
    """
    rows, snippets, labels = [], [], []
    for row in range(len(batch["num_valid_snippets"])):
        centres = np.nanmean(batch["timestamps_sec"][row], axis=1)  # (Tc, F) -> (Tc,)
        starts = np.asarray(batch["segment_start_sec"][row], dtype=np.float64)
        ends = np.asarray(batch["segment_end_sec"][row], dtype=np.float64)
        ids = np.asarray(batch["segment_label_id"][row], dtype=np.int64)
        for t in range(int(batch["num_valid_snippets"][row])):
            inside = np.flatnonzero((starts <= centres[t]) & (centres[t] <= ends))
            if inside.size:
                label = int(ids[inside[0]]) if label_map is None else int(label_map[ids[inside[0]]])
            else:
                label = num_classes if background else -1
            if label >= 0:
                rows.append(row)
                snippets.append(t)
                labels.append(label)
    return np.asarray(rows, dtype=np.int64), np.asarray(snippets, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def snippet_clips(batch: dict[str, np.ndarray], num_classes: int, background: bool,
                  label_map: list[int] | None = None) -> dict[str, np.ndarray]:
    """map_batches function (batch_format="numpy"): whole-video (or chunk) rows -> labelled clips,
    one per snippet of F frames, labelled as `snippet_labels` says."""
    frames = batch["frames"]  # (N, Tc, F, S, S, 3)
    rows, snippets, labels = snippet_labels(batch, num_classes, background, label_map)
    return {"clip": np.ascontiguousarray(frames[rows, snippets]), "label": labels}  # (M, F, S, S, 3), (M,)


def video_seed(seed: int, epoch: int, video_index: int) -> int:
    """A seed for one video's random choices in one epoch: the same on any worker, in any batch."""
    return ((seed * 1_000_003 + epoch + 1) * 1_000_003 + video_index) % (2**63 - 1)


def tal_batch_loss(head: HeadConfig, out: HeadOutput, targets: TALTargets, seeds: list[int]) -> dict[str, torch.Tensor]:
    """Each loss term as the mean over the batch's videos of that video's own loss.

    Per-video losses make a global batch's loss the same however it is split over workers (DDP
    averages equal-sized worker means), which BMN's batch-wide positive/negative balancing
    would not; the regression sampling of each video draws from its own seed.
    """
    devices = [out.start.device.index or 0] if out.start.is_cuda else []
    per_video = []
    for i, seed in enumerate(seeds):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            per_video.append(head_loss(head, video_slice(out, i), video_slice(targets, i)))
    return {key: torch.stack([losses[key] for losses in per_video]).mean() for key in per_video[0]}
