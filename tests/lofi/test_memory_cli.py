"""`lofi plan-memory`: the planner's rows against budgets worked out from the measured bytes,
and the command itself run through `pipelines.cli.main`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lofi.config import load_config
from lofi.memory import GIB
from lofi.memory_cli import PlanMemoryConfig, run
from pipelines.cli import main as lofi_main

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "deploy" / "configs" / "plan_memory" / "smoke.yaml"

TINY = [
    "model.width=8", "head.hidden=16", "head.cardinality=4", "num_classes=3",
    "levels=[big, small]",
    "level_overrides.big={num_snippets: 4, frames_per_snippet: 2, size_px: 32}",
    "level_overrides.small={num_snippets: 4, frames_per_snippet: 2, size_px: 16}",
    "amp=[none]",
]


@pytest.fixture(scope="module")
def tiny_rows():
    return run(load_config(PlanMemoryConfig, None, TINY))


def test_rows_cover_every_level_and_switch(tiny_rows):
    assert [(r.level.name, r.checkpointing, r.amp) for r in tiny_rows] == [
        ("big", False, "none"), ("big", True, "none"), ("small", False, "none"), ("small", True, "none")]
    big, big_ckpt, small, _ = tiny_rows
    assert (big.level.num_snippets, big.level.frames_per_snippet, big.level.size_px) == (4, 2, 32)
    # a quarter of the pixels costs less; checkpointing keeps fewer activations
    assert small.memory.peak_bytes(1) < big.memory.peak_bytes(1)
    assert big_ckpt.memory.saved_bytes(1) < big.memory.saved_bytes(1)
    assert big_ckpt.memory.activation_peak_bytes(1) < big.memory.activation_peak_bytes(1)


def test_max_batch_against_budgets_worked_out_by_hand(tiny_rows):
    for row in tiny_rows:
        mem, static = row.memory, row.static_bytes
        # exactly the room for 3 videos, one byte short of it, and one byte short of 1 video
        assert mem.max_batch(static + mem.peak_bytes(3), static) == 3
        assert mem.max_batch(static + mem.peak_bytes(3) - 1, static) == 2
        assert mem.max_batch(static + mem.peak_bytes(1) - 1, static) == 0
        # the default budget (16 GiB) holds row.max_batch of these tiny videos, not one more
        assert static + mem.peak_bytes(row.max_batch) <= 16 * GIB < static + mem.peak_bytes(row.max_batch + 1)


def test_amp_rows_run_on_cpu():
    # at 64 px the activations outweigh autocast's bf16 copies of the weights (which count)
    rows = run(load_config(PlanMemoryConfig, None, [*TINY, "levels=[big]", "level_overrides.big.size_px=64",
                                                    "amp=[none, bf16]", "checkpointing=[false]"]))
    fp32, bf16 = rows
    assert bf16.amp == "bf16" and bf16.memory.saved_bytes(1) < fp32.memory.saved_bytes(1)


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
