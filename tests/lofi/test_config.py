"""Typed configs: unknown keys, wrong types and bad overrides fail with the key named."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from lofi_cli.args import add_config_arguments, config_from_args
from lofi.config import (
    ConfigError,
    apply_overrides,
    flatten,
    from_dict,
    load_config,
    replace,
    to_dict,
)


@dataclass(frozen=True)
class Optim:
    lr: float = 0.1
    epochs: int = 10
    name: Literal["sgd", "adamw"] = "sgd"

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class Run:
    name: str = "demo"
    levels: tuple[int, ...] = (100, 25)
    checkpoint: str | None = None
    optim: Optim = field(default_factory=Optim)


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: paper\noptim:\n  lr: 0.05\n")
    cfg = load_config(Run, path, ["optim.epochs=3", "levels=[50]"])
    assert cfg == Run(name="paper", levels=(50,), optim=Optim(lr=0.05, epochs=3))


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        from_dict(Run, {"optim": {"learning_rate": 0.1}})
    msg = str(err.value)
    assert "optim.learning_rate" in msg and "epochs, lr, name" in msg


def test_wrong_type_names_the_dotted_key():
    with pytest.raises(ConfigError, match=r"optim\.epochs: expected an integer"):
        from_dict(Run, {"optim": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match=r"optim\.name: 'adam' is not one of \['sgd', 'adamw'\]"):
        from_dict(Run, {"optim": {"name": "adam"}})
    with pytest.raises(ConfigError, match=r"levels\[1\]: expected an integer"):
        from_dict(Run, {"levels": [1, 2.5]})


def test_validation_in_post_init_is_reported_with_the_section():
    with pytest.raises(ConfigError, match=r"optim: lr must be > 0"):
        from_dict(Run, {"optim": {"lr": -1}})


def test_round_trip_through_plain_data_and_flatten():
    cfg = Run(checkpoint="/tmp/x.pt")
    data = to_dict(cfg)
    assert data["levels"] == [100, 25] and from_dict(Run, data) == cfg
    assert flatten(data)["optim.lr"] == 0.1
    assert replace(cfg, [("optim.lr", 0.2)]).optim.lr == 0.2


def test_override_without_equals_or_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="has no '='"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, bad)


def test_cli_arguments_feed_the_same_path(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--set", "optim.name=adamw", "--set", "checkpoint=null"])
    assert config_from_args(Run, args) == Run(optim=Optim(name="adamw"))


@dataclass(frozen=True)
class Pair:
    size: tuple[int, float] = (1, 2.0)


def test_fixed_length_tuples_check_each_position():
    assert from_dict(Pair, {"size": [3, 4]}) == Pair(size=(3, 4.0))
    with pytest.raises(ConfigError, match=r"size\[0\]: expected an integer"):
        from_dict(Pair, {"size": [3.5, 4]})
    with pytest.raises(ConfigError, match="expected 2 items"):
        from_dict(Pair, {"size": [3]})


@dataclass(frozen=True)
class Levels:
    levels: tuple[Optim | str, ...] = ("full",)


def test_a_section_inside_a_union_reports_its_own_error():
    assert from_dict(Levels, {"levels": ["s_lofi", {"lr": 0.5}]}).levels == ("s_lofi", Optim(lr=0.5))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) levels\[1\]\.learning_rate"):
        from_dict(Levels, {"levels": ["s_lofi", {"learning_rate": 0.5}]})
    with pytest.raises(ConfigError, match=r"levels\[0\]: 3 matches none of"):
        from_dict(Levels, {"levels": [3]})


@dataclass(frozen=True)
class Stages:
    pretrain: Optim = field(default_factory=lambda: Optim(lr=0.01, epochs=5))
    train: Optim = field(default_factory=Optim)


def test_a_section_given_in_part_keeps_its_own_defaults(tmp_path):
    cfg = load_config(Stages, None, ["pretrain.epochs=1"])
    assert cfg.pretrain == Optim(lr=0.01, epochs=1) and cfg.train == Optim()
    path = tmp_path / "s.yaml"
    path.write_text("pretrain:\n  name: adamw\n")
    assert load_config(Stages, path).pretrain == Optim(lr=0.01, epochs=5, name="adamw")


def test_scientific_notation_without_a_dot_is_a_number():
    assert load_config(Run, None, ["optim.lr=1e-3"]).optim.lr == 0.001
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(Run, None, ["optim.lr=fast"])
