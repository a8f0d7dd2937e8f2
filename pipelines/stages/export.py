"""`lofi export-features`: a features folder in the layout ActionFormer and OpenTAD read.

Reads any `lofi extract` output (a folder or URI; the Parquet parts its manifest lists, so it
works whether or not `extract.write_npy` was on) and writes, into a new local folder OUT:

    OUT/features/<prefix><video_id>.npy   float32 (T_i, D), snippet t is row t, never padded
    OUT/annotations.json                  {"version", "database": {video_id: {subset, duration,
                                          fps, frame, annotations: [{segment, label, label_id}]}}}
    OUT/category_idx.txt                  the class map: line i holds the name of label id i
    OUT/toolkits.json                     the dataset settings each toolkit needs for these files

The JSON keys are the video ids as they are; `--file-prefix v_` (the ActivityNet convention)
prefixes only the feature file names, which both toolkits add themselves (ActionFormer's
`file_prefix`, OpenTAD's `LoadFeats(prefix=...)`). Subsets keep lofi's names (`training`,
`validation`, `testing`), which are what both readers are configured with (ActionFormer
lower-cases the JSON's subset; OpenTAD compares it as written).

Time: lofi places snippets in seconds, not frames (snippet t of a fixed-stride level spans
[t*s, (t+1)*s), of a whole-video grid [t*d, (t+1)*d) with d = duration / T; see lofi.sampling).
Both toolkits place features in frames, so the export states one time base `fps` (`--fps`,
written as every video's `fps` and, as `frame = round(duration * fps)`, its frame count): a
fixed-stride level becomes `feature_stride = s * fps` frames with the feature's centre
`offset = stride / 2` frames after its start (ActionFormer: `feat_stride`, `num_frames = stride`;
OpenTAD: `feature_stride`, `offset_frames`, whole numbers, so `--fps` must make them so). A
whole-video grid has no stride in frames: ActionFormer reads it as variable-stride features
(`feat_stride: -1`, `num_frames: 1` snippet, `max_seq_len: T`), OpenTAD with its resize
dataset (`resize_length: T`), both from each video's `duration`.
"""

from __future__ import annotations

import math
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lofi.errors import LofiError
from pipelines.data.features import (FEATURES_MANIFEST, feature_parts, features_location, read_features_manifest,
                                replace_folder, video_features)
from pipelines.data.manifests import FeaturesManifest
from pipelines.data.shards import write_json_atomic

ANNOTATIONS = "annotations.json"
CLASS_MAP = "category_idx.txt"
TOOLKITS = "toolkits.json"
FEATURES = "features"
_WHOLE = 1e-6  # how far s * fps may be from a whole number of frames (float error in s)


@dataclass(frozen=True)
class ExportOptions:
    fps: float = 30.0  # the time base: frames per second of the exported grid (see the module docstring)
    file_prefix: str = ""  # before each feature file name, e.g. "v_" (ActivityNet); JSON keys stay the video ids
    overwrite: bool = False  # replace an existing OUT

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise LofiError(f"--fps must be > 0 (frames per second of the exported time base), got {self.fps}")
        if "/" in self.file_prefix:
            raise LofiError(f"--file-prefix {self.file_prefix!r} contains '/': it goes before each file name")


# 1. the grid: what each toolkit is told about the features ---------------------------------

def feature_grid(manifest: FeaturesManifest, fps: float, where: str) -> dict[str, Any]:
    """The level's grid in the toolkits' frame units: `stride_frames` and `offset_frames` for a
    fixed-stride level, `num_snippets` T for a whole-video grid."""
    if manifest.fixed_grid:
        return {"fixed_grid": True, "num_snippets": int(manifest.num_snippets)}
    stride_sec = manifest.level_config.snippet_stride_sec if manifest.level_config else None
    if not stride_sec:
        raise LofiError(f"{where}: no level_config.snippet_stride_sec for this fixed-stride level (an older "
                        "features folder); run `lofi extract` again to record it")
    stride = stride_sec * fps
    if abs(stride / 2 - round(stride / 2)) > _WHOLE * max(1.0, stride):
        whole_fps = 2 * math.ceil(fps * stride_sec / 2) / stride_sec
        raise LofiError(f"--fps {fps:g} makes the {stride_sec:g} s snippet stride {stride:g} frames, centred "
                        f"{stride / 2:g} frames in; OpenTAD needs both as whole frames: pass --fps {whole_fps:g} "
                        f"(any multiple of 2 / {stride_sec:g})")
    return {"fixed_grid": False, "snippet_stride_sec": stride_sec, "stride_frames": round(stride),
            "offset_frames": round(stride / 2), "max_snippets": int(manifest.num_snippets)}


def toolkit_settings(grid: dict[str, Any], opts: ExportOptions, num_classes: int, feature_dim: int,
                     subsets: list[str]) -> dict[str, Any]:
    """toolkits.json: per toolkit, the dataset keys its config needs; paths relative to OUT."""
    common = {"feat_folder": FEATURES, "json_file": ANNOTATIONS, "file_prefix": opts.file_prefix,
              "file_ext": ".npy", "input_dim": feature_dim, "num_classes": num_classes, "default_fps": opts.fps}
    opentad = {"ann_file": ANNOTATIONS, "class_map": CLASS_MAP, "data_path": FEATURES + "/",
               "LoadFeats": {"feat_format": "npy", "prefix": opts.file_prefix}}
    if grid["fixed_grid"]:
        # feat_stride <= 0: ActionFormer derives the stride from duration, fps and T per video;
        # num_frames counts in strides there, 1 = a feature spans one snippet, centred on it
        actionformer = {**common, "feat_stride": -1, "num_frames": 1, "max_seq_len": grid["num_snippets"],
                        "force_upsampling": False}
        opentad |= {"dataset_type": "AnetResizeDataset", "resize_length": grid["num_snippets"]}
    else:
        actionformer = {**common, "feat_stride": grid["stride_frames"], "num_frames": grid["stride_frames"]}
        opentad |= {"dataset_type": "AnetPaddingDataset", "feature_stride": grid["stride_frames"], "sample_stride": 1,
                    "offset_frames": grid["offset_frames"], "fps": opts.fps}
    # subsets: the names for ActionFormer's train_split / val_split and OpenTAD's subset_name
    return {"fps": opts.fps, "grid": grid, "subsets": subsets,
            "actionformer": {"dataset_name": "anet", "dataset": actionformer},
            "opentad": opentad}


# 2. the files --------------------------------------------------------------------------------

def video_entry(row: dict[str, Any], labels: list[str], fps: float) -> dict[str, Any]:
    """One video of annotations.json, from a features row (its non-tensor columns)."""
    annotations = []
    for start, end, label, label_id in zip(row["segment_start_sec"], row["segment_end_sec"], row["segment_label"],
                                           row["segment_label_id"]):
        if not 0 <= label_id < len(labels) or labels[label_id] != label:
            raise LofiError(f"video {row['video_id']}: segment label {label!r} has id {label_id}, which is not its "
                            f"place in the manifest's {len(labels)} labels; run `lofi extract` again")
        annotations.append({"segment": [start, end], "label": label, "label_id": label_id})
    duration = row["duration_sec"]
    return {"subset": row["subset"].lower(), "duration": duration, "fps": fps, "frame": round(duration * fps),
            "annotations": annotations}


def check_labels(labels: list[str], where: str) -> None:
    bad = [name for name in labels if not name or "\n" in name or name != name.strip()]
    if bad or len(set(labels)) != len(labels):
        raise LofiError(f"{where}: labels {bad or labels} cannot be written one per line to {CLASS_MAP} "
                        "(empty, repeated, or with line breaks or surrounding spaces)")


def write_export(features_dir: str, folder: Path, opts: ExportOptions) -> dict[str, Any]:
    """Write OUT's files into `folder`; a summary: videos per subset, T range, toolkits.json."""
    manifest = read_features_manifest(features_dir)
    where = str(features_location(features_dir) / FEATURES_MANIFEST)
    labels = list(manifest.labels)
    check_labels(labels, where)
    grid = feature_grid(manifest, opts.fps, where)
    (folder / FEATURES).mkdir(parents=True)
    database: dict[str, Any] = {}
    lengths: list[int] = []
    for part in feature_parts(features_dir, manifest):
        for vid, feats in video_features(part).items():  # (T_i, D), the padding of a stride level dropped
            np.save(folder / FEATURES / f"{opts.file_prefix}{vid}.npy", np.ascontiguousarray(feats, dtype=np.float32))
            lengths.append(feats.shape[0])
        for row in part.drop_columns(["features"]).to_pylist():
            database[row["video_id"]] = video_entry(row, labels, opts.fps)
    if not database:
        raise LofiError(f"{where}: the features folder holds no videos; check the extraction summary")
    database = dict(sorted(database.items()))
    subsets = sorted({v["subset"] for v in database.values()})
    write_json_atomic(folder / ANNOTATIONS, {"version": "lofi export", "database": database})
    (folder / CLASS_MAP).write_text("".join(f"{name}\n" for name in labels), encoding="utf8")
    settings = toolkit_settings(grid, opts, len(labels), int(manifest.feature_dim), subsets)
    settings["source"] = {"features": str(features_location(features_dir)), "level": manifest.level}
    write_json_atomic(folder / TOOLKITS, settings)
    per_subset = {s: sum(v["subset"] == s for v in database.values()) for s in subsets}
    used = {a["label"] for v in database.values() for a in v["annotations"]}
    return {"videos": len(database), "per_subset": per_subset, "snippets": (min(lengths), max(lengths)),
            "settings": settings, "labels_without_segments": [name for name in labels if name not in used]}


def run(features_dir: str, out_dir: str | Path, opts: ExportOptions = ExportOptions()) -> dict[str, Any]:
    """Export `features_dir` (a folder or URI) into the local folder `out_dir`, whole or not at all:
    the files go into a sibling temp folder renamed into place at the end."""
    if "://" in str(out_dir):
        raise LofiError(f"OUT {out_dir}: export writes a local folder; copy it to object storage afterwards")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not opts.overwrite:
        raise LofiError(f"OUT {out} exists; pass --overwrite to replace it, or choose another folder")
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        summary = write_export(features_dir, tmp, opts)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**summary, "out_dir": str(out)}


def summary_lines(summary: dict[str, Any]) -> list[str]:
    grid = summary["settings"]["grid"]
    kind = (f"whole-video grid of T={grid['num_snippets']}" if grid["fixed_grid"] else
            f"stride {grid['snippet_stride_sec']:g} s = {grid['stride_frames']} frames at "
            f"{summary['settings']['fps']:g} fps")
    subsets = ", ".join(f"{k} {v}" for k, v in summary["per_subset"].items())
    lines = [f"lofi export-features: {summary['videos']} videos ({subsets}), T {summary['snippets'][0]}-"
             f"{summary['snippets'][1]}, {kind}",
             f"  wrote {summary['out_dir']}: {FEATURES}/, {ANNOTATIONS}, {CLASS_MAP}, {TOOLKITS} (the dataset "
             "settings for ActionFormer and OpenTAD)"]
    unused = summary["labels_without_segments"]
    if unused:  # ActionFormer counts the classes of the JSON's segments against its num_classes
        lines.append(f"  note: labels with no segment ({', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}) "
                     "are in category_idx.txt but not in annotations.json; ActionFormer's num_classes check "
                     "counts only labels that have segments")
    return lines
