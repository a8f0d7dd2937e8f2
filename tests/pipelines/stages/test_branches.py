"""Which branches `lofi pipeline` runs and what each one's stage 2 trains (no Ray: the plan only)."""

from __future__ import annotations

from pathlib import Path

from lofi.config import load_config, replace
from lofi.fidelity import FidelitySchedule
from pipelines.config import PipelineConfig
from pipelines.stages.branches import PipelineOptions, stage2_config

DEMO = Path(__file__).resolve().parents[3] / "deploy" / "configs" / "pipeline" / "demo.yaml"


def test_the_ablation_adds_each_level_alone_and_the_other_cycle_at_the_same_steps():
    cfg = load_config(PipelineConfig, DEMO, [])  # C-LoFi, long cycle
    assert cfg.fidelity.kind == "c_lofi" and cfg.fidelity.cycle == "epoch"
    opts = PipelineOptions(baseline=True, full_end_to_end=True, ablation=True)
    # c_lofi_long trains what lofi trains: left out
    assert opts.branches(cfg) == ["baseline", "lofi", "full_end_to_end", "t_lofi", "s_lofi", "st_lofi", "c_lofi_short"]
    assert PipelineOptions().branches(cfg) == ["lofi"]
    for name in ("t_lofi", "s_lofi", "st_lofi"):
        branch = stage2_config(cfg, name)
        assert [lv.name for lv in FidelitySchedule(branch.fidelity).levels()] == [name]
        assert branch.train == cfg.train  # the same recipe, the same epochs
    short = stage2_config(cfg, "c_lofi_short")
    # a short cycle's epoch is one pass at each of the three levels: a third of the epochs, the same steps
    assert (short.fidelity.cycle, short.train.epochs, short.train.lr_step_epochs) == (
        "batches", round(cfg.train.epochs / 3), round(cfg.train.lr_step_epochs / 3))
    assert stage2_config(cfg, "full_end_to_end").fidelity.kind == "full"
    assert opts.extra_levels(cfg) and {lv.name for lv in opts.extra_levels(cfg)} == {"full", "s_lofi", "t_lofi", "st_lofi"}


def test_from_a_short_cycle_config_the_ablation_adds_the_long_cycle():
    cfg = replace(load_config(PipelineConfig, DEMO, []), [("fidelity.cycle", "batches"), ("train.epochs", 3),
                                                          ("train.lr_step_epochs", 2)])
    branches = PipelineOptions(ablation=True).branches(cfg)
    assert "c_lofi_long" in branches and "c_lofi_short" not in branches
    long = stage2_config(cfg, "c_lofi_long")
    assert (long.fidelity.cycle, long.train.epochs, long.train.lr_step_epochs) == ("epoch", 9, 6)
