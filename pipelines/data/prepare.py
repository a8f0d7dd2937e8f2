"""`lofi prepare`: decode videos with Ray Data into Arrow/Parquet shards at fidelity levels.

Pipeline (one pass over the videos, on the current Ray cluster):

    annotation file -> list videos (driver; missing files become errors)
      -> from_items, one block per part of `videos_per_part` videos
      -> map_batches(decode_batch, compute=TaskPoolStrategy(num_workers)): each worker opens
         its own decord reader, decodes the union of all levels' frames once, resizes per level
      -> write_datasink(ShardSink): fused into the same task, writes the part's Parquet files
         and commits them (see pipelines/data/shards.py for layout, schema and commit protocol)

Per-video failures are caught inside the worker and listed in the manifest's `errors`; the
run exits non-zero only when they exceed `max_error_fraction`. A video that kills its decoding
process (a segfault in the decoder, an OOM kill) loses its part's task: the parts' tasks run
without Ray's retries and with `max_errored_blocks` unlimited, so the others land, and the
lost part's videos are decoded once more, one per task: the ones that land were innocent, the
ones that die again are listed as `decode-crash` errors (`prepare_tasks.decode_isolating_crashes`). A rerun
with the same output skips committed videos, failed ones included; `--retry-failed` decodes
only the videos listed in the previous manifest's errors. A rerun with a different
data-defining config is refused unless `--overwrite`. Output is a local (or shared, on
multi-node clusters) folder or an object-store URI (s3://, gs://; pipelines.storage); the
video folder may be any pyarrow filesystem URI.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data

from lofi.config import to_dict
from lofi.errors import LofiError
from lofi.splits import TUNING_SUBSET
from pipelines.data import shards
from pipelines.data.manifests import ShardManifest, ShardTuning
from pipelines.data.prepare_config import InputConfig, PrepareConfig, PrepareResult
from pipelines.data.prepare_tasks import committed_ids, decode_isolating_crashes, forget_failures, mark_crash_test


# 1. inputs -----------------------------------------------------------------------------------

def load_videos(cfg: InputConfig) -> tuple[list[Any], tuple[str, ...], tuple[str, ...]]:
    """Annotated videos to prepare (tuning split applied, subset filter, limit, sorted by id), the label
    names and the tuning split's video ids (of the whole file: a subset filter or limit does not move it)."""
    from lofi.annotations import load_annotations

    ann = load_annotations(cfg.annotations, **cfg.annotation_options())
    split = cfg.tuning_split()
    ann, tuning_ids = split.apply(ann) if split.fraction else (ann, ())
    videos = sorted(ann.videos, key=lambda v: v.video_id)
    if cfg.subsets:
        def source(v: Any) -> str:  # a tuning video still belongs to the subset it was drawn from
            return split.source if v.subset == TUNING_SUBSET else v.subset

        unknown = sorted(set(cfg.subsets) - {v.subset for v in videos} - {source(v) for v in videos})
        if unknown:
            raise LofiError(f"input.subsets: {unknown} match no video of {cfg.annotations}; "
                            f"subsets there: {sorted({v.subset for v in videos})}")
        videos = [v for v in videos if v.subset in cfg.subsets or source(v) in cfg.subsets]
    return (videos[: cfg.limit] if cfg.limit else videos), tuple(ann.labels.names), tuning_ids


def list_video_files(videos: str) -> dict[str, str]:
    """File stem -> path (or URI) of every file in the video folder."""
    import pyarrow.fs as pafs

    try:
        if "://" in videos:
            fs, base = pafs.FileSystem.from_uri(videos)
            prefix = videos.split("://", 1)[0] + "://"
        else:
            fs, base, prefix = pafs.LocalFileSystem(), str(Path(videos).resolve()), ""
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    except (OSError, pa.ArrowException) as err:
        raise LofiError(f"input.videos: cannot list {videos}: {err}; "
                        "set input.videos to the folder of the videos") from err
    files: dict[str, str] = {}
    for info in sorted(infos, key=lambda i: i.path):
        if info.type == pafs.FileType.File:
            files.setdefault(info.base_name.rsplit(".", 1)[0], prefix + info.path)
    return files


def build_items(videos: list[Any], labels: tuple[str, ...], files: dict[str, str],
                folder: str) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Work items for the workers (everything a row needs) and the videos with no file."""
    label_id = {name: i for i, name in enumerate(labels)}
    items, errors = [], []
    for v in videos:
        stem = next((s for s in (v.video_id, f"v_{v.video_id}", v.video_id.removeprefix("v_")) if s in files), None)
        if stem is None:
            errors.append({"video_id": v.video_id, "path": f"{folder}/{v.video_id}.*", "stage": "list",
                           "error": f"no file {v.video_id}.* or v_{v.video_id}.* in {folder}; add it or drop the "
                                    "video from the annotations (or narrow input.subsets / input.limit)"})
            continue
        items.append({"video_id": v.video_id, "subset": v.subset, "path": files[stem],
                      "duration_sec": float(v.duration_sec),
                      "segment_start_sec": [float(s.start_sec) for s in v.segments],
                      "segment_end_sec": [float(s.end_sec) for s in v.segments],
                      "segment_label": [s.label for s in v.segments],
                      "segment_label_id": [label_id[s.label] for s in v.segments]})
    return items, errors


# 2. output folder ----------------------------------------------------------------------------

def prepare_output(cfg: PrepareConfig) -> set[str]:
    """Create or check OUT; drop uncommitted writes; return the ids already committed."""
    out = cfg.output_location()
    out.check_bucket()
    record = out / shards.CONFIG_RECORD
    ours = record.exists() or (out / shards.MANIFEST).exists() or (out / shards.PARTS_DIR).exists()
    if not ours and out.files(recursive=True):
        raise LofiError(f"output {out} exists and is not a `lofi prepare` output; choose an empty or new folder")
    if cfg.overwrite:
        out.delete()
    out.makedirs()
    key = json.loads(json.dumps(cfg.data_key()))
    if record.exists():
        old = record.read_json()
        if old != key:
            changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            raise LofiError(f"{out} was written with a different config (differs in: {', '.join(changed)}); "
                            "rerun with the same config to resume, or pass --overwrite to start over")
    else:
        record.write_json(key)
    shards.remove_uncommitted(out, [level["name"] for level in cfg.resolved_levels()])
    return committed_ids(out)


def previous_errors(cfg: PrepareConfig) -> dict[str, dict[str, str]]:
    """Video id -> error of the previous run's manifest: what --retry-failed decodes again."""
    path = cfg.output_location() / shards.MANIFEST
    if not path.is_file():
        raise LofiError(f"--retry-failed: {path} does not exist, so there are no failed videos to retry; run "
                        f"`lofi prepare` into output {cfg.output} without --retry-failed first")
    return {error["video_id"]: error for error in ShardManifest.from_dict(path.read_json()).errors}


# 3. entry points -----------------------------------------------------------------------------

def run(cfg: PrepareConfig, verbose: bool = True) -> PrepareResult:
    """Prepare the dataset described by `cfg`; resumes a previous run into the same output."""
    start = time.perf_counter()
    videos, labels, tuning_ids = load_videos(cfg.input)
    levels = cfg.resolved_levels()
    retry = previous_errors(cfg) if cfg.retry_failed else None
    done = prepare_output(cfg)
    out = cfg.output_location()
    if retry is not None:
        forget_failures(out, set(retry))
        done = committed_ids(out)
    items, list_errors = build_items(videos, labels, list_video_files(cfg.input.videos), cfg.input.videos)
    todo = [item for item in items if item["video_id"] not in done and (retry is None or item["video_id"] in retry)]
    if retry is not None and verbose:
        print(retry_line(retry, todo), flush=True)
    if todo:
        mark_crash_test(todo)
        decode_isolating_crashes(cfg, todo, levels)
    wall = time.perf_counter() - start
    manifest = shards.build_manifest(out, {**to_dict(cfg), "levels": levels}, levels, labels, list_errors,
                                     total=len(videos), wall_time_sec=wall, processed=len(todo))
    if tuning_ids:  # what scoring on subset "tuning" relabels in the annotation file (lofi eval --tuning-videos)
        manifest = dataclasses.replace(manifest, tuning=ShardTuning(
            **dataclasses.asdict(cfg.input.tuning_split()), subset=TUNING_SUBSET, video_ids=tuple(tuning_ids)))
    manifest_path = out / shards.MANIFEST
    manifest_path.write_json(manifest.to_dict())  # last: readers trust what it lists
    if verbose:
        print("\n".join(manifest.summary_lines(cfg.output)), flush=True)
    failed = manifest.counts.videos_failed
    return PrepareResult(out_dir=str(cfg.output), manifest_path=str(manifest_path), videos_total=len(videos),
                         videos_ok=manifest.counts.videos_ok, videos_failed=failed,
                         videos_skipped=len(items) - len(todo), errors=manifest.errors,
                         wall_time_sec=wall, error_fraction=failed / len(videos) if videos else 0.0,
                         max_error_fraction=cfg.max_error_fraction)


CONFIG_KEYS = """config keys (in the YAML file, or --set KEY=VALUE):
  input.annotations      annotation file (ActivityNet JSON, THUMOS CSV, ...)
  input.videos           folder or filesystem URI (s3://, gs://, file://) of <id>.<ext> or v_<id>.<ext>
  input.metadata         metadata CSV for annotation formats without durations
  input.subsets          only these subsets (default: all); input.limit: first N videos by id (0: all)
  input.annotation_errors  invalid annotation entries: raise (default, all reported at once), skip (drop them), keep (as written)
  input.tuning_fraction  share of the training videos written as subset "tuning" (held out for choices; default 0),
                         drawn per input.tuning_seed; the ids are listed in the manifest (tuning.video_ids)
  output                 folder to write (shared by all nodes on a multi-node cluster) or s3://bucket/prefix,
                         gs://bucket/prefix (credentials and endpoint from AWS_* / GOOGLE_* in the environment)
  levels                 list of presets (full, s_lofi, t_lofi, st_lofi) or sections: name, preset,
                         num_snippets T | snippet_stride_sec, frames_per_snippet F, size_px S,
                         storage (uint8 | jpeg), jpeg_quality, snippets_per_row (default: the whole
                         video, or the largest divisor of T that fits max_row_mib)
  resize                 short_side_crop (keep aspect, centre square) | squash
  max_row_mib            largest row before a video is split into chunks of snippets (default 64)
  compression            Parquet codec: zstd (default), lz4, snappy, gzip, brotli, none (not for uint8 frames: raw bytes)
  duration_tolerance_sec how much shorter than its annotation a video may be (default 1)
  num_workers            decode+write tasks at once, one CPU each (default 2)
  videos_per_part        videos per committed part, the unit of resuming (default 8)
  decode_threads         decord threads per task (default 1; 0: ffmpeg's choice)
  max_error_fraction     exit 1 above this share of failed videos (default 0.05)
  retry_failed           decode only the videos listed in the previous manifest's errors (--retry-failed)
  ray.address            cluster to join (default: RAY_ADDRESS, else a new local one with ray.num_cpus)
Example: lofi prepare --config deploy/configs/prepare/demo.yaml --set num_workers=4"""


def retry_line(retry: dict[str, dict[str, str]], todo: list[dict[str, Any]]) -> str:
    """What --retry-failed decodes again: every failure of the previous run whose file is there."""
    named = ", ".join(f"{item['video_id']} ({retry[item['video_id']]['stage']})" for item in todo[:20])
    more = f" and {len(todo) - 20} more" if len(todo) > 20 else ""
    return (f"lofi prepare --retry-failed: retrying {len(todo)} of the {len(retry)} videos that failed in the "
            f"previous run{': ' + named + more if todo else ''} (the others have no file or are written)")
