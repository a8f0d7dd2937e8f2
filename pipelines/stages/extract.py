"""`lofi extract`: the frozen encoder over every video at full fidelity, as Ray Data batch inference.

Pipeline (on the current Ray cluster; every step but the last line runs on Ray workers):

    shards of level data.full_level (pipelines/data/shards.py; JPEG rows decoded on read)
      -> map_batches(EncoderActor, compute=ActorPoolStrategy(min_size=1, max_size=extract.num_actors)):
         an autoscaling pool: Ray Data adds actors while rows wait and the cluster (or its
         autoscaler) has room, so the pool grows as nodes join. Each actor builds the encoder once
         from `encoder` (its checkpoint: a lofi, torchvision or TSM file, see
         lofi/models/checkpoints.py) and encodes rows of snippets, uint8 frames (B, Tc, F, S, S, 3)
         -> features (B, Tc, D); with scaling.use_gpu one GPU per actor, which then runs on cuda
      -> groupby("video_id").map_groups(assemble_video): the chunks of a video, which different
         actors may have encoded, in order of snippet_start with the padding of a fixed-stride
         level's last chunk dropped (num_valid_snippets): the video's (T, D), zero-padded to the
         longest video's T
      -> map_batches(write_videos): Parquet parts (+ npy/<video_id>.npy) into the run's temp
         features folder; each task returns one small summary row per video (no features)
      -> driver: checks every video came back once, writes features_manifest.json last and
         renames the temp folder into place (pipelines/data/features.py: `commit_features`; on an
         object store the manifest, uploaded last, is the commit)

Output: `<run>/features/` (layout and schema in pipelines/data/features.py). `run.storage` must be a
folder every Ray node sees (workers write there) or an object-store URI (workers upload each part
under its final name; the driver uploads the manifest last). A failed or killed run leaves no
features folder, or the previous one intact; a rerun extracts again and replaces it.

Resources: each actor takes scaling.cpus_per_worker CPUs (+ 1 GPU with scaling.use_gpu). When
no node of the cluster can hold one actor yet (no GPU node up, say), Ray Data waits for the
autoscaler to add one for at most DataContext.wait_for_min_actors_s seconds (Ray's
RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S; NODE_WAIT_SEC when unset), then fails with one clear
error instead of waiting forever.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from lofi.config import from_dict, to_dict
from lofi.errors import LofiError
from pipelines.data import shards
from pipelines.data.batches import frames_tensor
from pipelines.cluster import connect_ray
from pipelines.config import PipelineConfig, StageResult
from pipelines.data.features import (CHUNK_COLUMNS, FEATURES_MANIFEST, META_COLUMNS, VIDEOS_PER_PART, abort_features,
                                assemble_video, begin_features, commit_features, features_manifest, file_sha1,
                                write_videos)
from pipelines.data.manifests import FeaturesLevel, FeaturesManifest, ShardLevel, ShardManifest
from pipelines.data.tensors import ray_tensor_column
from pipelines.stages.provenance import checkpoint_origin
from pipelines.storage import Location, local_file, location

_READ_COLUMNS = META_COLUMNS + CHUNK_COLUMNS + ("frames",)
NODE_WAIT_SEC = 900  # for the autoscaler to start a node that fits an actor, when none does at the start


class EncoderActor:
    """Ray Data callable class: holds one encoder, maps rows of frames to rows of features."""

    def __init__(self, encoder_cfg: dict[str, Any], chunk_snippets: int = 0) -> None:
        import ray
        import torch

        from lofi.models.encoders import EncoderConfig, build_encoder

        # Ray hides the GPUs it did not assign (CUDA_VISIBLE_DEVICES), so an actor without one never
        # grabs a GPU it shares with others
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        enc_cfg = from_dict(EncoderConfig, encoder_cfg)
        checkpoint = local_file(enc_cfg.checkpoint, "encoder.checkpoint")  # a URI: a node-local copy
        self.encoder = build_encoder(dataclasses.replace(enc_cfg, checkpoint=checkpoint)).to(self.device).eval()
        self.chunk_snippets = chunk_snippets or None

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        # uint8 over the bus (4x fewer bytes than float); the encoder normalises on its device
        frames = frames_tensor(batch).to(self.device)  # (B, Tc, F, S, S, 3)
        with torch.inference_mode():
            feats = self.encoder(frames, chunk_snippets=self.chunk_snippets)  # (B, D, Tc)
        feats = feats.transpose(1, 2).float().cpu().numpy()  # (B, D, Tc) -> (B, Tc, D)
        return batch.drop_columns(["frames"]).append_column("features", ray_tensor_column(feats))


# 1. inputs -----------------------------------------------------------------------------------

def check_inputs(cfg: PipelineConfig) -> tuple[ShardManifest, ShardLevel]:
    """(shard manifest, level entry); every problem with the config reported at once."""
    problems = []
    if not cfg.data.shards:
        problems.append("data.shards is empty: set it to the `lofi prepare` output folder")
    ckpt = cfg.encoder.checkpoint
    if ckpt and not location(ckpt, "encoder.checkpoint").is_file():
        problems.append(f"encoder.checkpoint {ckpt} does not exist: point it at the stage-1 or stage-2 "
                        "encoder.pt (or a torchvision/TSM file)")
    if cfg.extract.num_actors < 1:
        problems.append(f"extract.num_actors must be >= 1 (the most encoder actors at once), "
                        f"got {cfg.extract.num_actors}")
    if problems:
        raise LofiError("; ".join(problems))
    manifest = shards.read_manifest(cfg.data.shards)
    entry, _ = shards.level_files(cfg.data.shards, cfg.data.full_level)
    if not entry.shards:
        raise LofiError(f"{cfg.data.shards}: level {cfg.data.full_level!r} has no rows (did every video fail?); "
                        f"see the errors in {Path(cfg.data.shards) / shards.MANIFEST}")
    return manifest, entry


def video_metadata(shards_dir: str, level: str) -> dict[str, dict[str, Any]]:
    """video_id -> subset and num_snippets, from the first chunk row of each video (no frames read)."""
    table = shards.read_level_table(shards_dir, level, columns=["video_id", "subset", "num_snippets", "chunk_index"])
    return {row["video_id"]: {"subset": row["subset"], "num_snippets": row["num_snippets"]}
            for row in table.to_pylist() if row["chunk_index"] == 0}


def encoder_feature_dim(cfg: PipelineConfig) -> int:
    """D of the configured encoder; loading its checkpoint here reports a bad file as one clear
    error on the driver instead of a traceback from inside an actor."""
    from lofi.models.encoders import build_encoder

    checkpoint = local_file(cfg.encoder.checkpoint, "encoder.checkpoint")  # a URI: a local copy
    return build_encoder(dataclasses.replace(cfg.encoder, checkpoint=checkpoint)).feature_dim


def actor_fits_a_node(cfg: PipelineConfig) -> bool:
    """Whether some live node has the CPUs (and GPU) of one encoder actor now."""
    import ray

    gpus = 1 if cfg.scaling.use_gpu else 0
    return any(node["Alive"] and node["Resources"].get("CPU", 0) >= cfg.scaling.cpus_per_worker
               and node["Resources"].get("GPU", 0) >= gpus for node in ray.nodes())


# 2. the Ray Data pipeline --------------------------------------------------------------------

def extraction_dataset(cfg: PipelineConfig, folder: str, num_snippets: int):
    """The lazy Dataset that encodes, assembles and writes every video; its rows are summaries."""
    import ray.data

    ds = shards.read_level_dataset(cfg.data.shards, cfg.data.full_level, columns=_READ_COLUMNS)
    ds = ds.map_batches(
        EncoderActor,
        fn_constructor_kwargs={"encoder_cfg": to_dict(cfg.encoder), "chunk_snippets": cfg.extract.chunk_snippets},
        batch_size=cfg.extract.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.extract.num_actors),
        num_gpus=1 if cfg.scaling.use_gpu else 0,
        num_cpus=cfg.scaling.cpus_per_worker,
    )
    # Group by a sort of plain tasks: Ray Data's default hash shuffle starts its own actors, which cost
    # ~6 s more per run on the 2-CPU test cluster (measured); the features are small next to the frames.
    # `ds.context` belongs to this dataset (Ray Data copies the current one on read).
    ds.context.shuffle_strategy = "sort_shuffle_pull_based"  # DataContext.shuffle_strategy
    ds = ds.groupby("video_id").map_groups(assemble_video, fn_kwargs={"num_snippets": num_snippets},
                                           batch_format="pyarrow")
    return ds.map_batches(write_videos, fn_kwargs={"folder": str(folder), "write_npy": cfg.extract.write_npy},
                          batch_size=VIDEOS_PER_PART, batch_format="pyarrow")


def extract_videos(cfg: PipelineConfig, folder: str, videos: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the pipeline into `folder`; the summaries the workers return, one per video, checked."""
    import ray.exceptions

    connect_ray(cfg.ray)
    ds = extraction_dataset(cfg, folder, max(v["num_snippets"] for v in videos.values()))
    wait = None
    if not actor_fits_a_node(cfg):
        wait = ds.context.wait_for_min_actors_s if ds.context.wait_for_min_actors_s > 0 else NODE_WAIT_SEC
        ds.context.wait_for_min_actors_s = wait  # DataContext: fail when the pool's first actor never starts
        print(f"lofi extract: no node of the cluster has {_actor_needs(cfg)} for an encoder actor yet; waiting up "
              f"to {wait} s for the autoscaler to add one", file=sys.stderr)
    try:
        summaries = ds.take_all()
    except ray.exceptions.GetTimeoutError as e:
        if wait is None:
            raise
        raise LofiError(f"no node with {_actor_needs(cfg)} joined the cluster within {wait} s (an encoder actor "
                        f"takes scaling.cpus_per_worker={cfg.scaling.cpus_per_worker:g} CPUs"
                        + (" and, with scaling.use_gpu=true, one GPU" if cfg.scaling.use_gpu else "")
                        + "): add such nodes (or node types the autoscaler may start), or set scaling.use_gpu=false "
                        "or a smaller scaling.cpus_per_worker") from e
    counts = Counter(s["video_id"] for s in summaries)
    if counts.keys() != videos.keys() or max(counts.values()) > 1:
        missing = sorted(videos.keys() - counts.keys())
        wrong = sorted(v for v, n in counts.items() if n > 1 or v not in videos)
        raise RuntimeError(f"extraction returned the wrong videos: missing {missing[:10]}, "
                           f"repeated or unknown {wrong[:10]}")
    return summaries


def _actor_needs(cfg: PipelineConfig) -> str:
    cpus = cfg.scaling.cpus_per_worker
    return f"{cpus:g} CPU{'' if cpus == 1 else 's'}" + (" and a GPU" if cfg.scaling.use_gpu else "")


# 3. entry points -----------------------------------------------------------------------------

# The config sections this stage's output depends on: `lofi pipeline` reruns it when one changes.
CONFIG_SECTIONS = ("data", "encoder", "extract")


def run(cfg: PipelineConfig, parent_run_id: str | None = None, verbose: bool = True) -> StageResult:
    """Extract features of every video of `data.full_level` into `<run>/features/`."""
    from pipelines.tracking import Tracker

    start = time.perf_counter()
    manifest, entry = check_inputs(cfg)
    if not cfg.encoder.checkpoint:
        print("lofi extract: warning: encoder.checkpoint is empty; extracting with randomly initialised weights",
              file=sys.stderr)
    dim = encoder_feature_dim(cfg)
    videos = video_metadata(cfg.data.shards, cfg.data.full_level)
    num_snippets = max(v["num_snippets"] for v in videos.values())
    with Tracker.start(cfg.tracking, f"{cfg.run.name}/extract", parent_run_id=parent_run_id,
                       tags={"stage": "extract"}) as tracker:
        tracker.log_config(cfg)
        target = cfg.run.features()
        folder = begin_features(target, cfg.extract.write_npy)
        try:
            summaries = extract_videos(cfg, folder, videos)
            seconds = time.perf_counter() - start
            counts: dict[str, int] = {}
            for s in summaries:
                counts[s["subset"]] = counts.get(s["subset"], 0) + 1
            ckpt = cfg.encoder.checkpoint
            out = commit_features(folder, target, features_manifest(FeaturesManifest(
                encoder={**to_dict(cfg.encoder),
                         "checkpoint": location(ckpt, "encoder.checkpoint").uri if ckpt else None,
                         "checkpoint_sha1": file_sha1(ckpt) if ckpt else None, "origin": checkpoint_origin(ckpt)},
                shards=location(cfg.data.shards, "data.shards").uri, level=entry.name,
                level_config=FeaturesLevel.of(entry), fixed_grid=entry.num_snippets is not None,
                labels=manifest.labels, annotations=manifest.annotations(), seconds=seconds,
            ), num_snippets, dim, {s["file"] for s in summaries}, cfg.extract.write_npy, counts))
        except BaseException:
            abort_features(folder)
            raise
        metrics = {"videos": float(len(videos)), "seconds": seconds, "videos_per_sec": len(videos) / seconds,
                   "snippets_per_sec": sum(v["num_snippets"] for v in videos.values()) / seconds}
        tracker.log_metrics(metrics, step=0)
        if out.is_local:
            tracker.log_artifact(str(out / FEATURES_MANIFEST))
        else:
            tracker.log_bytes((out / FEATURES_MANIFEST).read_bytes(), FEATURES_MANIFEST)
        run_id = tracker.run_id
    if verbose:
        print("\n".join(summary_lines(out, metrics, counts, entry, cfg)), flush=True)
    return StageResult(stage="extract", out_dir=str(out), metrics=metrics, seconds=seconds, mlflow_run_id=run_id,
                       artifacts={"features": str(out), "manifest": str(out / "features_manifest.json")})


def summary_lines(out: Location, metrics: dict[str, float], counts: dict[str, int], entry: ShardLevel,
                  cfg: PipelineConfig) -> list[str]:
    subsets = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return [f"lofi extract: {int(metrics['videos'])} videos ({subsets}) of level {entry.name} in "
            f"{metrics['seconds']:.1f} s ({metrics['videos_per_sec']:.2f} videos/s, "
            f"{metrics['snippets_per_sec']:.0f} snippets/s)",
            f"  encoder {cfg.encoder.name} width {cfg.encoder.width} from {cfg.encoder.checkpoint or '(random init)'}",
            f"  wrote {out} (features_manifest.json, Parquet parts"
            + (", npy/<video_id>.npy" if cfg.extract.write_npy else "") + ")"]
