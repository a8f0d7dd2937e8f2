"""The sweep config (`lofi sweep --config deploy/configs/sweep/<name>.yaml`): what to sweep and how.

    name: demo                      # the sweep's folder <storage>/<name>/ and its MLflow parent run
    storage: demo_out/sweeps
    pipeline: deploy/configs/pipeline/demo.yaml   # the config every trial starts from
    set: [train.epochs=3]           # overrides of that config, for every trial (as `--set`)
    space: {...}                    # tuning/space.py
    search: {num_samples: 1, seed: 0, budget_gb: 0.25, scheduler: asha, ...}

`pipeline` is a path to a pipeline YAML (relative paths are read from the working directory,
as every config path here), not a parent config: the sweep config never merges into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lofi.config import load_config, replace
from lofi.errors import LofiError
from pipelines.config import PipelineConfig
from pipelines.storage import location


@dataclass(frozen=True)
class SearchSection:
    num_samples: int = 1  # repeats of every grid point (each draws its own random values)
    seed: int = 0  # the draws of choice / uniform / loguniform keys
    metric: str = "val_average_mAP"  # a stage-2 per-epoch metric: the trials' own validation mAP at full fidelity
    # the videos trials are scored on (their data.val_subset): "tuning", training videos held out from every
    # trial's training (the pipeline's prepare.tuning_fraction > 0; lofi.splits), so the validation videos
    # the final report scores take no part in the choice; "validation" scores there (and chooses on them)
    score_subset: str = "tuning"
    mode: Literal["max", "min"] = "max"
    budget_gb: float = 0.0  # activation memory per device (GiB) a trial may need; 0: no limit
    scheduler: Literal["asha", "none"] = "asha"  # ASHA stops trials that fall behind at its rungs (epochs)
    grace_period_epochs: int = 1  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor at each rung
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs / GPUs hold at scaling.* per trial

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.budget_gb < 0:
            raise ValueError(f"budget_gb must be >= 0 (0: no limit), got {self.budget_gb}")
        if self.grace_period_epochs < 1:
            raise ValueError(f"grace_period_epochs must be >= 1, got {self.grace_period_epochs}")
        if self.reduction_factor < 2:
            raise ValueError(f"reduction_factor must be >= 2, got {self.reduction_factor}")
        if self.max_concurrent_trials < 0:
            raise ValueError(f"max_concurrent_trials must be >= 0 (0: from the cluster), got {self.max_concurrent_trials}")
        if not self.score_subset:
            raise ValueError("score_subset is empty: use tuning (held-out training videos) or validation")
        if not self.metric.startswith(("val_", "loss_")):
            raise ValueError(f"metric {self.metric!r}: use a per-epoch metric of lofi train, e.g. val_average_mAP, "
                             "val_loss_total")

    def budget_bytes(self) -> float:
        return self.budget_gb * 2**30 if self.budget_gb else float("inf")


@dataclass(frozen=True)
class SweepConfig:
    name: str = "sweep"
    # root folder of sweeps (a path; not yet a URI): <storage>/<name>/ holds trials, Tune's state, results
    storage: str = "sweeps"
    pipeline: str = ""  # the pipeline YAML every trial starts from (deploy/configs/pipeline/*.yaml)
    set: tuple[str, ...] = ()  # key=value overrides of that config for every trial
    space: dict[str, Any] = field(default_factory=dict)  # dotted key -> {grid|choice|uniform|loguniform: ...}
    search: SearchSection = field(default_factory=SearchSection)

    def __post_init__(self) -> None:
        if not self.name.strip() or "/" in self.name:
            raise ValueError(f"name must be a non-empty folder name without '/', got {self.name!r}")
        if not self.pipeline:
            raise ValueError("pipeline is empty: set it to the pipeline YAML the trials start from, e.g. "
                             "deploy/configs/pipeline/demo.yaml")

    def dir(self) -> Path:
        # a local (or shared) folder: Tune's state and the trials' runs; never a Ray job's temp folder
        return location(self.storage, "storage", output=True).local_path() / self.name

    def base_config(self) -> PipelineConfig:
        """The pipeline config every trial starts from: the YAML with `set` applied."""
        path = Path(self.pipeline).expanduser()
        if not path.is_file():
            raise LofiError(f"pipeline: {self.pipeline} is not a file; set it to a pipeline YAML "
                            "(deploy/configs/pipeline/*.yaml)")
        return load_config(PipelineConfig, path, self.set)

    def trial_config(self, base: PipelineConfig, overrides: dict[str, Any], name: str) -> PipelineConfig:
        """A trial's config: the base with its sampled values, its own run folder under the sweep."""
        return replace(base, [*overrides.items(), ("data.val_subset", self.search.score_subset),
                              ("run.storage", str(self.dir() / "trials")), ("run.name", name)])
