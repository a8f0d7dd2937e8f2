"""The memory planner (`lofi.memory_plan.run`, what `lofi plan-memory` prints): its rows against budgets
worked out from the measured bytes. The command itself: tests/lofi_cli/test_plan_memory.py."""

from __future__ import annotations

import pytest

from lofi.config import load_config
from lofi.memory import GIB
from lofi.memory_plan import PlanMemoryConfig, run

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
