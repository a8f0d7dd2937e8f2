"""`lofi plan-memory` as a user runs it, through the `lofi` entry point: its options, the smoke
config's table against a budget worked out from the planner's bytes, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lofi.config import load_config
from lofi.memory import GIB
from lofi.memory_plan import PlanMemoryConfig, run
from lofi_cli.commands import main as lofi_main

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "deploy" / "configs" / "plan_memory" / "smoke.yaml"


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lofi_main(["plan-memory", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--set", "--budget-gb", "--save-config", "--quiet", "level_overrides", "probe_snippets",
                   "checkpointing", "amp", "headroom_gb", "optimizer_states", "device"):
        assert option in out


def test_smoke_config_through_the_cli(tmp_path, capsys):
    rows = run(load_config(PlanMemoryConfig, SMOKE))
    small = [r for r in rows if r.level.name == "tiny_s"]
    large = [r for r in rows if r.level.name == "tiny_full"]
    # a budget that holds one tiny_s video in every row, but not one tiny_full video
    budget = max(r.static_bytes + r.memory.peak_bytes(1) for r in small) + 1024
    assert all(r.static_bytes + r.memory.peak_bytes(1) > budget for r in large)
    saved = tmp_path / "resolved.yaml"
    assert lofi_main(["plan-memory", "--config", str(SMOKE), "--budget-gb", repr(budget / GIB), "--quiet",
                      "--save-config", str(saved)]) == 0
    table = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("tiny_"):
            name, _t, _f, _s, ckpt, _amp, *_, fit = line.split(maxsplit=9)
            table[(name, ckpt)] = fit.split()[-1] if "no fit" not in fit else "none"
    assert len(table) == 3 * 2  # levels x checkpointing
    assert table[("tiny_full", "no")] == table[("tiny_full", "yes")] == "none"
    assert all(int(table[("tiny_s", ckpt)]) >= 1 for ckpt in ("no", "yes"))
    assert yaml.safe_load(saved.read_text())["budget_gb"] == pytest.approx(budget / GIB)


def test_user_errors_name_the_key(capsys):
    assert lofi_main(["plan-memory", "--set", "levels=[huge]", "--quiet"]) == 2
    assert "fidelity level 'huge' is not a preset" in capsys.readouterr().err
    assert lofi_main(["plan-memory", "--set", "amp=[fp16]", "--quiet"]) == 2
    assert "fp16 autocast needs device: cuda" in capsys.readouterr().err
    assert lofi_main(["plan-memory", "--set", "budget=3", "--quiet"]) == 2
    assert "valid keys" in capsys.readouterr().err
