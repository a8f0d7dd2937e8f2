"""Search spaces as data: what a sweep config may say, what it samples, and the errors that name the key."""

from __future__ import annotations

import math

import pytest
import yaml

from lofi.config import ConfigError, from_dict
from lofi.errors import LofiError
from pipelines.config import PipelineConfig
from tuning.config import SweepConfig
from tuning.space import parse_space, sample_points
from tuning.sweep import check_keys, effective_key


def test_grid_keys_cross_and_repeat_per_sample_while_the_others_are_drawn_per_trial():
    params = parse_space({"fidelity.kind": {"grid": ["s_lofi", "c_lofi"]}, "train.lr": {"loguniform": [1e-4, 1e-2]},
                          "fidelity.overrides.s_lofi.size_px": {"grid": [32, 48]},
                          "train.encoder_lr_scale": {"choice": [0.1, 1.0]}})
    points = sample_points(params, num_samples=3, seed=7)
    assert len(points) == 2 * 2 * 3
    grid = [(p["fidelity.kind"], p["fidelity.overrides.s_lofi.size_px"]) for p in points]
    assert grid[:4] == [("s_lofi", 32), ("s_lofi", 48), ("c_lofi", 32), ("c_lofi", 48)] and grid[4:8] == grid[:4]
    lrs = [p["train.lr"] for p in points]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == len(lrs)
    # log-uniform: about half of the draws fall below the geometric middle (1e-3), not ~10% as uniform would
    many = [p["train.lr"] for p in sample_points(params[1:2], num_samples=400, seed=1)]
    assert 0.4 < sum(lr < 1e-3 for lr in many) / len(many) < 0.6
    assert {p["train.encoder_lr_scale"] for p in points} <= {0.1, 1.0}
    assert sample_points(params, 3, seed=7) == points  # a resumed sweep draws the same trials
    assert list(points[0]) == ["fidelity.kind", "train.lr", "fidelity.overrides.s_lofi.size_px",
                               "train.encoder_lr_scale"]


@pytest.mark.parametrize("space, message", [
    ({}, "space is empty"),
    ({"train.lr": [0.1, 0.2]}, "space.train.lr: expected one of"),
    ({"train.lr": {"uniform": [0.2, 0.1]}}, "space.train.lr.uniform: low 0.2 must be below high 0.1"),
    ({"train.lr": {"loguniform": [0, 0.1]}}, "space.train.lr.loguniform: low must be > 0"),
    ({"train.lr": {"grid": []}}, "space.train.lr.grid: expected a non-empty list"),
    ({"train.lr": {"uniform": [0.1]}}, "space.train.lr.uniform: expected [low, high] numbers"),
])
def test_bad_ranges_are_errors_that_name_the_key(space, message):
    with pytest.raises(ConfigError) as err:
        parse_space(space)
    assert message in str(err.value)


def test_unknown_keys_and_values_the_config_refuses_are_named_before_any_work():
    base = PipelineConfig()
    with pytest.raises(LofiError) as err:
        check_keys(base, {"train.learning_rate": {"grid": [0.1]}, "fidelity.kind": {"choice": ["s_lofi", "z_lofi"]},
                          "train.lr": {"uniform": [0.01, 0.1]}})
    text = str(err.value)
    assert "2 bad search key(s)" in text
    assert "space.train.learning_rate" in text and "lr" in text  # the valid keys are listed
    assert "space.fidelity.kind = 'z_lofi'" in text


def test_overrides_of_levels_a_trial_never_reads_make_no_new_trial():
    base = PipelineConfig()
    full_a = from_dict(PipelineConfig, {"fidelity": {"kind": "full", "overrides": {"s_lofi": {"size_px": 32}}}})
    full_b = from_dict(PipelineConfig, {"fidelity": {"kind": "full", "overrides": {"s_lofi": {"size_px": 48}}}})
    s_a = from_dict(PipelineConfig, {"fidelity": {"kind": "s_lofi", "overrides": {"s_lofi": {"size_px": 32}}}})
    s_b = from_dict(PipelineConfig, {"fidelity": {"kind": "s_lofi", "overrides": {"s_lofi": {"size_px": 48}}}})
    assert effective_key(full_a) == effective_key(full_b) != effective_key(base.__class__())
    assert effective_key(s_a) != effective_key(s_b)


def test_sweep_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="pipeline is empty"):
        SweepConfig()
    with pytest.raises(ConfigError, match="search: budget_gb must be >= 0"):
        from_dict(SweepConfig, {"pipeline": "x.yaml", "search": {"budget_gb": -1}})
    with pytest.raises(ConfigError, match="searchh"):
        from_dict(SweepConfig, {"pipeline": "x.yaml", "searchh": {}})
    with pytest.raises(LofiError, match="is not a file"):
        SweepConfig(pipeline=str(tmp_path / "missing.yaml")).base_config()
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"train": {"lr": 0.5}}))
    cfg = SweepConfig(pipeline=str(pipeline), set=("train.epochs=3",)).base_config()
    assert (cfg.train.lr, cfg.train.epochs) == (0.5, 3)
    assert math.isinf(SweepConfig(pipeline="x").search.budget_bytes())
