"""The run config shared by the training-side stages: pretrain, train, extract, train-head, detect.

One YAML file describes an experiment; every stage reads the sections it needs (`lofi train`
uses `run`, `data`, `encoder`, `head`, `fidelity`, `train`, `scaling`, `tracking`). Derived paths
are methods, never written back, so a stage's inputs and outputs follow from the config alone:

    <run.storage>/<run.name>/pretrain/encoder.pt      stage 1 encoder (lofi naming, VideoEncoder state dict)
    <run.storage>/<run.name>/train/encoder.pt         stage 2 (LoFi) encoder; train/model.pt encoder + head
    <run.storage>/<run.name>/features/                extracted features (Parquet shards, optional npy/)
    <run.storage>/<run.name>/head/model.pt            stage 3 head trained on the features
    <run.storage>/<run.name>/detect/predictions.json  ActivityNet-format detections; detect/eval.json
    <run.storage>/<run.name>/detect/<subset>/         the same for another subset (detect.subset)
    <run.storage>/<run.name>/ray/<stage>/             Ray Train storage (checkpoints) of each training stage

Every path above comes from `RunSection`'s methods (`stage_location`, `features`, `head`,
`detections`, `checkpoints`, `stage_outputs`): no other module spells the layout.
`run.storage` is a local path or an object-store URI (`s3://bucket/prefix`, `gs://...`, `file:///...`;
pipelines.storage): those methods name the outputs on either, `run.dir()` only a local one.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lofi.errors import LofiError
from lofi.fidelity import FidelityLevel, FidelityScheduleConfig, resolve_level
from lofi.heads import HeadConfig
from lofi.models.encoders import EncoderConfig
from lofi.splits import TuningSplit
from pipelines.cluster import RayConfig
from pipelines.storage import Location, location, uri_problem
from pipelines.tracking import TrackingConfig

# The stages in run order (the pipeline's own prepare runs before them) and the folder of <run> each writes.
STAGES = ("pretrain", "train", "extract", "train_head", "detect")
STAGE_ORDER = ("prepare", *STAGES)
STAGE_FOLDERS = {"pretrain": "pretrain", "train": "train", "extract": "features", "train_head": "head",
                 "detect": "detect"}


@dataclass(frozen=True)
class RunSection:
    name: str = "lofi"  # the run's folder and its MLflow parent run name; same name + storage resumes
    # root of all outputs: a folder every node sees (a shared filesystem on a multi-node cluster) or an
    # object-store URI (s3://bucket/prefix, gs://bucket/prefix; credentials and endpoint from the
    # environment: AWS_*, GOOGLE_APPLICATION_CREDENTIALS). Under `ray job submit` it must be absolute or a URI.
    storage: str = "runs"
    seed: int = 0
    max_failures: int = 0  # Ray Train FailureConfig: restarts from the last checkpoint after a worker dies
    keep_checkpoints: int = 2  # epoch checkpoints kept per training stage (Ray Train CheckpointConfig.num_to_keep)
    deterministic: bool = True  # training: torch.use_deterministic_algorithms (warn_only); slower on GPU

    def __post_init__(self) -> None:
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1 (a run resumes from its latest), got {self.keep_checkpoints}")
        problem = uri_problem(self.storage)
        if problem:
            raise ValueError(f"storage: {problem}")

    def location(self) -> Location:
        """`<run.storage>/<run.name>`, local or in an object store (inside a Ray job: never its temp folder)."""
        return location(self.storage, "run.storage", output=True) / self.name

    def stage_location(self, stage: str) -> Location:
        """The folder `stage` writes its outputs to (extract's is `features/`, train_head's `head/`)."""
        if stage not in STAGE_FOLDERS:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        return self.location() / STAGE_FOLDERS[stage]

    def features(self) -> Location:
        """`<run>/features/`: what `lofi extract` writes and the head trains on."""
        return self.stage_location("extract")

    def head(self) -> Location:
        """`<run>/head/`: the head `lofi train-head` trains (model.pt, model.json)."""
        return self.stage_location("train_head")

    def detections(self, subset: str = "") -> Location:
        """`<run>/detect/` for the validation subset (`subset` empty), `<run>/detect/<subset>/` for another."""
        out = self.stage_location("detect")
        return out / subset if subset else out

    def checkpoints(self, stage: str) -> Location:
        """`<run>/ray/<stage>/`: Ray Train's run folder of a training stage (its epoch checkpoints)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        return self.location() / "ray" / stage

    def stage_outputs(self, stage: str) -> tuple[Location, ...]:
        """Everything a stage run leaves in the run folder: deleted when its settings change."""
        return self.stage_location(stage), self.checkpoints(stage)

    def dir(self) -> Path:
        """`<run.storage>/<run.name>` as a local path, for code that needs one; an object-store
        `run.storage` is an error naming the key there."""
        loc = self.location()
        if not loc.is_local:
            raise LofiError(f"run.storage: {self.storage} is an object-store URI, but a local path is needed here; "
                            "use run.location() (every stage does), or set run.storage to a path")
        return Path(loc.uri)

    def ray_storage(self) -> str:
        """Ray Train's storage_path (a path or a URI, which Ray Train opens with pyarrow.fs itself):
        per-stage run names live under it."""
        return str(self.location() / "ray")


@dataclass(frozen=True)
class DataSection:
    shards: str = ""  # `lofi prepare` output folder or URI (s3://, gs://; its manifest names the levels and labels)
    annotations: str = ""  # ground truth for evaluation; empty: the annotation file in the manifest's config
    # `lofi pipeline` only: the TAL videos' folder (or URI); with it the pipeline prepares them itself into
    # `shards` (empty: <run>/prepared) at the full level and every level of the fidelity schedule
    videos: str = ""
    # `lofi pipeline` only: stage 1's labelled trimmed clips, prepared into `pretrain_shards` (empty:
    # <run>/prepared_clips): an annotation file (a Kinetics-style CSV label,youtube_id,time_start,time_end,split)
    # and the folder of its clip files (<youtube_id>_<start:06d>_<end:06d>.mp4)
    pretrain_annotations: str = ""
    pretrain_videos: str = ""
    train_subset: str = "training"
    val_subset: str = "validation"
    full_level: str = "full"  # the shard level that features are extracted at (full fidelity)
    # Stage 1's clips. pretrain_shards: `lofi prepare` output of a set of labelled trimmed clips (e.g. a
    # Kinetics-style CSV, `lofi synth-clips`), separate from the TAL videos as in the paper; empty: clips are
    # cut from the TAL training videos of `shards` (one per snippet, labelled by the segment it lies in).
    pretrain_shards: str = ""
    pretrain_level: str = ""  # the level stage 1 reads; empty: full_level (or the only level of pretrain_shards)
    pretrain_background: bool = True  # clips cut from TAL videos: snippets outside every segment form a "background" class
    pretrain_clip_frames: int = 0  # frames per training clip: a random window of a longer stored clip (temporal
    #                                jitter; validation takes the centred one); 0: all frames of a snippet
    pretrain_min_crop_scale: float = 1.0  # scale jitter: random crops of [this, 1] of the frame area, resized back
    # multi-scale training: each training batch resized to a side of [this, 1] x S (uniform, one draw per batch),
    # so the encoder meets objects at the sizes spatially reduced levels show (S-LoFi: 0.5); 1: full size only
    pretrain_min_side_scale: float = 1.0
    pretrain_balanced: bool = True  # class-balanced cross-entropy weights (N / (K * n_k)) from the training clips
    # training datasets whose decoded frames (or features) fit in this many MiB are read once on the driver
    # into Ray's object store, so epochs skip reading and decoding shards; larger ones stream from the
    # shards every epoch. 0: always stream.
    cache_max_mib: float = 1024.0
    # Fixed-stride features (extracted from a level with snippet_stride_sec, e.g. THUMOS14's long videos):
    # `lofi train-head` and `lofi detect` run the head on windows of window_snippets snippets (the head's T),
    # window_overlap apart (the last one aligned to the video's end) and merge a video's window detections
    # (lofi/windows.py). 0: unset, an error for fixed-stride features; whole-video grid features ignore these.
    window_snippets: int = 0
    window_overlap: float = 0.5
    # training windows that hold no ground truth: this fraction of them is kept (one seeded draw per run,
    # run.seed); windows with ground truth are all kept, validation and detection use every window
    window_empty_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.window_snippets < 0:
            raise ValueError(f"window_snippets must be >= 0 (0: no windows), got {self.window_snippets}")
        if not 0 <= self.window_overlap < 1:
            raise ValueError(f"window_overlap must be in [0, 1) (0.5: half a window), got {self.window_overlap}")
        if not 0 <= self.window_empty_fraction <= 1:
            raise ValueError(f"window_empty_fraction must be in [0, 1], got {self.window_empty_fraction}")
        if self.pretrain_clip_frames < 0:
            raise ValueError(f"pretrain_clip_frames must be >= 0 (0: all frames), got {self.pretrain_clip_frames}")
        if not 0 < self.pretrain_min_crop_scale <= 1:
            raise ValueError(f"pretrain_min_crop_scale must be in (0, 1] (1: no crop), got {self.pretrain_min_crop_scale}")
        if not 0 < self.pretrain_min_side_scale <= 1:
            raise ValueError(f"pretrain_min_side_scale must be in (0, 1] (1: full size only), got "
                             f"{self.pretrain_min_side_scale}")
        for key in ("shards", "pretrain_shards"):  # paths or object-store URIs (pipelines.storage)
            problem = getattr(self, key) and uri_problem(getattr(self, key))
            if problem:
                raise ValueError(f"{key}: {problem}")


@dataclass(frozen=True)
class OptimSection:
    """One stage's optimisation. `batch_size` is global (all workers together) and the
    learning rate is used as given for it: nothing is rescaled with the number of workers."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 10
    lr_step_epochs: int = 5  # StepLR: multiply by lr_gamma every lr_step_epochs epochs
    lr_gamma: float = 0.5
    batch_size: int = 16
    encoder_lr_scale: float = 1.0  # encoder lr = lr * this (end-to-end stages)
    grad_clip_norm: float = 0.0  # 0: no clipping
    # End to end (stage 2): keep the encoder's BatchNorm in eval mode, with its checkpoint's statistics.
    # LoFi levels differ in frame size and count, so statistics re-estimated on them would not fit the
    # full-fidelity frames the encoder is used at afterwards; and a few videos per batch estimate them badly.
    freeze_encoder_bn: bool = False
    shuffle_buffer_rows: int = 16  # per-worker shuffle buffer (videos, or clips in pretrain), reseeded each epoch; 0: fixed order

    def __post_init__(self) -> None:
        for key in ("lr", "epochs", "lr_step_epochs", "batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.shuffle_buffer_rows < 0:
            raise ValueError(f"shuffle_buffer_rows must be >= 0 (0: no shuffling), got {self.shuffle_buffer_rows}")

    def per_worker_batch(self, num_workers: int) -> int:
        if self.batch_size % num_workers:
            raise ValueError(
                f"batch_size {self.batch_size} does not divide over {num_workers} workers; "
                f"set a multiple of {num_workers}"
            )
        return self.batch_size // num_workers


@dataclass(frozen=True)
class ScalingSection:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclass(frozen=True)
class ExtractSection:
    batch_size: int = 1  # videos (or chunks) per inference call
    num_actors: int = 1  # actor pool size; each holds one copy of the encoder
    chunk_snippets: int = 0  # encode this many snippets at a time (0: all); bounds memory
    write_npy: bool = False  # also write features/npy/<video_id>.npy in (T, D) layout


@dataclass(frozen=True)
class DetectSection:
    soft_nms_sigma: float = 0.5
    top_k: int = 100  # detections kept per video
    protocol: Literal["anet", "thumos"] = "anet"
    # the subset to detect on; empty: data.val_subset. Another subset writes <run>/detect/<subset>/; one whose
    # videos carry no ground truth (e.g. ActivityNet's testing) gives a submission file and no score
    subset: str = ""
    # windows of fixed-stride features (data.window_snippets): each window's best this many candidates go
    # into its video's one Soft-NMS (which makes top_k passes over all of them); 0: all
    window_candidates: int = 2000

    def __post_init__(self) -> None:
        if self.window_candidates < 0:
            raise ValueError(f"window_candidates must be >= 0 (0: all), got {self.window_candidates}")


@dataclass(frozen=True)
class PrepareSection:
    """How `lofi pipeline` prepares data; the levels themselves come from `fidelity` (the full level
    and every level of the schedule) and, for stage 1's clips, one level "clip" (T=1)."""

    num_workers: int = 2  # decode+write tasks at once
    videos_per_part: int = 8  # videos per commit (the granularity of resuming)
    clip_videos_per_part: int = 100  # the same for the trimmed clips: many small files
    clip_frames_per_snippet: int = 8  # F of the clip level: data.pretrain_clip_frames windows jitter inside it
    max_error_fraction: float = 0.05  # stop when more videos than this fail to decode
    metadata: str = ""  # metadata CSV for annotation formats without durations
    annotation_errors: Literal["raise", "skip", "keep"] = "raise"  # invalid entries: report all, drop, or keep as written
    subsets: tuple[str, ...] = ()  # prepare only these subsets of the TAL videos; empty: all
    storage: Literal["uint8", "jpeg"] = "uint8"  # frames in the shards; JPEG is ~10x smaller (ActivityNet: TBs)
    # the tuning split (lofi.splits): this share of the training videos becomes subset "tuning", drawn per
    # run.seed and left out of training, for choosing levels, recipes and sweeps (`--set data.val_subset=tuning`
    # scores there; `lofi sweep` does by default), so the validation videos are scored only at the end; 0: none
    tuning_fraction: float = 0.0

    def __post_init__(self) -> None:
        for key in ("num_workers", "videos_per_part", "clip_videos_per_part", "clip_frames_per_snippet"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.max_error_fraction <= 1:
            raise ValueError(f"max_error_fraction must be in [0, 1], got {self.max_error_fraction}")
        TuningSplit(self.tuning_fraction)  # checks the fraction


@dataclass(frozen=True)
class PipelineConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    prepare: PrepareSection = field(default_factory=PrepareSection)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    fidelity: FidelityScheduleConfig = field(default_factory=FidelityScheduleConfig)
    # stage 1 rows are clips, consecutive ones from one video: a larger shuffle buffer mixes videos
    pretrain: OptimSection = field(default_factory=lambda: OptimSection(lr=0.01, epochs=5, shuffle_buffer_rows=512))
    # Stage 2: the paper's recipe (SGD 0.1, halved every 5 epochs), plus two defaults of end-to-end TAL
    # training: gradients clipped to norm 1 (the TAL losses of a head starting from scratch spike in the
    # first steps and would wreck the pre-trained encoder) and frozen encoder BatchNorm (see above).
    # encoder_lr_scale < 1 keeps the pre-trained encoder closer to its start than the new head.
    train: OptimSection = field(default_factory=lambda: OptimSection(grad_clip_norm=1.0, freeze_encoder_bn=True))
    train_head: OptimSection = field(default_factory=lambda: OptimSection(optimizer="adamw", lr=1e-3, epochs=10))
    extract: ExtractSection = field(default_factory=ExtractSection)
    detect: DetectSection = field(default_factory=DetectSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def stage2_encoder(self) -> EncoderConfig:
        """The encoder as stage 2 trains it: BatchNorm frozen with train.freeze_encoder_bn (the default).
        Stage 2, the sweep's memory filter and the report's memory column all plan this one."""
        return dataclasses.replace(self.encoder, freeze_bn=self.encoder.freeze_bn or self.train.freeze_encoder_bn)

    def head_level(self) -> FidelityLevel:
        """The full-fidelity grid the head runs on: `data.full_level`; when that is a fixed-stride level
        (not a grid level: THUMOS14's windows) the `full` preset's frames with T = `data.window_snippets`."""
        try:
            return resolve_level(self.data.full_level, self.fidelity.overrides)
        except LofiError:
            if not self.data.window_snippets:
                raise
        return dataclasses.replace(resolve_level("full", self.fidelity.overrides), num_snippets=self.data.window_snippets)


@dataclass(frozen=True)
class StageResult:
    """What a stage's `run` returns: where it wrote, its final metrics, its MLflow run."""

    stage: str
    out_dir: str
    metrics: dict[str, float]
    seconds: float
    mlflow_run_id: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path (encoder.pt, predictions.json, ...)
