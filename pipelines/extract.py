"""`lofi extract`: the frozen encoder over every video at full fidelity, as Ray Data batch inference.

Pipeline (on the current Ray cluster):

    shards of level data.full_level (pipelines/shards.py; JPEG rows decoded on read)
      -> map_batches(EncoderActor, compute=ActorPoolStrategy(size=extract.num_actors)):
         each actor builds the encoder once from `encoder` (its checkpoint: a lofi, torchvision
         or TSM file, see lofi/models/checkpoints.py) and encodes rows of snippets, uint8 frames
         (B, Tc, F, S, S, 3) -> features (B, Tc, D); one GPU per actor when the cluster has GPUs
      -> driver: chunks of a video are collected (they may come in any order), the padding of a
         fixed-stride level's last chunk is dropped (num_valid_snippets), and the chunks are put
         together by snippet_start into the video's (T, D); whole videos go to FeatureWriter

Output: `<run>/features/` (layout and schema in pipelines/features.py), written to a temp
folder and renamed into place at the end. A rerun extracts again and replaces it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lofi.config import add_config_arguments, config_from_args, from_dict, to_dict
from lofi.errors import LofiError, cli_errors
from pipelines import shards
from pipelines.cluster import connect_ray
from pipelines.config import PipelineConfig, StageResult
from pipelines.batches import frames_tensor
from pipelines.features import FeatureWriter, file_sha1

_META = ("video_id", "subset", "duration_sec", "num_snippets", "num_chunks",
         "segment_start_sec", "segment_end_sec", "segment_label", "segment_label_id")
_ROW_COLUMNS = ("video_id", "chunk_index", "snippet_start", "num_valid_snippets", "frames")


def features_dir(cfg: PipelineConfig) -> Path:
    return cfg.run.dir() / "features"


class EncoderActor:
    """Ray Data callable class: holds one encoder, maps rows of frames to rows of features."""

    def __init__(self, encoder_cfg: dict[str, Any], chunk_snippets: int = 0) -> None:
        import torch

        from lofi.models.encoders import EncoderConfig, build_encoder

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder = build_encoder(from_dict(EncoderConfig, encoder_cfg)).to(self.device).eval()
        self.chunk_snippets = chunk_snippets or None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        # uint8 over the bus (4x fewer bytes than float); the encoder normalises on its device
        frames = frames_tensor(batch).to(self.device)  # (B, Tc, F, S, S, 3)
        with torch.inference_mode():
            feats = self.encoder(frames, chunk_snippets=self.chunk_snippets)  # (B, D, Tc)
        out = {k: batch[k] for k in _ROW_COLUMNS if k != "frames"}
        out["features"] = feats.transpose(1, 2).float().cpu().numpy()  # (B, D, Tc) -> (B, Tc, D)
        return out


# 1. inputs -----------------------------------------------------------------------------------

def check_inputs(cfg: PipelineConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(shard manifest, level entry); every problem with the config reported at once."""
    problems = []
    if not cfg.data.shards:
        problems.append("data.shards is empty: set it to the `lofi prepare` output folder")
    ckpt = cfg.encoder.checkpoint
    if ckpt and not Path(ckpt).is_file():
        problems.append(f"encoder.checkpoint {ckpt} does not exist: point it at the stage-1 or stage-2 "
                        "encoder.pt (or a torchvision/TSM file)")
    if problems:
        raise LofiError("; ".join(problems))
    manifest = shards.read_manifest(cfg.data.shards)
    entry, _ = shards.level_files(cfg.data.shards, cfg.data.full_level)
    if not entry["shards"]:
        raise LofiError(f"{cfg.data.shards}: level {cfg.data.full_level!r} has no rows (did every video fail?); "
                        f"see the errors in {Path(cfg.data.shards) / shards.MANIFEST}")
    return manifest, entry


def video_metadata(shards_dir: str, level: str) -> dict[str, dict[str, Any]]:
    """video_id -> its non-frame columns, from the first chunk row of each video."""
    table = shards.read_level_table(shards_dir, level, columns=list(_META) + ["chunk_index"])
    return {row["video_id"]: {k: row[k] for k in _META} for row in table.to_pylist() if row["chunk_index"] == 0}


# 2. the Ray Data pipeline --------------------------------------------------------------------

def encode_rows(cfg: PipelineConfig, entry: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    """Batches of encoded rows (video_id, chunk_index, snippet_start, num_valid_snippets, features)."""
    import ray
    import ray.data

    connect_ray(cfg.ray)
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) > 0
    ds = shards.read_level_dataset(cfg.data.shards, cfg.data.full_level, columns=_ROW_COLUMNS)
    ds = ds.map_batches(
        EncoderActor,
        fn_constructor_kwargs={"encoder_cfg": to_dict(cfg.encoder), "chunk_snippets": cfg.extract.chunk_snippets},
        batch_size=cfg.extract.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool_size(cfg, resources, use_gpu)),
        num_gpus=1 if use_gpu else 0,
        num_cpus=cfg.scaling.cpus_per_worker,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def pool_size(cfg: PipelineConfig, resources: dict[str, float], use_gpu: bool) -> int:
    """extract.num_actors, capped so that the actors leave the shard reads one CPU (and GPUs
    are not oversubscribed): actors holding every CPU starve the reads and the pipeline hangs."""
    per_actor = cfg.scaling.cpus_per_worker
    fit = int((resources.get("CPU", 0) - 1) // per_actor) if per_actor > 0 else cfg.extract.num_actors
    if use_gpu:
        fit = min(fit, int(resources["GPU"]))
    size = max(1, min(cfg.extract.num_actors, fit))
    if size < cfg.extract.num_actors:
        print(f"lofi extract: {size} encoder actor(s) instead of extract.num_actors={cfg.extract.num_actors}: "
              f"the cluster has {resources.get('CPU', 0):g} CPUs ({per_actor:g} per actor, one kept for reading "
              f"shards){' and ' + str(int(resources['GPU'])) + ' GPUs' if use_gpu else ''}", file=sys.stderr)
    return size


def assemble(batches: Iterator[dict[str, np.ndarray]], videos: dict[str, dict[str, Any]],
             writer: FeatureWriter) -> None:
    """Put each video's chunks together in order of snippet_start and hand whole videos to `writer`."""
    pending: dict[str, dict[int, tuple[int, np.ndarray]]] = {}
    for batch in batches:
        for i, vid in enumerate(batch["video_id"].tolist()):
            valid = int(batch["num_valid_snippets"][i])
            chunk = batch["features"][i, :valid]  # (Tc, D) -> (valid, D): drop the last chunk's padding
            parts = pending.setdefault(vid, {})
            parts[int(batch["chunk_index"][i])] = (int(batch["snippet_start"][i]), chunk)
            meta = videos[vid]
            if len(parts) < meta["num_chunks"]:
                continue
            ordered = [c for _, c in sorted(parts.values(), key=lambda p: p[0])]
            feats = np.concatenate(ordered).astype(np.float32, copy=False)  # (T, D)
            if feats.shape[0] != meta["num_snippets"]:
                raise RuntimeError(f"video {vid}: assembled {feats.shape[0]} snippets, expected {meta['num_snippets']}")
            writer.add({k: v for k, v in meta.items() if k != "num_chunks"}, feats)
            del pending[vid]
    if pending:
        raise RuntimeError(f"videos with missing chunks after extraction: {sorted(pending)[:10]}")


def encoder_feature_dim(cfg: PipelineConfig) -> int:
    """D of the configured encoder; loading its checkpoint here reports a bad file as one clear
    error on the driver instead of a traceback from inside an actor."""
    from lofi.models.encoders import build_encoder

    return build_encoder(cfg.encoder).feature_dim


# 3. entry points -----------------------------------------------------------------------------

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
        writer = FeatureWriter(features_dir(cfg), num_snippets, dim, cfg.extract.write_npy)
        try:
            assemble(encode_rows(cfg, entry), videos, writer)
        except BaseException:
            writer.abort()
            raise
        seconds = time.perf_counter() - start
        ckpt = cfg.encoder.checkpoint
        out = writer.commit({
            "encoder": {**to_dict(cfg.encoder), "checkpoint": str(Path(ckpt).resolve()) if ckpt else None,
                        "checkpoint_sha1": file_sha1(ckpt) if ckpt else None},
            "shards": str(Path(cfg.data.shards).resolve()), "level": entry["name"],
            "level_config": {k: entry[k] for k in ("num_snippets", "snippet_stride_sec", "frames_per_snippet", "size_px")},
            "fixed_grid": entry["num_snippets"] is not None, "labels": manifest["labels"],
            "annotations": manifest["config"]["input"]["annotations"], "seconds": seconds,
        })
        metrics = {"videos": float(len(videos)), "seconds": seconds, "videos_per_sec": len(videos) / seconds,
                   "snippets_per_sec": sum(v["num_snippets"] for v in videos.values()) / seconds}
        tracker.log_metrics(metrics, step=0)
        tracker.log_artifact(str(out / "features_manifest.json"))
        run_id = tracker.run_id
    if verbose:
        print("\n".join(summary_lines(out, metrics, writer.counts, entry, cfg)), flush=True)
    return StageResult(stage="extract", out_dir=str(out), metrics=metrics, seconds=seconds, mlflow_run_id=run_id,
                       artifacts={"features": str(out), "manifest": str(out / "features_manifest.json")})


def summary_lines(out: Path, metrics: dict[str, float], counts: dict[str, int], entry: dict[str, Any],
                  cfg: PipelineConfig) -> list[str]:
    subsets = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return [f"lofi extract: {int(metrics['videos'])} videos ({subsets}) of level {entry['name']} in "
            f"{metrics['seconds']:.1f} s ({metrics['videos_per_sec']:.2f} videos/s, "
            f"{metrics['snippets_per_sec']:.0f} snippets/s)",
            f"  encoder {cfg.encoder.name} width {cfg.encoder.width} from {cfg.encoder.checkpoint or '(random init)'}",
            f"  wrote {out} (features_manifest.json, Parquet parts"
            + (f", npy/<video_id>.npy" if cfg.extract.write_npy else "") + ")"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofi extract",
        description="Run the frozen encoder (encoder.checkpoint) over every video of the data.full_level shards "
                    "as Ray Data batch inference (an actor pool, one GPU per actor when the cluster has GPUs) and "
                    "write one row of (T, D) snippet features per video to <run.storage>/<run.name>/features/ "
                    "(Parquet + features_manifest.json; with extract.write_npy also npy/<video_id>.npy in the "
                    "(T, D) layout feature-based TAL toolkits read). Exits 2 on a config or input error.",
        epilog="Config keys used (YAML or --set): run.name, run.storage, data.shards, data.full_level, encoder.* "
               "(name, width, checkpoint, checkpoint_format, shift_div, amp_dtype), extract.batch_size (rows per "
               "inference call), extract.num_actors (actor pool size), extract.chunk_snippets (snippets encoded at "
               "a time; 0: all), extract.write_npy, scaling.cpus_per_worker (CPUs per actor), tracking.*, ray.*. "
               "See deploy/configs/pipeline/demo.yaml.")
    add_config_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no Ray Data progress bars")
    return parser


@cli_errors("extract")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(PipelineConfig, args)
    if args.quiet:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    run(cfg)
    return 0
