"""`lofi pretrain`: stage 1, clip classification of the encoder on trimmed clips of the training videos.

Clips come from the shards of one level (`data.pretrain_level`, empty: `data.full_level`):
every snippet of a training video whose centre lies inside a ground-truth segment is a clip
of its F frames, labelled with that segment's class (the first segment in annotation order
when segments overlap); see `pipelines.batches.snippet_clips`. Rows may be chunks and the
level may have a fixed stride: clips are per snippet, so any level works.

Background: with `data.pretrain_background` (the default) the snippets outside every segment
form one more class, "background" (id K after the K action classes). Stage 2 and the TAL
head need features that tell action from non-action, which a classifier that only ever sees
action clips has no reason to learn (cf. TSP, Alwassel et al. 2021, which pre-trains with an
action/background signal for the same reason). Turn it off for datasets whose background
would swamp the actions (e.g. THUMOS14, ~70% background): the classifier then sees
actions only.

The model is `lofi.models.encoders.ClipClassifier` (the encoder's clip feature, dropout and
a linear layer), trained with cross-entropy by the shared harness (pipelines/trainer.py:
DDP, checkpoints every epoch, resume, metrics). The encoder starts from `encoder.checkpoint`
(e.g. ImageNet or Kinetics weights) or from scratch when it is empty.

Writes `<run>/pretrain/encoder.pt`: the encoder's state dict in lofi naming (`backbone.*`),
which `encoder.checkpoint` of the later stages loads; and `classes.json` (the classifier's
class names, background last when used).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lofi.config import add_config_arguments, config_from_args
from lofi.errors import LofiError, cli_errors
from lofi.models.encoders import ClipClassifier, build_encoder
from pipelines import shards
from pipelines.batches import CLIP_COLUMNS, numpy_batch, read_video_labels, snippet_clips, tensor_column
from pipelines.cluster import connect_ray
from pipelines.config import PipelineConfig, StageResult
from pipelines.trainer import (StepOutput, WorkerContext, all_reduce, epoch_history, final_state, finish_stage, fit,
                               fits_in_memory, log_training, stage_tracker, table_dataset, worker_loop)

STAGE = "pretrain"


def pretrain_level(cfg: PipelineConfig) -> str:
    return cfg.data.pretrain_level or cfg.data.full_level


def check_inputs(cfg: PipelineConfig) -> tuple[list[str], list[str], dict[str, int]]:
    """(class names, shard files, videos per subset); every problem found is reported at once."""
    if not cfg.data.shards:
        raise LofiError("data.shards is empty: set it to the output folder of `lofi prepare` (--set data.shards=DIR)")
    manifest = shards.read_manifest(cfg.data.shards)
    try:
        _, files = shards.level_files(cfg.data.shards, pretrain_level(cfg))
    except LofiError as err:
        raise LofiError(f"{err}; set data.pretrain_level (or data.full_level) to one of them") from None
    counts: dict[str, int] = {}
    for label in read_video_labels(files).values():
        counts[label.subset] = counts.get(label.subset, 0) + 1
    problems = []
    if not manifest["labels"]:
        problems.append(f"{cfg.data.shards}/manifest.json: no class labels; the annotations hold no segments")
    if not counts.get(cfg.data.train_subset):
        problems.append(f"{cfg.data.shards}: level {pretrain_level(cfg)!r} has no video of subset "
                        f"{cfg.data.train_subset!r} (subsets: {counts}); set data.train_subset")
    if problems:
        raise LofiError("; ".join(problems))
    names = list(manifest["labels"]) + (["background"] if cfg.data.pretrain_background else [])
    return names, files, counts


def clip_dataset(cfg: PipelineConfig, subset: str, num_classes: int) -> Any:
    """Ray Dataset of labelled clips (clip (F, S, S, 3) uint8, label int64) of one subset."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from ray.data.expressions import col

    level = pretrain_level(cfg)
    entry, _ = shards.level_files(cfg.data.shards, level)
    kwargs = {"num_classes": num_classes, "background": cfg.data.pretrain_background}
    if fits_in_memory(cfg, entry["frames"] * entry["size_px"] ** 2 * 3):  # all subsets: an upper bound
        table = shards.read_level_table(cfg.data.shards, level)
        clips = snippet_clips(numpy_batch(table.filter(pc.equal(table.column("subset"), subset))), **kwargs)
        return table_dataset(pa.table({"clip": tensor_column(clips["clip"]), "label": clips["label"]}))
    ds = shards.read_level_dataset(cfg.data.shards, level, columns=None)
    ds = ds.filter(expr=col("subset") == subset)
    ds = ds.map_batches(snippet_clips, batch_format="numpy", fn_kwargs=kwargs)
    return ds.select_columns(list(CLIP_COLUMNS))


class PretrainLoop:
    name = STAGE
    samples = "clips"

    def __init__(self, config: dict[str, Any]) -> None:
        self.num_outputs = int(config["num_outputs"])
        self.has_val = bool(config["has_val"])

    def build_model(self, ctx: WorkerContext) -> nn.Module:
        return ClipClassifier(build_encoder(ctx.cfg.encoder), self.num_outputs)

    def param_groups(self, model: nn.Module, optim: Any) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "name": "classifier"}]

    def epoch_batches(self, ctx: WorkerContext, epoch: int, global_batch: int) -> Iterator[Any]:
        return iter(ctx.batches("train", epoch, train=True))

    def step(self, ctx: WorkerContext, model: nn.Module, batch: Any, epoch: int) -> StepOutput:
        clips, labels = batch["clip"], batch["label"]  # (B, F, S, S, 3) uint8, (B,)
        loss = F.cross_entropy(model(clips), labels)
        return StepOutput({"total": loss}, clips.shape[0], clips.shape[0] * clips.shape[1])

    def validate(self, ctx: WorkerContext, model: nn.Module, epoch: int) -> dict[str, float]:
        if not self.has_val:
            return {}
        sums = {"loss": 0.0, "correct": 0.0, "clips": 0.0}
        for batch in ctx.batches("val", epoch, train=False):
            logits = model(batch["clip"])
            sums["loss"] += float(F.cross_entropy(logits, batch["label"], reduction="sum"))
            sums["correct"] += float((logits.argmax(dim=1) == batch["label"]).sum())
            sums["clips"] += batch["label"].shape[0]
        sums = all_reduce(sums, ctx.device)
        if not sums["clips"]:
            return {}
        return {"val_loss_total": sums["loss"] / sums["clips"], "val_accuracy": sums["correct"] / sums["clips"],
                "val_clips": sums["clips"]}

    def state_dict(self) -> dict[str, Any]:
        return {"num_outputs": self.num_outputs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_outputs") != self.num_outputs:
            raise LofiError(f"the stage-1 checkpoint has {state.get('num_outputs')} classes, the data "
                            f"{self.num_outputs} "
                            "(data.pretrain_background or the labels changed); use a new run.name")


def _loop(config: dict[str, Any]) -> None:
    worker_loop(PretrainLoop(config), config)


def encoder_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ClipClassifier state dict -> its VideoEncoder's (lofi naming: backbone.*)."""
    return {k[len("encoder."):]: v for k, v in model_state.items() if k.startswith("encoder.")}


def run(cfg: PipelineConfig, parent_run_id: str | None = None) -> StageResult:
    """Stage 1: train the clip classifier; write <run>/pretrain/encoder.pt."""
    start = time.perf_counter()
    names, _, counts = check_inputs(cfg)
    connect_ray(cfg.ray)
    out_dir = cfg.run.stage_dir(STAGE)
    with stage_tracker(cfg, STAGE, parent_run_id) as tracker:
        tracker.log_config(cfg)
        num_actions = len(names) - int(cfg.data.pretrain_background)
        datasets = {"train": clip_dataset(cfg, cfg.data.train_subset, num_actions)}
        has_val = bool(counts.get(cfg.data.val_subset))
        if has_val:
            datasets["val"] = clip_dataset(cfg, cfg.data.val_subset, num_actions)
        result = fit(cfg, STAGE, _loop, {"num_outputs": len(names), "has_val": has_val}, datasets)
        history = epoch_history(result)
        log_training(tracker, history)
        out_dir.mkdir(parents=True, exist_ok=True)
        artifacts = {"encoder": str(out_dir / "encoder.pt"), "classes": str(out_dir / "classes.json")}
        torch.save(encoder_state(final_state(result)["model"]), artifacts["encoder"])
        (out_dir / "classes.json").write_text(json.dumps({"classes": names, "level": pretrain_level(cfg)}, indent=1))
        for path in artifacts.values():
            tracker.log_artifact(path)
        run_id = tracker.run_id
    return finish_stage(cfg, STAGE, start, history, artifacts, out_dir, run_id)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofi pretrain",
        description="Stage 1: train the video encoder as a clip classifier on trimmed clips (one per snippet "
                    "inside a training segment, labelled with its class; plus a background class) cut from the "
                    "shards of `lofi prepare`, with Ray Train (DDP over scaling.num_workers workers, a checkpoint "
                    "every epoch; rerunning with the same run.name resumes). Writes <run.storage>/<run.name>/"
                    "pretrain/encoder.pt for encoder.checkpoint of the later stages.",
        epilog="Config keys used (YAML or --set): data.shards, data.pretrain_level (empty: data.full_level), "
               "data.pretrain_background, data.train_subset, data.val_subset; encoder.* (name, width, checkpoint, "
               "checkpoint_format, shift_div, activation_checkpointing, freeze_bn, frozen_stages, amp_dtype); "
               "pretrain.* (optimizer sgd|adamw, lr, momentum, weight_decay, epochs, lr_step_epochs, lr_gamma, "
               "batch_size (global, in clips), grad_clip_norm, shuffle_buffer_rows); run.name, run.storage, "
               "run.seed, run.max_failures, run.deterministic; scaling.num_workers, scaling.use_gpu, "
               "scaling.cpus_per_worker; tracking.*; ray.address, ray.num_cpus.")
    add_config_arguments(parser)
    return parser


@cli_errors("pretrain")
def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(PipelineConfig, build_parser().parse_args(argv))
    run(cfg)
    return 0
