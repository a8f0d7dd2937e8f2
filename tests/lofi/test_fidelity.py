"""Fidelity schedules: the documented level sequences, resume, config and state checks."""

from __future__ import annotations

import dataclasses

import pytest

from lofi.config import ConfigError, load_config
from lofi.errors import LofiError
from lofi.fidelity import (
    PRESETS,
    FidelityLevel,
    FidelitySchedule,
    FidelityScheduleConfig,
    LevelOverride,
    resolve_level,
)

S, T, ST = "s_lofi", "t_lofi", "st_lofi"


def test_presets_are_the_papers_levels():
    assert (PRESETS["full"].num_snippets, PRESETS["full"].frames_per_snippet, PRESETS["full"].size_px) == (100, 8, 224)
    assert PRESETS["s_lofi"].size_px == 112 and PRESETS["t_lofi"].num_snippets == 25
    assert PRESETS["full"].pixels_per_video() == 100 * 8 * 224 * 224


def test_long_c_lofi_changes_level_every_epoch():
    sched = FidelitySchedule(FidelityScheduleConfig(kind="c_lofi", cycle="epoch"))
    assert sched.sequence(num_epochs=4, batches_per_epoch=3) == [
        [S, S, S],
        [T, T, T],
        [ST, ST, ST],
        [S, S, S],
    ]


def test_short_c_lofi_changes_level_every_n_batches_across_epochs():
    sched = FidelitySchedule(FidelityScheduleConfig(kind="c_lofi", cycle="batches", every_batches=2))
    # global batches 0..9 -> slots 0,0,1,1,2,2,0,0,1,1: the cycle runs on over the epoch boundary
    assert sched.sequence(num_epochs=2, batches_per_epoch=5) == [
        [S, S, T, T, ST],
        [ST, S, S, T, T],
    ]
    default = FidelitySchedule(FidelityScheduleConfig(kind="c_lofi", cycle="batches"))
    names = [default.level_at(0, b).name for b in (0, 15, 16, 31, 32, 47, 48)]
    assert names == [S, S, T, T, ST, ST, S]


def test_a_short_cycle_gives_a_used_up_levels_turn_to_the_next_level_with_data():
    sched = FidelitySchedule(FidelityScheduleConfig(kind="c_lofi", cycle="batches", every_batches=2))
    assert sched.position(0, 2) == 1  # T's turn
    assert sched.position(0, 2, done={1}) == 2  # T's pass of the epoch is done: ST, the next in the cycle
    assert sched.position(0, 4, done={2}) == 0  # after ST comes S again
    assert sched.position(0, 4, done={0, 2}) == 1
    with pytest.raises(ValueError, match="every level's data of epoch 0 is used up"):
        sched.position(0, 4, done={0, 1, 2})


@pytest.mark.parametrize("kind", ["full", "s_lofi", "t_lofi", "st_lofi"])
@pytest.mark.parametrize("cycle", ["epoch", "batches"])
def test_single_level_schedules_never_change(kind, cycle):
    sched = FidelitySchedule(FidelityScheduleConfig(kind=kind, cycle=cycle, every_batches=1))
    assert sched.sequence(3, 4) == [[kind] * 4] * 3
    assert sched.levels() == (PRESETS[kind],)


def test_levels_lists_what_to_prepare():
    sched = FidelitySchedule(FidelityScheduleConfig(kind="c_lofi"))
    assert [lv.name for lv in sched.levels()] == [S, T, ST]
    assert sched.levels()[1] == FidelityLevel("t_lofi", 25, 8, 224)


def test_resume_is_exact():
    cfg = FidelityScheduleConfig(kind="c_lofi", cycle="batches", every_batches=3)
    before = FidelitySchedule(cfg)
    full_run = [before.level_at(e, e * 7 + b) for e in range(3) for b in range(7)]
    after = FidelitySchedule(cfg)  # a fresh process, restarted at epoch 1, global batch 9
    after.load_state_dict(before.state_dict())
    resumed = [after.level_at(e, e * 7 + b) for e in range(1, 3) for b in range(7) if e * 7 + b >= 9]
    assert resumed == full_run[9:]


def test_resuming_with_another_schedule_is_an_error():
    state = FidelitySchedule(FidelityScheduleConfig(kind="c_lofi", cycle="batches")).state_dict()
    with pytest.raises(LofiError, match=r"schedule.cycle: checkpoint has 'batches', config has 'epoch'"):
        FidelitySchedule(FidelityScheduleConfig(kind="c_lofi", cycle="epoch")).load_state_dict(state)
    other = FidelitySchedule(FidelityScheduleConfig(kind="c_lofi", cycle="batches",
                                                    overrides={"t_lofi": LevelOverride(num_snippets=20)}))
    with pytest.raises(LofiError, match="schedule.levels"):
        other.load_state_dict(state)


def test_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "sched.yaml"
    path.write_text("kind: c_lofi\ncycle: batches\noverrides:\n  st_lofi: {size_px: 160}\n")
    cfg = load_config(FidelityScheduleConfig, path, ["every_batches=8", "overrides.t_lofi.num_snippets=20"])
    sched = FidelitySchedule(cfg)
    assert [(lv.name, lv.num_snippets, lv.size_px) for lv in sched.levels()] == [
        (S, 100, 112), (T, 20, 224), (ST, 50, 160)]
    assert sched.level_at(0, 8).name == T
    with pytest.raises(ConfigError, match="kind"):
        load_config(FidelityScheduleConfig, None, ["kind=x_lofi"])
    with pytest.raises(ConfigError, match="unknown level"):
        load_config(FidelityScheduleConfig, None, ["overrides.huge.size_px=9"])
    with pytest.raises(ConfigError, match="valid keys.*num_snippets"):
        load_config(FidelityScheduleConfig, None, ["overrides.t_lofi.snippets=9"])


def test_resolve_level_defines_new_levels_only_when_complete():
    lvl = resolve_level("t50", {"t50": LevelOverride(num_snippets=50, frames_per_snippet=4, size_px=128)})
    assert lvl == FidelityLevel("t50", 50, 4, 128)
    with pytest.raises(LofiError, match="frames_per_snippet, size_px"):
        resolve_level("t50", {"t50": LevelOverride(num_snippets=50)})
    with pytest.raises(LofiError, match="size_px must be >= 1"):
        resolve_level("full", {"full": LevelOverride(size_px=0)})


def test_a_level_keeping_the_full_levels_frame_spacing_is_another_level_of_the_same_pixels():
    t_lofi = resolve_level("t_lofi", {"t_lofi": LevelOverride(num_snippets=25, spacing_snippets=100)})
    spread = resolve_level("t_lofi", {"t_lofi": LevelOverride(num_snippets=25)})
    assert (t_lofi.frame_grid, spread.frame_grid) == (100, 25)
    assert t_lofi.pixels_per_video() == spread.pixels_per_video()  # the same memory, other frames
    assert not t_lofi.same_frames(spread) and spread.same_frames(dataclasses.replace(spread, spacing_snippets=25))
    with pytest.raises(LofiError, match="spacing_snippets must be 0"):
        resolve_level("t_lofi", {"t_lofi": LevelOverride(num_snippets=25, spacing_snippets=10)})
