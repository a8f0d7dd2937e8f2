"""The pipeline's branches: each a stage-2 variant trained from the same starting encoder and
scored with the same head recipe (the paper's Table 2 ablation), and the options that pick them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lofi.config import replace
from lofi.errors import LofiError
from pipelines.config import STAGE_ORDER, PipelineConfig

Overrides = tuple[tuple[str, Any], ...]


def _kind(kind: str):
    def overrides(cfg: PipelineConfig) -> Overrides:
        return (("fidelity.kind", kind),)
    return overrides


def _cycle(cycle: str):
    """C-LoFi with the given cycle, at the same number of training steps: a short cycle's epoch is one
    pass at every level (lofi.fidelity), so it takes a third of the long cycle's epochs."""
    def overrides(cfg: PipelineConfig) -> Overrides:
        factor = {("epoch", "batches"): 1 / 3, ("batches", "epoch"): 3}.get((cfg.fidelity.cycle, cycle), 1)
        epochs = {k: max(1, round(getattr(cfg.train, k) * factor)) for k in ("epochs", "lr_step_epochs")}
        return (("fidelity.kind", "c_lofi"), ("fidelity.cycle", cycle), *(("train." + k, v) for k, v in epochs.items()))
    return overrides


def _same(cfg: PipelineConfig) -> Overrides:
    return ()


# branch -> its stage-2 overrides (a function of the config); None: no stage 2 (the frozen starting encoder).
# lofi is the config's own schedule; the ablation branches (the paper's Table 2: each reduced level alone and
# both C-LoFi cycles) run with --ablation, those that train what lofi trains left out.
BRANCHES: dict[str, Any] = {
    "baseline": None,
    "lofi": _same,
    "full_end_to_end": _kind("full"),
    "t_lofi": _kind("t_lofi"),
    "s_lofi": _kind("s_lofi"),
    "st_lofi": _kind("st_lofi"),
    "c_lofi_long": _cycle("epoch"),
    "c_lofi_short": _cycle("batches"),
}
ABLATION = ("t_lofi", "s_lofi", "st_lofi", "c_lofi_long", "c_lofi_short")


@dataclass(frozen=True)
class PipelineOptions:
    baseline: bool = False  # add the frozen-encoder branch
    full_end_to_end: bool = False  # add stage 2 at full fidelity
    ablation: bool = False  # add each reduced level alone and both C-LoFi cycles (ABLATION)
    from_stage: str = ""  # rerun this stage and every later one
    log_prefix: str = "lofi pipeline"

    def __post_init__(self) -> None:
        if self.from_stage and self.from_stage not in STAGE_ORDER:
            raise LofiError(f"--from {self.from_stage}: not a stage; stages in order: {', '.join(STAGE_ORDER)}")

    def extra_levels(self, cfg: PipelineConfig) -> tuple[Any, ...]:
        """Levels the chosen branches train on beyond the config's schedule (the ablation's)."""
        from lofi.fidelity import FidelitySchedule

        configs = [stage2_config(cfg, b) for b in self.branches(cfg) if BRANCHES[b] is not None]
        return tuple(level for c in configs for level in FidelitySchedule(c.fidelity).levels())

    def branches(self, cfg: PipelineConfig) -> list[str]:
        """The branches to run, in table order; an ablation branch that trains what `lofi` trains is left out."""
        chosen = [b for b in BRANCHES if b == "lofi" or (b == "baseline" and self.baseline)
                  or (b == "full_end_to_end" and self.full_end_to_end) or (b in ABLATION and self.ablation)]
        lofi = stage2_config(cfg, "lofi")
        return [b for b in chosen if b not in ABLATION or stage2_config(cfg, b) != lofi]

    def forced(self, stage: str) -> bool:
        """Whether --from makes `stage` run again whatever its record says. The stages after it run
        again because their input did; a branch without that stage (the baseline has no stage 2) is
        reused where nothing it depends on ran again."""
        return stage == self.from_stage


def stage2_config(cfg: PipelineConfig, branch: str) -> PipelineConfig:
    """The config a branch's stage 2 trains with (the `fidelity` and `train` sections are what differ)."""
    return replace(cfg, list(BRANCHES[branch](cfg)))
