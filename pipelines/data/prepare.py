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

import argparse
import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import ray
import ray.data

from lofi.config import add_config_arguments, config_from_args, from_dict, to_dict
from lofi.errors import LofiError, cli_errors
from lofi.fidelity import PRESETS
from lofi.splits import TUNING_SUBSET, TuningSplit
from pipelines.data import shards
from pipelines.cluster import RayConfig
from pipelines.data.prepare_tasks import committed_ids, decode_isolating_crashes, forget_failures, mark_crash_test
from pipelines.storage import Location, location, uri_problem

COMPRESSIONS = ("none", "snappy", "lz4", "zstd", "gzip", "brotli")
# Config fields that change no byte of the data (or name the output itself): a rerun may change them.
_RUNTIME_FIELDS = ("output", "num_workers", "videos_per_part", "decode_threads", "max_error_fraction", "overwrite",
                   "retry_failed", "ray")


@dataclass(frozen=True)
class LevelSpec:
    """One fidelity level: a preset name and/or explicit fields (explicit fields win)."""

    name: str = ""  # folder and `fidelity` column; defaults to the preset name
    preset: str = ""  # one of lofi.fidelity.PRESETS: full, s_lofi, t_lofi, st_lofi
    num_snippets: int | None = None  # T snippets covering the video (the paper's grid)
    snippet_stride_sec: float | None = None  # or: snippets of this many seconds, T = ceil(duration / stride)
    frames_per_snippet: int | None = None  # F (default 8)
    size_px: int | None = None  # S: frames are S x S (default 224)
    # grid levels: a snippet's F frames are spaced as on a grid of this many snippets, centred on the snippet
    # (e.g. the full level's T at T-LoFi: fewer snippets, not sparser frames; lofi.sampling); 0: they fill it
    spacing_snippets: int = 0
    storage: Literal["uint8", "jpeg"] = "uint8"
    jpeg_quality: int = 90
    snippets_per_row: int | None = None  # Tc; default: whole video if it fits max_row_mib

    def __post_init__(self) -> None:
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"preset {self.preset!r} is not one of {sorted(PRESETS)}")
        level = self.filled()
        name = level["name"]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"name {name!r}: give each level a name of letters, digits, '_', '.', '-' (or a preset)")
        if (level["num_snippets"] is None) == (self.snippet_stride_sec is None):
            raise ValueError(f"level {name}: set exactly one of num_snippets and snippet_stride_sec")
        for key in ("num_snippets", "frames_per_snippet", "size_px", "snippets_per_row", "snippet_stride_sec"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"level {name}: {key} must be > 0, got {getattr(self, key)}")
        if self.spacing_snippets and (level["num_snippets"] is None or self.spacing_snippets < level["num_snippets"]):
            raise ValueError(f"level {name}: spacing_snippets {self.spacing_snippets} needs a grid level (num_snippets) "
                             f"with num_snippets <= spacing_snippets; 0 lets the frames fill each snippet")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"level {name}: jpeg_quality must be in 1..100, got {self.jpeg_quality}")

    def filled(self) -> dict[str, Any]:
        """The level with the preset's and the default values filled in (snippets_per_row aside)."""
        base = PRESETS.get(self.preset)
        snippets = self.num_snippets
        if snippets is None and self.snippet_stride_sec is None and base is not None:
            snippets = base.num_snippets
        frames, size = (base.frames_per_snippet, base.size_px) if base else (8, 224)
        filled = {"name": self.name or self.preset, "num_snippets": snippets,
                  "snippet_stride_sec": self.snippet_stride_sec,
                  "frames_per_snippet": frames if self.frames_per_snippet is None else self.frames_per_snippet,
                  "size_px": size if self.size_px is None else self.size_px,
                  "storage": self.storage, "jpeg_quality": self.jpeg_quality}
        if self.spacing_snippets and self.spacing_snippets != snippets:  # absent otherwise: older data keys still match
            filled["spacing_snippets"] = self.spacing_snippets
        return filled

    def resolved(self, max_row_bytes: int) -> dict[str, Any]:
        """Every field filled in, as sent to workers and written to the manifest."""
        level = self.filled()
        level["snippets_per_row"] = self.snippets_per_row or _auto_snippets_per_row(level, max_row_bytes)
        return level


def _auto_snippets_per_row(level: dict[str, Any], max_row_bytes: int) -> int:
    """Largest row that fits: all T (or a divisor of T, so no row is padded); 32 for strides."""
    snippet_bytes = level["frames_per_snippet"] * level["size_px"] ** 2 * 3
    fit = max(1, max_row_bytes // snippet_bytes)
    total = level["num_snippets"]
    if total is None:
        return int(min(fit, 32))
    return max(d for d in range(1, total + 1) if total % d == 0 and d <= fit)


@dataclass(frozen=True)
class InputConfig:
    annotations: str  # annotation file (ActivityNet JSON, THUMOS CSV, ...; see lofi.annotations)
    videos: str  # folder or pyarrow filesystem URI holding <video_id>.<ext> or v_<video_id>.<ext>
    metadata: str = ""  # metadata CSV for annotation formats without durations
    subsets: tuple[str, ...] = ()  # only these subsets; empty: all
    limit: int = 0  # only the first N videos (sorted by id); 0: all
    # invalid annotation entries: "raise" (every problem at once), "skip" (drop them, warn), or "keep"
    # (suspect segments kept as written, as the official evaluator does; the real ActivityNet and
    # THUMOS14 files hold a few zero-length or past-the-end segments)
    annotation_errors: Literal["raise", "skip", "keep"] = "raise"
    # the tuning split (lofi.splits): this share of the training videos is written as subset "tuning" (drawn
    # per tuning_seed; the ids go into the manifest), held out for choosing levels, recipes and sweeps
    tuning_fraction: float = 0.0
    tuning_seed: int = 0

    def __post_init__(self) -> None:
        self.tuning_split()  # checks the fraction

    def tuning_split(self) -> TuningSplit:
        return TuningSplit(self.tuning_fraction, self.tuning_seed)

    def annotation_options(self) -> dict[str, Any]:
        """load_annotations keywords for `annotation_errors`."""
        return {"metadata": self.metadata or None, "skip_invalid": self.annotation_errors == "skip",
                "lenient": self.annotation_errors == "keep"}


@dataclass(frozen=True)
class PrepareConfig:
    input: InputConfig
    output: str  # folder (shared by all nodes) or object-store URI (s3://bucket/prefix) to write the dataset into
    # preset names or LevelSpec sections (typed Any so that a bad section reports its own error,
    # which lofi.config's union coercion would replace by "matches none of")
    levels: tuple[Any, ...] = ("full",)
    resize: Literal["short_side_crop", "squash"] = "short_side_crop"
    max_row_mib: float = 64.0  # rows above this are split into chunks of snippets
    compression: str = "zstd"  # Parquet codec of every column but uint8 `frames` (stored uncompressed: raw bytes)
    duration_tolerance_sec: float = 1.0  # a video may be this much shorter than its annotation
    num_workers: int = 2  # decode+write tasks at once (TaskPoolStrategy size)
    videos_per_part: int = 8  # videos per commit: the granularity of resuming
    decode_threads: int = 1  # decord threads per worker (0: ffmpeg's choice)
    max_error_fraction: float = 0.05  # exit non-zero when more videos than this fail
    overwrite: bool = False  # delete what a previous run wrote and start over
    retry_failed: bool = False  # decode only the videos listed in the previous manifest's errors
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        specs = []  # normalised to LevelSpec: preset names and plain sections alike
        for i, item in enumerate(self.levels):
            if isinstance(item, str):
                if item not in PRESETS:
                    raise ValueError(f"levels[{i}]: {item!r} is not a preset ({', '.join(PRESETS)}); "
                                     "write a level section instead")
                item = LevelSpec(preset=item)
            elif isinstance(item, dict):
                item = from_dict(LevelSpec, item, prefix=f"levels[{i}].")
            elif not isinstance(item, LevelSpec):
                raise ValueError(f"levels[{i}]: {item!r} is neither a preset name nor a level section")
            specs.append(item)
        object.__setattr__(self, "levels", tuple(specs))
        names = [spec.name or spec.preset for spec in specs]
        if not specs or len(set(names)) != len(names):
            raise ValueError(f"levels: need at least one level and unique names, got {names}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression {self.compression!r} is not one of {list(COMPRESSIONS)}")
        for key in ("num_workers", "videos_per_part"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.max_error_fraction <= 1 or self.max_row_mib <= 0:
            raise ValueError("max_error_fraction must be in [0, 1] and max_row_mib > 0")
        if self.overwrite and self.retry_failed:
            raise ValueError("overwrite and retry_failed: --overwrite deletes the failures that --retry-failed would "
                             "retry; pass one of them")
        problem = uri_problem(self.output)
        if problem:
            raise ValueError(f"output: {problem}")

    def output_location(self) -> Location:
        """The output folder: a local path or an object-store URI (never Ray job's temp folder)."""
        return location(self.output, "output", output=True)

    def resolved_levels(self) -> list[dict[str, Any]]:
        max_row_bytes = int(self.max_row_mib * 2**20)
        return [spec.resolved(max_row_bytes) for spec in self.levels]

    def data_key(self) -> dict[str, Any]:
        """The fields that define the written data, levels resolved: what a rerun must match."""
        data = {k: v for k, v in to_dict(self).items() if k not in _RUNTIME_FIELDS}
        data["levels"] = self.resolved_levels()
        if not self.input.tuning_fraction:  # absent without a split: older data keys still match
            for key in ("tuning_fraction", "tuning_seed"):
                data["input"].pop(key)
        return data


@dataclass(frozen=True)
class PrepareResult:
    out_dir: str
    manifest_path: str
    videos_total: int
    videos_ok: int
    videos_failed: int
    videos_skipped: int  # committed by an earlier run, not redone
    errors: tuple[dict[str, str], ...]
    wall_time_sec: float
    error_fraction: float
    max_error_fraction: float

    @property
    def too_many_errors(self) -> bool:
        return self.error_fraction > self.max_error_fraction


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
    return {error["video_id"]: error for error in path.read_json()["errors"]}


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
        manifest["tuning"] = {**dataclasses.asdict(cfg.input.tuning_split()), "subset": TUNING_SUBSET,
                              "video_ids": list(tuning_ids)}
    manifest_path = out / shards.MANIFEST
    manifest_path.write_json(manifest)  # last: readers trust what it lists
    if verbose:
        print("\n".join(shards.summary_lines(manifest, cfg.output)), flush=True)
    failed = manifest["counts"]["videos_failed"]
    return PrepareResult(out_dir=str(cfg.output), manifest_path=str(manifest_path), videos_total=len(videos),
                         videos_ok=manifest["counts"]["videos_ok"], videos_failed=failed,
                         videos_skipped=len(items) - len(todo), errors=tuple(manifest["errors"]),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofi prepare",
        description="Decode the videos of an annotation file with Ray Data into Parquet shards at one or "
                    "several fidelity levels (one decode per video), resumably. Joins the Ray cluster named "
                    "by ray.address or RAY_ADDRESS, else starts a local one. Writes OUT/manifest.json with "
                    "counts, shard files and per-video errors; exits 1 when the share of failed videos "
                    "exceeds max_error_fraction, 2 on a config or input error.",
        epilog=CONFIG_KEYS, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="delete what an earlier run wrote to the output folder and start over (needed when "
                             "the config changed); without it a rerun resumes, skipping committed videos")
    parser.add_argument("--retry-failed", action="store_true",
                        help="decode again only the videos listed in the errors of the output's manifest (a plain "
                             "rerun skips failed videos); committed parts are kept, the manifest updated")
    parser.add_argument("--quiet", action="store_true", help="no Ray Data progress bars")
    return parser


@cli_errors("prepare")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.overwrite:
        args.overrides.append("overwrite=true")
    if args.retry_failed:
        args.overrides.append("retry_failed=true")
    cfg = config_from_args(PrepareConfig, args)
    if args.quiet:
        ray.data.DataContext.get_current().enable_progress_bars = False
    result = run(cfg)
    if result.too_many_errors:
        print(f"lofi prepare: {result.videos_failed} of {result.videos_total} videos failed "
              f"({result.error_fraction:.1%} > max_error_fraction {cfg.max_error_fraction:.1%}); see the errors "
              f"in {result.manifest_path}", file=sys.stderr)
        return 1
    return 0
