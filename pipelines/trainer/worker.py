"""The worker side of the training harness: the per-epoch loop every stage runs (see pipelines.trainer)."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from lofi.config import from_dict
from lofi.errors import LofiError
from pipelines.config import OptimSection, PipelineConfig
from pipelines.trainer.numerics import all_reduce, peak_memory_bytes, rng_state, seed_epoch, set_rng_state

STATE_FILE = "state.pt"


@dataclass
class WorkerContext:
    cfg: PipelineConfig
    optim: OptimSection  # the stage's section (cfg.pretrain, cfg.train or cfg.train_head)
    rank: int
    world_size: int
    device: torch.device
    config: dict[str, Any]  # the harness's plain data from the driver; config["loop"]: the stage's loop config
    # rows this worker took from each dataset since the epoch began (`batches`): what was read, not what was
    # trained on; the harness reports the training datasets' counts as rows_read_<name>
    rows_read: dict[str, int] = field(default_factory=dict)

    @property
    def per_worker_batch(self) -> int:
        return self.optim.per_worker_batch(self.world_size)

    def batches(self, name: str, epoch: int, train: bool) -> Iterator[dict[str, torch.Tensor]]:
        """This worker's split of dataset `name` as torch batches (train: shuffled, full batches only)."""
        import ray.train

        kwargs: dict[str, Any] = {"batch_size": self.per_worker_batch, "drop_last": train}
        if train and self.optim.shuffle_buffer_rows > 0:
            kwargs.update(local_shuffle_buffer_size=self.optim.shuffle_buffer_rows,
                          local_shuffle_seed=self.cfg.run.seed + epoch)
        self.rows_read.setdefault(name, 0)  # every worker opens the same datasets: the same keys to all-reduce
        return self._counted(name, ray.train.get_dataset_shard(name).iter_torch_batches(**kwargs))

    def _counted(self, name: str, batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        for batch in batches:
            self.rows_read[name] += len(next(iter(batch.values())))
            yield batch


@dataclass
class StepOutput:
    losses: dict[str, torch.Tensor]  # means over this worker's batch; "total" is backpropagated
    num_samples: int  # videos or clips in this worker's batch
    num_frames: int
    level: str = ""  # the fidelity level of the batch, when there is one


class StageLoop(Protocol):
    name: str  # "pretrain", "train", "train_head"
    samples: str  # what a sample is, for the throughput metric name: "videos" or "clips"

    def build_model(self, ctx: WorkerContext) -> nn.Module: ...
    def param_groups(self, model: nn.Module, optim: OptimSection) -> list[dict[str, Any]]: ...
    def epoch_batches(self, ctx: WorkerContext, epoch: int, global_batch: int) -> Iterator[Any]: ...
    def step(self, ctx: WorkerContext, model: nn.Module, batch: Any, epoch: int) -> StepOutput: ...
    def validate(self, ctx: WorkerContext, model: nn.Module, epoch: int) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class _Parts:
    model: nn.Module  # as trained (DDP-wrapped with several workers)
    module: nn.Module  # unwrapped: checkpoints and validation
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    start_epoch: int = 0
    global_batch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # every finished epoch's metrics, in checkpoints
    rng: dict[str, Any] | None = field(default=None, repr=False)


def make_context(config: dict[str, Any]) -> WorkerContext:
    import ray.train
    import ray.train.torch

    cfg = from_dict(PipelineConfig, config["cfg"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    return WorkerContext(cfg, getattr(cfg, config["section"]), ctx.get_world_rank(), ctx.get_world_size(),
                         device[0] if isinstance(device, list) else device, config)


def build_optimizer(groups: list[dict[str, Any]], optim: OptimSection) -> torch.optim.Optimizer:
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)


def _setup(stage: StageLoop, ctx: WorkerContext) -> _Parts:
    """Model (restored from the latest checkpoint, if any), DDP, optimizer, scheduler, scaler."""
    import ray.train
    import ray.train.torch

    if ctx.cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_epoch(ctx.cfg.run.seed, -1, 0)  # the same initial weights on every rank and in every run
    module = stage.build_model(ctx)
    saved, rng = _read_checkpoint(ray.train.get_checkpoint(), ctx.rank)
    if saved:
        module.load_state_dict(saved["model"])
        stage.load_state_dict(saved["stage"])
    model = ray.train.torch.prepare_model(module)
    optimizer = build_optimizer(stage.param_groups(module, ctx.optim), ctx.optim)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, ctx.optim.lr_step_epochs, ctx.optim.lr_gamma)
    fp16 = ctx.cfg.encoder.amp_dtype == "fp16" and ctx.device.type == "cuda"
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=fp16)
    parts = _Parts(model, module, optimizer, scheduler, scaler, rng=rng)
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        parts.start_epoch, parts.global_batch = saved["epoch"] + 1, saved["global_batch"]
        parts.history = list(saved.get("history", []))
    return parts


def worker_loop(stage: StageLoop, config: dict[str, Any]) -> None:
    """The per-worker training function of every stage (see the module docstring)."""
    quiet_report_log()
    ctx = make_context(config)
    parts = _setup(stage, ctx)
    if parts.rng is not None:
        set_rng_state(parts.rng)
    if parts.start_epoch >= ctx.optim.epochs and ctx.rank == 0:
        say(f"lofi {stage.name.replace('_', '-')}: all {ctx.optim.epochs} epochs are done (checkpoint found); "
            "nothing to train")
    tracker = _attach_tracker(ctx, stage)
    try:
        for epoch in range(parts.start_epoch, ctx.optim.epochs):
            seed_epoch(ctx.cfg.run.seed, epoch, ctx.rank)
            _pause_hook(ctx, epoch)
            metrics = _train_epoch(stage, ctx, parts, epoch)
            parts.module.eval()
            started = time.perf_counter()
            with torch.no_grad():
                metrics.update(stage.validate(ctx, parts.module, epoch))
            metrics["val_seconds"] = time.perf_counter() - started
            parts.scheduler.step()
            if ctx.rank == 0:
                say(progress_line(stage, ctx.optim.epochs, metrics))
            parts.history.append(plain_metrics(metrics))
            if tracker is not None:
                # before the report, whose checkpoint write takes a while: the epoch shows up as soon as it is
                # known. A worker killed in between logs the epoch again when it reruns it (the same step).
                tracker.log_metrics(numeric(metrics), step=epoch)
            _report(stage, ctx, parts, epoch, metrics)
    finally:
        if tracker is not None:
            tracker.end()  # sends what is queued; the run stays the driver's to end


def _attach_tracker(ctx: WorkerContext, stage: StageLoop) -> Any:
    """Rank 0's Tracker on the stage's MLflow run (with system metrics); None on other ranks (they
    never import MLflow) and when the driver had no run to hand over (it logs the epochs itself)."""
    live = ctx.config.get("mlflow")
    if ctx.rank != 0 or not live:
        return None
    from pipelines.tracking import Tracker

    cfg = dataclasses.replace(ctx.cfg.tracking, tracking_uri=live["tracking_uri"])
    return Tracker.attach(cfg, live["run_id"], run_name=f"{ctx.cfg.run.name}/{stage.name} rank 0",
                          system_metrics=True)


def quiet_report_log() -> None:
    """Ray Train logs every report's whole metrics dict at INFO from the worker, through a logger
    named after its source file (.../ray/train/v2/.../context.py), so RunConfig's logging level
    does not reach it; the loop prints its own line per epoch instead. Matched by name, with no
    import of Ray's private modules: under another layout the line simply stays."""
    suffix = os.path.join("ray", "train", "v2", "_internal", "execution", "context.py")
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(suffix):
            logging.getLogger(name).setLevel(logging.WARNING)


class _Waits:
    """Seconds the loop spent blocked in the batch iterator: waiting for data, not computing."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        iterator = iter(batches)  # a stage's generator starts (and opens its datasets) inside the first next()
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.seconds += time.perf_counter() - started  # the end of an epoch is waited for too
                return
            self.seconds += time.perf_counter() - started
            yield batch


def _train_epoch(stage: StageLoop, ctx: WorkerContext, parts: _Parts, epoch: int) -> dict[str, Any]:
    parts.model.train()
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    sums: dict[str, float] = {}
    counts = {"samples": 0.0, "frames": 0.0}
    levels: list[str] = []
    ctx.rows_read.clear()
    waits = _Waits()
    started = time.perf_counter()
    for batch in waits.timed(stage.epoch_batches(ctx, epoch, parts.global_batch)):
        out = stage.step(ctx, parts.model, batch, epoch)
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(out.losses["total"]).backward()
        if ctx.optim.grad_clip_norm > 0:
            parts.scaler.unscale_(parts.optimizer)
            nn.utils.clip_grad_norm_(parts.module.parameters(), ctx.optim.grad_clip_norm)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.global_batch += 1
        for key, value in out.losses.items():
            sums[f"loss_{key}"] = sums.get(f"loss_{key}", 0.0) + float(value.detach()) * out.num_samples
        counts["samples"] += out.num_samples
        counts["frames"] += out.num_frames
        if out.level and out.level not in levels:
            levels.append(out.level)
    seconds = time.perf_counter() - started
    read = {f"rows_read_{name.removeprefix('train/')}": float(n) for name, n in ctx.rows_read.items()}
    totals = all_reduce({**sums, **counts, **read}, ctx.device)
    if totals["samples"] == 0:
        raise LofiError(f"lofi {stage.name}: epoch {epoch} had no training step: fewer training rows than "
                        f"{stage.name}.batch_size={ctx.optim.batch_size} (rows per worker are equalised); lower "
                        f"--set {stage.name}.batch_size or add training videos")
    metrics: dict[str, Any] = {"epoch": epoch, "global_batch": parts.global_batch}
    metrics.update({key: totals[key] / totals["samples"] for key in sums})
    metrics.update({key: int(totals[key]) for key in read})
    metrics.update(_speed_metrics(stage, ctx, totals, seconds, waits.seconds))
    for i, group in enumerate(parts.optimizer.param_groups):
        metrics["lr" if i == 0 else f"lr_{group.get('name', i)}"] = group["lr"]
    if levels:
        metrics["level"] = "+".join(levels)
    return metrics


def _speed_metrics(stage: StageLoop, ctx: WorkerContext, totals: dict[str, float], seconds: float,
                   wait_sec: float) -> dict[str, float]:
    """Throughput, memory and input-boundness of the epoch. data_wait_sec / data_wait_share: time blocked
    in the batch iterator, and its share of the epoch's training time, of the worker that waited most
    (DDP steps at the pace of the slowest worker); with several workers, each one's share as well."""
    share = wait_sec / seconds if seconds > 0 else 0.0
    per_rank = {f"data_wait_share_rank{r}": share if r == ctx.rank else 0.0 for r in range(ctx.world_size)}
    shares = all_reduce(per_rank, ctx.device) if ctx.world_size > 1 else {}
    peaks = all_reduce({"seconds": seconds, "peak_memory_bytes": peak_memory_bytes(ctx.device),
                        "data_wait_sec": wait_sec, "data_wait_share": share}, ctx.device, "max")
    metrics = {f"{stage.samples}_per_sec": totals["samples"] / peaks["seconds"]}
    if totals["frames"]:  # train-head's samples are features, not frames
        metrics["frames_per_sec"] = totals["frames"] / peaks["seconds"]
    metrics.update(train_seconds=peaks["seconds"], peak_memory_bytes=peaks["peak_memory_bytes"],
                   data_wait_sec=peaks["data_wait_sec"], data_wait_share=peaks["data_wait_share"], **shares)
    return metrics


def _pause_hook(ctx: WorkerContext, epoch: int) -> None:
    hook = ctx.config.get("pause")
    if not hook or ctx.rank != 0:
        return
    at, _, pid_file = hook.partition(":")
    path = Path(pid_file)
    if int(at) == epoch and not path.exists():
        path.write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and path.exists() and path.read_text():  # emptied: go on
            time.sleep(0.2)


def _read_checkpoint(checkpoint: Any, rank: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(rank 0's state.pt, this rank's RNG states) of a Ray checkpoint; (None, None) without one."""
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        rng_path = Path(folder) / f"rng-rank{rank}.pt"
        rng = torch.load(rng_path, weights_only=True) if rng_path.exists() else None
    return state, rng


def _report(stage: StageLoop, ctx: WorkerContext, parts: _Parts, epoch: int, metrics: dict[str, Any]) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        if ctx.rank == 0:
            torch.save({"model": parts.module.state_dict(), "optimizer": parts.optimizer.state_dict(),
                        "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
                        "epoch": epoch, "global_batch": parts.global_batch, "stage": stage.state_dict(),
                        "history": parts.history},
                       Path(folder) / STATE_FILE)
        torch.save(rng_state(), Path(folder) / f"rng-rank{ctx.rank}.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"epoch-{epoch:04d}")


def say(line: str) -> None:
    """One progress line on the worker's stdout (Ray shows it on the driver). Not print():
    Train V2 patches print to log each line as well, which the driver then shows twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def plain_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as python numbers and strings: what torch.load(weights_only=True) reads back from a
    checkpoint (numpy scalars are refused there)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            out[key] = int(value)
        elif isinstance(value, (float, np.floating)):
            out[key] = float(value)
    return out


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics MLflow can take: numbers (a fidelity level's name is left out)."""
    return {k: float(v) for k, v in plain_metrics(metrics).items() if not isinstance(v, str)}


def progress_line(stage: StageLoop, epochs: int, m: dict[str, Any]) -> str:
    parts = [f"lofi {stage.name.replace('_', '-')}: epoch {m['epoch'] + 1}/{epochs}"]
    if m.get("level"):
        parts.append(f"level {m['level']}")
    parts.append(f"loss {m['loss_total']:.4f}")
    others = [f"{k[5:]} {v:.4f}" for k, v in m.items() if k.startswith("loss_") and k != "loss_total"]
    if others:
        parts[-1] += f" ({', '.join(others)})"
    parts += [f"{k} {m[k]:.4f}" for k in ("val_loss_total", "val_balanced_accuracy", "val_tal_balanced_accuracy",
                                          "val_tal_background_top_share", "val_average_mAP") if k in m]
    parts += [f"lr {m['lr']:.3g}", f"{m[f'{stage.samples}_per_sec']:.2f} {stage.samples}/s"]
    if "data_wait_share" in m:
        parts.append(f"data wait {100 * m['data_wait_share']:.0f}%")
    return " | ".join(parts)
