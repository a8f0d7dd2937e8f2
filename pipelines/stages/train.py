"""`lofi train`: stage 2, LoFi end-to-end training of the encoder and the TAL head.

Every batch is read at the fidelity level the schedule picks (`fidelity` section:
full / s_lofi / t_lofi / st_lofi, or c_lofi cycling S -> T -> ST per epoch or every
`every_batches` batches; `lofi.fidelity`). A short cycle's epoch is one pass at every level,
each level's split read only at its turns (metrics `rows_read_<level>`). Each level is read
from the `lofi prepare` shards of the same name, which must have the schedule level's T, F and
S and whole videos per row.
The batch size is the same at every level (LoFi keeps the mini-batch, not the memory, fixed).

The model (`TALModel`): encoder frames (B, T, F, S, S, 3) uint8 -> features (B, D, T) ->
linear resampling to the head's fixed grid of T_head snippets -> head -> HeadOutput. The head
has no T-dependent weights, but its targets and proposal maps live on one grid, which keeps
the losses of all levels comparable. The loss of a batch is the mean of per-video head
losses (`batches.tal_batch_loss`).

The evaluation level: `data.full_level` when its shards hold whole videos on a fixed grid (the
fidelity the encoder is used at afterwards), else the schedule's finest level. Validation
runs there every epoch (a loss comparable across epochs whatever level trained), and its T
is T_head. It also decodes the model's own detections (Soft-NMS, `detect.top_k`) and scores
them against the validation ground truth: `val_average_mAP`, `val_mAP_tIoU_<t>` at the
`detect.protocol` thresholds, every epoch (what a sweep optimises).

Starts from `encoder.checkpoint` (e.g. `<run>/pretrain/encoder.pt`); the encoder's learning
rate is `train.lr * train.encoder_lr_scale`, the head's `train.lr` (StepLR on both).
BatchNorm: with `train.freeze_encoder_bn` (the default) the encoder's BatchNorm layers stay in
eval mode with the checkpoint's statistics, so no encoder saved or validated here carries
statistics of a lower-fidelity level (frames of another size and count). Gradients are
clipped to `train.grad_clip_norm` (default 1).

Writes `<run>/train/encoder.pt` (VideoEncoder state dict, lofi naming, for extraction),
`model.pt` (the TALModel state dict: `encoder.*` and `head.*`) and `model.json` (what
rebuilding it needs). `StageResult.metrics["activation_memory_bytes"]`: the tensors autograd
saves in one training step of the per-worker batch at the schedule's largest level, measured
with lofi.memory (encoder probed at T = 2 and 3 and scaled, as `lofi plan-memory` does).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from lofi.config import to_dict
from lofi.errors import LofiError
from lofi.evaluation import score_in_memory
from lofi.fidelity import FidelityLevel, FidelitySchedule
from lofi.heads import build_head
from lofi.memory_plan import saved_bytes_by_level
from lofi.models.checkpoints import encoder_state
from lofi.models.encoders import TALModel, build_encoder, collapsed_levels
from lofi.postprocess import detection_entries
from pipelines.data import shards, tensors
from pipelines.data.batches import (VIDEO_BATCH_COLUMNS, VideoLabel, add_video_index, batch_targets, index_videos,
                               read_video_labels, tal_batch_loss, video_seed)
from pipelines.data.manifests import ShardLevel, ShardManifest
from pipelines.cluster import connect_ray
from pipelines.config import PipelineConfig, StageResult
from pipelines.stages.provenance import origin_file
from pipelines.storage import local_file
from pipelines.trainer import (StepOutput, WorkerContext, all_reduce, epoch_history, final_state, finish_stage, fit,
                               fits_in_memory, log_training, stage_tracker, table_dataset, torch_bytes, worker_loop,
                               write_outputs)

STAGE = "train"
LOSS_KEYS = ("boundary", "iou_cls", "iou_reg", "classes", "total")


# 1. inputs ---------------------------------------------------------------------------------

def check_levels(cfg: PipelineConfig) -> tuple[ShardManifest, list[str]]:
    """(manifest, problems): each schedule level must be prepared at its T/F/S with whole-video rows."""
    if not cfg.data.shards:
        raise LofiError("data.shards is empty: set it to the output folder of `lofi prepare` (--set data.shards=DIR)")
    manifest = shards.read_manifest(cfg.data.shards)
    where = f"{cfg.data.shards}/{shards.MANIFEST}"
    entries = {entry.name: entry for entry in manifest.levels}
    problems = []
    for level in FidelitySchedule(cfg.fidelity).levels():
        entry = entries.get(shard_level(manifest, level))
        if entry is None:
            problems.append(f"{where}: no level {level.name!r}, which fidelity.kind={cfg.fidelity.kind} trains on "
                            f"(levels there: {', '.join(entries)}); add a level named {level.name} to the prepare "
                            "config's levels, or choose another fidelity.kind")
            continue
        if entry.num_snippets is None:
            problems.append(f"{where}: level {level.name!r} has a fixed stride (snippet_stride_sec), so videos differ "
                            f"in T; end-to-end training needs num_snippets: {level.num_snippets}")
            continue
        stored = shards.grid_level(entry)
        for key in ("num_snippets", "frames_per_snippet", "size_px", "frame_grid"):
            if getattr(stored, key) != getattr(level, key):
                field = "spacing_snippets" if key == "frame_grid" else key
                have = getattr(entry, field)
                problems.append(f"{where}: level {level.name!r}: {field} is {have} in the shards but "
                                f"{getattr(level, field)} in the fidelity schedule; prepare it with {field}: "
                                f"{getattr(level, field)}, or --set fidelity.overrides.{level.name}.{field}={have}")
        problems += _chunk_problems(cfg, entry)
    return manifest, problems


def _chunk_problems(cfg: PipelineConfig, entry: ShardLevel) -> list[str]:
    """Training batches whole videos: every row of the level must be a video's only chunk."""
    import pyarrow.compute as pc

    table = shards.read_level_table(cfg.data.shards, entry.name, ["video_id", "num_chunks"])
    chunked = sorted(set(table.filter(pc.greater(table.column("num_chunks"), 1)).column("video_id").to_pylist()))
    if not chunked:
        return []
    frame_mib = entry.num_snippets * entry.frames_per_snippet * entry.size_px ** 2 * 3 / 2**20
    return [f"{cfg.data.shards}: level {entry.name!r}: videos {', '.join(chunked[:5])}"
            f"{' ...' if len(chunked) > 5 else ''} are split into chunks (num_chunks > 1; rows hold "
            f"{entry.snippets_per_row} of {entry.num_snippets} snippets), but training needs whole videos per "
            f"row: rerun `lofi prepare --overwrite` with max_row_mib above {frame_mib:.1f} (one video's frames)"]


def shard_level(manifest: ShardManifest, level: FidelityLevel) -> str:
    """The shard level a schedule level is read from: the one of the same name, else one prepared at the
    same T, F and S under another name (a sweep prepares variants of a level, e.g. s_lofi at 32 and 48 px,
    side by side as s_lofi-t32f4s32, s_lofi-t32f4s48); the name itself when there is none."""
    def same(entry: ShardLevel) -> bool:
        return entry.num_snippets is not None and shards.grid_level(entry).same_frames(level)

    named = manifest.level(level.name)
    if named is not None and same(named):
        return level.name
    return next((e.name for e in manifest.levels if same(e)), level.name)


def eval_level(cfg: PipelineConfig, manifest: ShardManifest, levels: tuple[FidelityLevel, ...]) -> FidelityLevel:
    """The level validation runs at and whose T is the head's grid: `data.full_level` (what the encoder
    is used at later) when its rows are whole videos on a fixed grid, else the schedule's finest level."""
    full = manifest.level(cfg.data.full_level)
    if full is not None and full.num_snippets is not None and full.snippets_per_row == full.num_snippets:
        return shards.grid_level(full)
    return max(levels, key=lambda level: (level.num_snippets, level.pixels_per_video()))


def video_dataset(cfg: PipelineConfig, level: str, subset: str, index: dict[str, int]) -> Any:
    """Ray Dataset of one level's whole-video rows of a subset: frames, video_index, duration_sec."""
    import pyarrow.compute as pc
    from ray.data.expressions import col

    entry, _ = shards.level_files(cfg.data.shards, level)
    if fits_in_memory(cfg, entry.frames * entry.size_px ** 2 * 3):  # all subsets: an upper bound
        table = shards.read_level_table(cfg.data.shards, level)
        table = table.filter(pc.equal(table.column("subset"), subset))
        rows = add_video_index(table.select(["video_id", "duration_sec"]), index)
        rows = rows.append_column("frames", tensors.tensor_column(tensors.frames_array(table)))
        return table_dataset(rows.select(list(VIDEO_BATCH_COLUMNS)))
    ds = shards.read_level_dataset(cfg.data.shards, level, columns=("video_id", "subset", "duration_sec", "frames"))
    ds = ds.filter(expr=col("subset") == subset)
    ds = ds.map_batches(add_video_index, batch_format="pyarrow", fn_kwargs={"index": index})
    return ds.select_columns(list(VIDEO_BATCH_COLUMNS))


# 2. the worker loop --------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainLoopConfig:
    """What stage 2's workers need beyond the PipelineConfig; plain data across the Ray boundary."""

    labels: dict[int, VideoLabel]  # video index (the rows' video_index) -> ground truth
    label_names: tuple[str, ...]
    head_snippets: int  # the head's grid T: every level's features are resampled to it
    val_level: FidelityLevel | None  # the level validation runs at; None: no validation videos
    activation_memory: dict[str, int]  # level name -> planned activation bytes per worker step

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainLoopConfig":
        return cls({int(i): VideoLabel(**v) for i, v in d["labels"].items()}, tuple(d["label_names"]),
                   int(d["head_snippets"]), FidelityLevel(**d["val_level"]) if d["val_level"] else None,
                   {str(k): int(v) for k, v in d["activation_memory"].items()})


class TrainLoop:
    name = STAGE
    samples = "videos"

    def __init__(self, config: TrainLoopConfig) -> None:
        self.labels = dict(config.labels)
        self.num_classes, self.head_snippets = config.num_classes, config.head_snippets
        self.label_names = list(config.label_names)
        self.memory = dict(config.activation_memory)
        self.val_level = config.val_level
        self.schedule: FidelitySchedule | None = None
        self.epoch_level: FidelityLevel | None = None

    def build_model(self, ctx: WorkerContext) -> nn.Module:
        self.schedule = FidelitySchedule(ctx.cfg.fidelity)
        enc_cfg = ctx.cfg.stage2_encoder()
        checkpoint = local_file(enc_cfg.checkpoint, "encoder.checkpoint")  # a URI: a node-local copy
        encoder = build_encoder(dataclasses.replace(enc_cfg, checkpoint=checkpoint))
        head = build_head(ctx.cfg.head, encoder.feature_dim, self.head_snippets, self.num_classes)
        return TALModel(encoder, head, self.head_snippets)

    def param_groups(self, model: nn.Module, optim: Any) -> list[dict[str, Any]]:
        encoder = [p for p in model.encoder.parameters() if p.requires_grad]
        groups = [{"params": list(model.head.parameters()), "name": "head"}]
        if encoder:  # frozen_stages=5 leaves none
            groups.append({"params": encoder, "name": "encoder", "lr": optim.lr * optim.encoder_lr_scale})
        return groups

    def epoch_batches(self, ctx: WorkerContext, epoch: int, global_batch: int) -> Iterator[Any]:
        levels = self.schedule.levels()
        self.epoch_level = self.schedule.level_at(epoch, global_batch)
        if ctx.cfg.fidelity.cycle == "epoch" or len(levels) == 1:
            for batch in ctx.batches(f"train/{self.epoch_level.name}", epoch, train=True):
                yield self.epoch_level, batch
            return
        # A short cycle switches level every few batches. Each level's split is advanced only at its
        # turns, so no row is read that is not trained on, and the epoch ends when every level's
        # pass is done. DDP: a level's split has the same number of rows on every worker (the
        # equal split), so every worker finds it used up, and switches level, at the same step.
        streams = [iter(ctx.batches(f"train/{level.name}", epoch, train=True)) for level in levels]
        done: set[int] = set()
        while len(done) < len(levels):
            position = self.schedule.position(epoch, global_batch, done)
            batch = next(streams[position], None)
            if batch is None:
                done.add(position)
                continue
            self.epoch_level = levels[position]
            global_batch += 1
            yield self.epoch_level, batch

    def step(self, ctx: WorkerContext, model: nn.Module, batch: Any, epoch: int) -> StepOutput:
        level, data = batch
        indices = data["video_index"].tolist()
        targets = batch_targets(indices, self.labels, self.head_snippets, ctx.cfg.head, self.num_classes)
        out = model(data["frames"])
        seeds = [video_seed(ctx.cfg.run.seed, epoch, i) for i in indices]
        losses = tal_batch_loss(ctx.cfg.head, out, targets.to(ctx.device), seeds)
        frames = len(indices) * level.num_snippets * level.frames_per_snippet
        return StepOutput(losses, len(indices), frames, level.name)

    def validate(self, ctx: WorkerContext, model: nn.Module, epoch: int) -> dict[str, Any]:
        level = self.epoch_level
        info = {"level_num_snippets": level.num_snippets, "level_frames_per_snippet": level.frames_per_snippet,
                "level_size_px": level.size_px} if level else {}
        if level and self.memory:  # a short cycle trains every level within the epoch: the largest counts
            trained = [level.name] if ctx.cfg.fidelity.cycle == "epoch" else list(self.memory)
            info["activation_memory_bytes"] = float(max(self.memory[name] for name in trained))
        if self.val_level is None:
            return info
        sums = {key: 0.0 for key in LOSS_KEYS} | {"videos": 0.0}
        results: dict[str, list[dict[str, Any]]] = {}
        for data in ctx.batches("val", epoch, train=False):
            indices = data["video_index"].tolist()
            targets = batch_targets(indices, self.labels, self.head_snippets, ctx.cfg.head, self.num_classes)
            out = model(data["frames"])
            # a fixed seed per video (epoch -1): the validation loss moves only with the model
            losses = tal_batch_loss(ctx.cfg.head, out, targets.to(ctx.device),
                                    [video_seed(ctx.cfg.run.seed, -1, i) for i in indices])
            for key in LOSS_KEYS:
                sums[key] += float(losses[key]) * len(indices)
            sums["videos"] += len(indices)
            videos = [self.labels[i] for i in indices]
            results.update(detection_entries(out, [v.video_id for v in videos], [v.duration_sec for v in videos],
                                             self.label_names, ctx.cfg.head.top_k_classes, ctx.cfg.detect.top_k,
                                             ctx.cfg.detect.soft_nms_sigma))
        sums = all_reduce(sums, ctx.device)
        if not sums["videos"]:
            return info
        losses = {f"val_loss_{k}": sums[k] / sums["videos"] for k in LOSS_KEYS}
        return info | losses | self._val_map(ctx, results)

    def _val_map(self, ctx: WorkerContext, results: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
        """The end-to-end model's own detections on the validation videos, scored as `lofi detect`
        scores the retrained head's: the per-epoch mAP a sweep optimises (val_average_mAP)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, results)  # a few KB of entries per video
            results = {vid: entries for part in gathered for vid, entries in part.items()}
        videos = [v for v in self.labels.values() if v.video_id in results]
        scored = score_in_memory(videos, self.label_names, results, ctx.cfg.detect.protocol)
        metrics = {"val_average_mAP": scored["average_mAP"]}
        metrics.update({f"val_mAP_tIoU_{t:.2f}": m for t, m in zip(scored["tiou_thresholds"], scored["mAP"])})
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])


def _loop(config: dict[str, Any]) -> None:
    worker_loop(TrainLoop(TrainLoopConfig.from_dict(config["loop"])), config)


# 3. the stage --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainPlan:
    """What the driver derives before training: the shards' manifest, the schedule's levels, the
    video index the rows carry, and the workers' loop config."""

    manifest: ShardManifest
    levels: tuple[FidelityLevel, ...]
    index: dict[str, int]  # video id -> video index
    loop: TrainLoopConfig


def _plan(cfg: PipelineConfig) -> TrainPlan:
    """Everything the driver checks and derives before training; all problems at once."""
    manifest, problems = check_levels(cfg)
    levels = FidelitySchedule(cfg.fidelity).levels()
    labels: dict[str, VideoLabel] = {}
    for level in levels:
        if not problems:
            labels.update(read_video_labels(shards.level_files(cfg.data.shards, shard_level(manifest, level))[1]))
    train = [v for v in labels.values() if v.subset == cfg.data.train_subset]
    if not problems and len(train) < cfg.train.batch_size:
        problems.append(f"{cfg.data.shards}: {len(train)} videos of subset {cfg.data.train_subset!r}, fewer than "
                        f"train.batch_size={cfg.train.batch_size}; lower train.batch_size or set data.train_subset")
    if not manifest.labels:
        problems.append(f"{cfg.data.shards}/{shards.MANIFEST}: no class labels; the annotations hold no segments")
    try:
        cfg.train.per_worker_batch(cfg.scaling.num_workers)
    except ValueError as err:
        problems.append(f"train.batch_size: {err}")
    if problems:
        raise LofiError(f"lofi train cannot start ({len(problems)} problem(s)):\n  - " + "\n  - ".join(problems))
    index, by_index = index_videos(labels)
    has_val = any(v.subset == cfg.data.val_subset for v in labels.values())
    val_level = eval_level(cfg, manifest, levels)
    for line in collapsed_levels(cfg.encoder, {lv.name: lv.size_px for lv in levels}, val_level.size_px):
        print(f"lofi train: warning: {line}", flush=True)
    memory = saved_bytes_by_level(cfg.stage2_encoder(), cfg.head, levels, len(manifest.labels),
                                  cfg.train.per_worker_batch(cfg.scaling.num_workers),
                                  head_snippets=val_level.num_snippets)
    return TrainPlan(manifest, tuple(levels), index, TrainLoopConfig(
        dict(by_index), tuple(manifest.labels), val_level.num_snippets, val_level if has_val else None,
        {name: int(v) for name, v in memory.items()}))


def output_files(cfg: PipelineConfig, state: dict[str, Any], plan: TrainPlan) -> dict[str, tuple[str, bytes]]:
    """encoder.pt, model.pt, model.json and encoder_origin.json of the final state, as {name: (file name, bytes)}."""
    model = state["model"]
    model_config = {
        "encoder": to_dict(dataclasses.replace(cfg.encoder, checkpoint=None)), "head": to_dict(cfg.head),
        "head_snippets": plan.loop.head_snippets, "num_classes": plan.loop.num_classes,
        "labels": list(plan.manifest.labels), "fidelity": to_dict(cfg.fidelity), "epochs": state["epoch"] + 1,
    }
    return {"encoder": ("encoder.pt", torch_bytes(encoder_state(model))), "model": ("model.pt", torch_bytes(model)),
            "model_config": ("model.json", json.dumps(model_config, indent=1).encode()),
            "encoder_origin": origin_file(cfg.encoder.checkpoint)}


def _log_encoder(tracker: Any, cfg: PipelineConfig, weights: dict[str, torch.Tensor],
                 levels: tuple[FidelityLevel, ...]) -> None:
    # plain float32 inference: what a user of the logged model runs, on any device
    encoder = build_encoder(dataclasses.replace(cfg.encoder, checkpoint=None, amp_dtype="none",
                                                activation_checkpointing=()))
    encoder.load_state_dict(weights)
    level = max(levels, key=lambda lv: lv.pixels_per_video())
    example = torch.zeros(1, 2, level.frames_per_snippet, level.size_px, level.size_px, 3, dtype=torch.uint8)
    tracker.log_torch_model(encoder.eval(), "encoder", input_example=example, dynamic_dims=(0, 1))


# The config sections this stage's output depends on: `lofi pipeline` reruns it when one changes.
CONFIG_SECTIONS = ("run.seed", "data", "encoder", "head", "fidelity", "train", "scaling")


def run(cfg: PipelineConfig, parent_run_id: str | None = None, callbacks: tuple[Any, ...] = ()) -> StageResult:
    """Stage 2: LoFi training of encoder + head; writes <run>/train/encoder.pt and model.pt.
    `callbacks`: Ray Train callbacks (a sweep trial passes Tune's TuneReportCallback)."""
    start = time.perf_counter()
    plan = _plan(cfg)
    levels, loop = plan.levels, plan.loop
    memory = max(loop.activation_memory.values())
    connect_ray(cfg.ray)
    with stage_tracker(cfg, STAGE, parent_run_id) as tracker:
        tracker.log_config(cfg)
        datasets = {f"train/{lv.name}": video_dataset(cfg, shard_level(plan.manifest, lv), cfg.data.train_subset,
                                                      plan.index) for lv in levels}
        if loop.val_level is not None:
            datasets["val"] = video_dataset(cfg, loop.val_level.name, cfg.data.val_subset, plan.index)
        result = fit(cfg, STAGE, _loop, loop, datasets, callbacks=callbacks, tracker=tracker)  # rank 0 logs epochs live
        state = final_state(result)
        history = epoch_history(result, state)
        log_training(tracker, history)
        tracker.log_metrics({"activation_memory_bytes": float(memory)}, step=0)
        out = cfg.run.stage_location(STAGE)
        artifacts = write_outputs(out, output_files(cfg, state, plan), tracker)
        _log_encoder(tracker, cfg, encoder_state(state["model"]), levels)
        run_id = tracker.run_id
    return finish_stage(cfg, STAGE, start, history, artifacts, out, run_id,
                        {"activation_memory_bytes": float(memory)})
