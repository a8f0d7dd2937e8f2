"""`lofi pretrain`: stage 1, clip classification pre-training of the encoder on trimmed clips.

Two sources of clips (`pipelines.data.batches.snippet_clips` cuts both, one clip per snippet):

- `data.pretrain_shards` (as in the paper, where stage 1 is Kinetics): the `lofi prepare`
  output of a separate set of labelled trimmed clips, e.g. a Kinetics-style CSV
  (`label,youtube_id,time_start,time_end,split`, files `<youtube_id>_<start>_<end>.mp4`) or
  `lofi synth-clips`. Each clip file is one segment of its class; prepared at T=1 it is one
  clip of F frames. `data.pretrain_level` names the level (empty: the only one, else
  `data.full_level`). Every epoch the classifier is also scored on the snippets of the TAL
  validation videos of `data.shards` at `data.full_level` (classes matched by name, background
  snippets left out): how well what it learnt transfers to the videos it will localise in.
- otherwise, the TAL training videos of `data.shards` themselves: every snippet whose centre
  lies inside a ground-truth segment is a clip of that segment's class; with
  `data.pretrain_background` the snippets outside every segment form one more class,
  "background" (id K): the TAL head needs features that tell action from non-action (cf. TSP,
  Alwassel et al. 2021). Turn it off where background swamps the actions (THUMOS14, ~70%).

Training: class-balanced cross-entropy (`data.pretrain_balanced`: weight N / (K * n_k) per
class, from the training clips' labels); label-preserving augmentation (`lofi.clips`): a
random window of `data.pretrain_clip_frames` consecutive frames of a longer stored clip
(temporal jitter; validation takes the centred window) and random crops of
`[data.pretrain_min_crop_scale, 1]` of the frame resized back (scale jitter), and with
`data.pretrain_min_side_scale` < 1 each batch resized to a random side in [that, 1] of the
frame's (multi-scale training: the sizes spatially reduced fidelity levels show). No horizontal
flip: it would turn move_left into move_right. Validation reports, every epoch, accuracy,
balanced accuracy and each class's recall (`val_*` on held-out clips, `val_tal_*` on the TAL
validation snippets), and where it puts the TAL validation videos' background snippets
(`val_tal_background_as_<class>`, `val_tal_background_top_share`): a classifier with no
background class calls them something, and the class that takes most of them is one it tells
apart by elimination, so its frozen features will not separate that action from background.

The model is `lofi.models.encoders.ClipClassifier` (the encoder's clip feature, dropout and
a linear layer) trained by the shared harness (pipelines/trainer: DDP, checkpoints every
epoch, resume, metrics). The encoder starts from `encoder.checkpoint` (e.g. ImageNet or
Kinetics weights) or from scratch when it is empty.

Writes `<run>/pretrain/encoder.pt`: the encoder's state dict in lofi naming (`backbone.*`),
which `encoder.checkpoint` of the later stages loads; and `classes.json` (the classifier's
class names, background last when used, and the training clips per class).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from lofi.clips import (class_weights, classification_metrics, random_resized_crop, random_side, recall_counts,
                        temporal_window)
from lofi.errors import LofiError
from lofi.models.checkpoints import encoder_state
from lofi.models.encoders import ClipClassifier, build_encoder
from pipelines.data import shards
from pipelines.data.batches import CLIP_COLUMNS, numpy_batch, read_video_labels, snippet_clips, snippet_labels
from pipelines.data.tensors import tensor_column
from pipelines.cluster import connect_ray
from pipelines.config import PipelineConfig, StageResult
from pipelines.stages.provenance import origin_file
from pipelines.storage import local_file
from pipelines.trainer import (StepOutput, WorkerContext, all_reduce, epoch_history, final_state, finish_stage, fit,
                               fits_in_memory, log_training, stage_tracker, table_dataset, torch_bytes, worker_loop,
                               write_outputs)

STAGE = "pretrain"
BACKGROUND_SET = "val_tal_background"  # the TAL validation videos' background snippets


@dataclass(frozen=True)
class ClipSource:
    """Where a set of clips comes from: a shard folder, a level, and how snippets are labelled."""

    shards: str
    level: str
    background: bool  # snippets outside every segment are clips of class "background" (id K)
    label_map: tuple[int, ...] | None = None  # shard label id -> classifier id (-1: dropped)

    def kwargs(self, num_actions: int) -> dict[str, Any]:
        return {"num_classes": num_actions, "background": self.background,
                "label_map": list(self.label_map) if self.label_map is not None else None}


def train_source(cfg: PipelineConfig) -> ClipSource:
    """Stage 1's training clips: `data.pretrain_shards` (trimmed clips) or the TAL videos' snippets."""
    if not cfg.data.pretrain_shards:
        if not cfg.data.shards:
            raise LofiError("data.shards and data.pretrain_shards are empty: set data.pretrain_shards to the `lofi "
                            "prepare` output of a trimmed-clip set, or data.shards to that of the TAL videos")
        return ClipSource(cfg.data.shards, cfg.data.pretrain_level or cfg.data.full_level, cfg.data.pretrain_background)
    levels = [e.name for e in shards.read_manifest(cfg.data.pretrain_shards).levels]
    level = cfg.data.pretrain_level or (levels[0] if len(levels) == 1 else cfg.data.full_level)
    return ClipSource(cfg.data.pretrain_shards, level, background=False)


def tal_val_source(cfg: PipelineConfig, names: list[str]) -> ClipSource | None:
    """The TAL validation videos' snippets at data.full_level, labelled in the classifier's
    classes (matched by name), when stage 1 trains on a separate clip set; else None."""
    if not cfg.data.pretrain_shards or not cfg.data.shards:
        return None
    tal_labels = shards.read_manifest(cfg.data.shards).labels
    index = {name: k for k, name in enumerate(names)}
    label_map = tuple(index.get(name, -1) for name in tal_labels)
    if all(k < 0 for k in label_map):
        return None
    return ClipSource(cfg.data.shards, cfg.data.full_level, background=False, label_map=label_map)


def tal_background_source(tal_val: ClipSource) -> ClipSource:
    """The TAL validation videos' background snippets (in no segment), labelled `num_actions`: what the
    classifier calls a snippet where nothing acts (a metric of its own: it has no background class)."""
    return dataclasses.replace(tal_val, background=True, label_map=tuple(-1 for _ in tal_val.label_map))


def _subset_counts(source: ClipSource) -> dict[str, int]:
    counts: dict[str, int] = {}
    for label in read_video_labels(shards.level_files(source.shards, source.level)[1]).values():
        counts[label.subset] = counts.get(label.subset, 0) + 1
    return counts


def check_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """Class names, sources and videos per subset; every problem found is reported at once."""
    source = train_source(cfg)
    manifest = shards.read_manifest(source.shards)
    key = "data.pretrain_shards" if cfg.data.pretrain_shards else "data.shards"
    try:
        counts = _subset_counts(source)
    except LofiError as err:
        raise LofiError(f"{err}; set data.pretrain_level (or data.full_level) to one of them") from None
    problems = []
    if not manifest.labels:
        problems.append(f"{source.shards}/manifest.json ({key}): no class labels; the annotations hold no segments")
    if not counts.get(cfg.data.train_subset):
        problems.append(f"{source.shards} ({key}): level {source.level!r} has no video of subset "
                        f"{cfg.data.train_subset!r} (subsets: {counts}); set data.train_subset")
    names = list(manifest.labels) + (["background"] if source.background else [])
    tal_val = None
    if cfg.data.pretrain_shards and cfg.data.shards:
        try:
            tal_val = tal_val_source(cfg, names)
            if tal_val is not None and not _subset_counts(tal_val).get(cfg.data.val_subset):
                tal_val = None
        except LofiError as err:
            problems.append(f"data.shards (scored every epoch on its validation videos): {err}")
    if problems:
        raise LofiError("; ".join(problems))
    return {"names": names, "source": source, "counts": counts, "tal_val": tal_val}


def clip_table(source: ClipSource, subset: str, num_actions: int) -> dict[str, np.ndarray]:
    """The labelled clips of one subset read with pyarrow: clip (M, F, S, S, 3) uint8, label (M,)."""
    import pyarrow.compute as pc

    table = shards.read_level_table(source.shards, source.level)
    table = table.filter(pc.equal(table.column("subset"), subset))
    return snippet_clips(numpy_batch(table), **source.kwargs(num_actions))


def clip_dataset(cfg: PipelineConfig, source: ClipSource, subset: str, num_actions: int) -> Any:
    """Ray Dataset of labelled clips (clip (F, S, S, 3) uint8, label int64) of one subset."""
    import pyarrow as pa
    from ray.data.expressions import col

    entry, _ = shards.level_files(source.shards, source.level)
    if fits_in_memory(cfg, entry.frames * entry.size_px ** 2 * 3):  # all subsets: an upper bound
        clips = clip_table(source, subset, num_actions)
        return table_dataset(pa.table({"clip": tensor_column(clips["clip"]), "label": clips["label"]}))
    ds = shards.read_level_dataset(source.shards, source.level, columns=None)
    ds = ds.filter(expr=col("subset") == subset)
    ds = ds.map_batches(snippet_clips, batch_format="numpy", fn_kwargs=source.kwargs(num_actions))
    return ds.select_columns(list(CLIP_COLUMNS))


def clip_val_subset(cfg: PipelineConfig, counts: dict[str, int]) -> str:
    """The held-out clips stage 1 is scored on: data.val_subset's; a separate clip set scored while the TAL
    videos' tuning split is the validation subset (a choice being made) keeps its own validation clips."""
    if counts.get(cfg.data.val_subset):
        return cfg.data.val_subset
    return "validation" if cfg.data.pretrain_shards and counts.get("validation") else ""


def label_counts(source: ClipSource, subset: str, num_actions: int, num_outputs: int) -> list[int]:
    """Clips per class of one subset, from the shards' small columns (no frame is read)."""
    import pyarrow.compute as pc

    columns = ["subset", "timestamps_sec", "num_valid_snippets", "segment_start_sec", "segment_end_sec",
               "segment_label_id"]
    table = shards.read_level_table(source.shards, source.level, columns)
    table = table.filter(pc.equal(table.column("subset"), subset))
    batch = {name: (table.column(name).combine_chunks().to_numpy_ndarray() if name == "timestamps_sec" else
                    np.array(table.column(name).to_pylist() + [None], dtype=object)[:-1])
             for name in columns[1:]}
    _, _, labels = snippet_labels(batch, **source.kwargs(num_actions))
    return np.bincount(labels, minlength=num_outputs).tolist()


@dataclass(frozen=True)
class PretrainLoopConfig:
    """What stage 1's workers need beyond the PipelineConfig; plain data across the Ray boundary."""

    class_names: tuple[str, ...]
    val_sets: dict[str, str]  # dataset name -> metric prefix
    class_weights: tuple[float, ...] | None = None  # data.pretrain_balanced: per-class loss weights

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PretrainLoopConfig":
        weights = d.get("class_weights")
        return cls(tuple(d["class_names"]), dict(d["val_sets"]), None if weights is None else tuple(weights))


class PretrainLoop:
    name = STAGE
    samples = "clips"

    def __init__(self, config: PretrainLoopConfig) -> None:
        self.names = list(config.class_names)
        self.num_outputs = len(self.names)
        self.val_sets = dict(config.val_sets)
        self.weights = None if config.class_weights is None else list(config.class_weights)

    def build_model(self, ctx: WorkerContext) -> nn.Module:
        checkpoint = local_file(ctx.cfg.encoder.checkpoint, "encoder.checkpoint")  # a URI: a node-local copy
        encoder = build_encoder(dataclasses.replace(ctx.cfg.encoder, checkpoint=checkpoint))
        return ClipClassifier(encoder, self.num_outputs)

    def param_groups(self, model: nn.Module, optim: Any) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "name": "classifier"}]

    def epoch_batches(self, ctx: WorkerContext, epoch: int, global_batch: int) -> Iterator[Any]:
        return iter(ctx.batches("train", epoch, train=True))

    def step(self, ctx: WorkerContext, model: nn.Module, batch: Any, epoch: int) -> StepOutput:
        data = ctx.cfg.data
        clips = temporal_window(batch["clip"], data.pretrain_clip_frames, jitter=True)  # (B, F, S, S, 3) uint8
        side = random_side(clips.shape[2], data.pretrain_min_side_scale)  # one size per batch: clips stack
        clips = random_resized_crop(clips, data.pretrain_min_crop_scale, side)
        weight = torch.tensor(self.weights, dtype=torch.float32, device=clips.device) if self.weights else None
        loss = F.cross_entropy(model(clips), batch["label"], weight=weight)
        return StepOutput({"total": loss}, clips.shape[0], clips.shape[0] * clips.shape[1])

    def validate(self, ctx: WorkerContext, model: nn.Module, epoch: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, prefix in self.val_sets.items():
            if name == BACKGROUND_SET:
                out.update(self._background_shares(ctx, model, epoch, prefix))
                continue
            sums = {"loss": 0.0} | {f"correct{k}": 0.0 for k in range(self.num_outputs)} | {
                f"support{k}": 0.0 for k in range(self.num_outputs)}
            for batch in ctx.batches(name, epoch, train=False):
                logits = model(temporal_window(batch["clip"], ctx.cfg.data.pretrain_clip_frames, jitter=False))
                sums["loss"] += float(F.cross_entropy(logits, batch["label"], reduction="sum"))
                correct, support = recall_counts(logits, batch["label"], self.num_outputs)
                for k in range(self.num_outputs):
                    sums[f"correct{k}"] += correct[k]
                    sums[f"support{k}"] += support[k]
            sums = all_reduce(sums, ctx.device)
            correct = np.array([sums[f"correct{k}"] for k in range(self.num_outputs)])
            support = np.array([sums[f"support{k}"] for k in range(self.num_outputs)])
            metrics = classification_metrics(correct, support, self.names, prefix)
            if metrics:
                metrics[f"{prefix}loss_total"] = sums["loss"] / support.sum()
            out.update(metrics)
        return out

    def _background_shares(self, ctx: WorkerContext, model: nn.Module, epoch: int, prefix: str) -> dict[str, float]:
        """Where the classifier puts the TAL videos' background snippets: the share predicted as each class
        (`<prefix>as_<class>`) and the largest share (`<prefix>top_share`). A class that takes most of
        them is the one it tells apart by elimination ("nothing else happens"): frozen features will not
        separate that action from background, which a TAL head must."""
        sums = {f"as{k}": 0.0 for k in range(self.num_outputs)}
        for batch in ctx.batches(BACKGROUND_SET, epoch, train=False):
            logits = model(temporal_window(batch["clip"], ctx.cfg.data.pretrain_clip_frames, jitter=False))
            counts = np.bincount(logits.argmax(dim=1).cpu().numpy(), minlength=self.num_outputs)
            for k in range(self.num_outputs):
                sums[f"as{k}"] += float(counts[k])
        sums = all_reduce(sums, ctx.device)
        total = sum(sums.values())
        if not total:
            return {}
        shares = {f"{prefix}as_{name}": sums[f"as{k}"] / total for k, name in enumerate(self.names)}
        return shares | {f"{prefix}top_share": max(shares.values()), f"{prefix}snippets": total}

    def state_dict(self) -> dict[str, Any]:
        return {"num_outputs": self.num_outputs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_outputs") != self.num_outputs:
            raise LofiError(f"the stage-1 checkpoint has {state.get('num_outputs')} classes, the data "
                            f"{self.num_outputs} "
                            "(data.pretrain_background or the labels changed); use a new run.name")


def _loop(config: dict[str, Any]) -> None:
    worker_loop(PretrainLoop(PretrainLoopConfig.from_dict(config["loop"])), config)


# The config sections this stage's output depends on: `lofi pipeline` reruns it when one changes.
CONFIG_SECTIONS = ("run.seed", "data", "encoder", "pretrain", "scaling")


def run(cfg: PipelineConfig, parent_run_id: str | None = None) -> StageResult:
    """Stage 1: train the clip classifier; write <run>/pretrain/encoder.pt."""
    start = time.perf_counter()
    inputs = check_inputs(cfg)
    names, source, tal_val = inputs["names"], inputs["source"], inputs["tal_val"]
    num_actions = len(names) - int(source.background)
    connect_ray(cfg.ray)
    out_dir = cfg.run.stage_location(STAGE)
    with stage_tracker(cfg, STAGE, parent_run_id) as tracker:
        tracker.log_config(cfg)
        datasets = {"train": clip_dataset(cfg, source, cfg.data.train_subset, num_actions)}
        val_sets = {}
        held_out = clip_val_subset(cfg, inputs["counts"])
        if held_out:
            datasets["val"] = clip_dataset(cfg, source, held_out, num_actions)
            val_sets["val"] = "val_"
        if tal_val is not None:  # the TAL validation videos' snippets, in the classifier's classes
            datasets["val_tal"] = clip_dataset(cfg, tal_val, cfg.data.val_subset, num_actions)
            val_sets["val_tal"] = "val_tal_"
            # and their background snippets: which class the classifier takes for "nothing acts"
            datasets[BACKGROUND_SET] = clip_dataset(cfg, tal_background_source(tal_val), cfg.data.val_subset,
                                                    num_actions)
            val_sets[BACKGROUND_SET] = "val_tal_background_"
        counts = label_counts(source, cfg.data.train_subset, num_actions, len(names))
        weights = class_weights(counts) if cfg.data.pretrain_balanced else None
        loop = PretrainLoopConfig(tuple(names), val_sets, None if weights is None else tuple(weights))
        result = fit(cfg, STAGE, _loop, loop, datasets, tracker=tracker)  # rank 0 logs epochs live
        state = final_state(result)
        history = epoch_history(result, state)
        log_training(tracker, history)
        classes = {"classes": names, "train_clips_per_class": dict(zip(names, counts)), "shards": source.shards,
                   "level": source.level}
        artifacts = write_outputs(out_dir, {"encoder": ("encoder.pt", torch_bytes(encoder_state(state["model"]))),
                                            "classes": ("classes.json", json.dumps(classes, indent=1).encode()),
                                            "encoder_origin": origin_file(cfg.encoder.checkpoint,
                                                                          cfg.data.pretrain_shards or None)},
                                  tracker)
        run_id = tracker.run_id
    return finish_stage(cfg, STAGE, start, history, artifacts, out_dir, run_id)
