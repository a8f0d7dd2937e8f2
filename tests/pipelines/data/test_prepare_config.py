"""The `lofi prepare` config: presets, level validation, the shipped YAML files, --help."""

from __future__ import annotations

from pathlib import Path

import pytest

from lofi.config import ConfigError, from_dict, load_config
from lofi.fidelity import PRESETS
from lofi_cli.prepare import build_parser
from pipelines.data.prepare_config import PrepareConfig

REPO = Path(__file__).resolve().parents[3]
BASE = {"input": {"annotations": "a.json", "videos": "v"}, "output": "out"}


def test_paper_config_has_the_four_paper_levels():
    cfg = load_config(PrepareConfig, REPO / "deploy/configs/prepare/paper.yaml")
    levels = {lv["name"]: lv for lv in cfg.resolved_levels()}
    # the paper's levels (Sec. 4), written out by hand here rather than read from the presets
    expected = {"full": (100, 224), "s_lofi": (100, 112), "t_lofi": (25, 224), "st_lofi": (50, 158)}
    assert {name: (lv["num_snippets"], lv["size_px"]) for name, lv in levels.items()} == expected
    assert all(lv["frames_per_snippet"] == PRESETS[name].frames_per_snippet for name, lv in levels.items())


def test_demo_config_loads_and_is_small():
    cfg = load_config(PrepareConfig, REPO / "deploy/configs/prepare/demo.yaml")
    assert all(lv["size_px"] <= 112 for lv in cfg.resolved_levels())


def test_rows_are_split_to_stay_under_max_row_mib():
    # full: one snippet is 8 x 224 x 224 x 3 = 1,204,224 bytes; all 100 = 115 MiB > 64 MiB, so the
    # row holds the largest divisor of 100 that fits 64 MiB = 55.7 snippets: 50 (57.4 MiB).
    cfg = from_dict(PrepareConfig, {**BASE, "levels": ["full"]})
    assert cfg.resolved_levels()[0]["snippets_per_row"] == 50
    # at 16 MiB: 13.9 snippets fit; divisors of 100 below that: 10
    cfg = from_dict(PrepareConfig, {**BASE, "levels": ["full"], "max_row_mib": 16})
    assert cfg.resolved_levels()[0]["snippets_per_row"] == 10
    small = from_dict(PrepareConfig, {**BASE, "levels": [{"name": "x", "num_snippets": 8, "size_px": 32}]})
    assert small.resolved_levels()[0]["snippets_per_row"] == 8  # the whole video in one row


def test_explicit_fields_override_a_preset():
    cfg = from_dict(PrepareConfig, {**BASE, "levels": [{"preset": "t_lofi", "name": "t_small", "size_px": 96}]})
    lv = cfg.resolved_levels()[0]
    assert (lv["name"], lv["num_snippets"], lv["size_px"]) == ("t_small", 25, 96)


@pytest.mark.parametrize("levels, words", [
    (["fullest"], "not a preset"),
    ([{"name": "x", "num_snippets": 8, "snippet_stride_sec": 1.0}], "exactly one"),
    ([{"name": "x"}], "exactly one"),
    ([{"num_snippets": 8}], "name"),
    ([{"name": "a b", "num_snippets": 8}], "name"),
    ([{"name": "x", "num_snippets": 8, "storage": "png"}], "storage"),
    (["full", "full"], "unique"),
])
def test_bad_levels_name_the_problem(levels, words):
    with pytest.raises(ConfigError, match=words):
        from_dict(PrepareConfig, {**BASE, "levels": levels})


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys.*num_workers"):
        from_dict(PrepareConfig, {**BASE, "num_worker": 2})


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--config", "--set", "--overwrite", "--quiet", "max_error_fraction", "videos_per_part", "storage"):
        assert word in text


def test_annotation_errors_raise_by_default_and_skip_or_keep_on_request(tmp_path):
    import json

    from lofi.errors import LofiError
    from pipelines.data.prepare import InputConfig, load_videos

    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"database": {
        "a": {"subset": "training", "duration": 10.0, "annotations": [{"segment": [1.0, 3.0], "label": "x"}]},
        "b": {"subset": "training", "duration": 10.0, "annotations": [{"segment": [4.0, 4.0], "label": "x"},
                                                                      {"segment": [5.0, 6.0], "label": "x"}]}}}))
    with pytest.raises(LofiError, match="'b'"):
        load_videos(InputConfig(str(path), "videos"))
    skipped, _, _ = load_videos(InputConfig(str(path), "videos", annotation_errors="skip"))
    assert [len(v.segments) for v in skipped] == [1, 1]  # the zero-length segment of b dropped
    kept, _, _ = load_videos(InputConfig(str(path), "videos", annotation_errors="keep"))
    assert [len(v.segments) for v in kept] == [1, 2]
