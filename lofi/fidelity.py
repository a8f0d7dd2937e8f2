"""Fidelity levels and the schedules that pick one per training batch.

The snippet grid is the one time <-> index convention of the project: a video of
`duration_sec` is cut into `num_snippets` equal snippets, snippet t spanning
[t * d, (t + 1) * d) seconds with d = duration_sec / num_snippets, and its
`frames_per_snippet` frames sampled at the centres of F equal sub-bins of it.

Schedules (LoFi, Xu et al., NeurIPS 2021, Sec. 3). A schedule maps the training position
(epoch, global batch index) to the `FidelityLevel` that batch is decoded and encoded at:

- ``full``: always full fidelity (T=100, F=8, S=224); the reference that does not fit memory.
- ``s_lofi`` / ``t_lofi`` / ``st_lofi``: always the one reduced level (spatial, temporal or
  both); ``cycle`` and ``every_batches`` are irrelevant for these.
- ``c_lofi``: cycles S-LoFi -> T-LoFi -> ST-LoFi -> S-LoFi ... in that order (the order the
  issue gives for the paper; the paper text was not retrievable here to re-check it). A
  ``cycle: epoch`` schedule (the paper's "long" cycle) changes level at every epoch; a
  ``cycle: batches`` schedule (the "short" cycle) changes every ``every_batches`` (16) batches.
  An epoch of a short cycle is one pass over the training data at every level of the cycle
  (so it has as many steps as the levels' passes together, three times a one-level epoch),
  each level's data read only at its turns; when one level's pass ends before the others',
  its turns go to the next level in the cycle that still has data (`position(..., done)`).

Unlike multigrid training (Wu et al., 2020), which grows the mini-batch when the clip shrinks,
LoFi keeps the batch size constant across levels, so a schedule returns levels only and the
data loader's batch size never changes. The reduced levels are chosen so that every level fits
the same memory budget; bigger batches at low fidelity would defeat that.

Resume is exact because the level is a pure function of (epoch, global batch index, and within a
short cycle's epoch the levels whose pass is done): a trainer that saves its epoch and global
batch counter in the checkpoint and resumes at an epoch's start gets the same level sequence
after a restart. `state_dict` only records what the schedule is, so that resuming with a
different schedule is caught instead of silently changing the sequence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Collection, Literal

from lofi.errors import LofiError


@dataclass(frozen=True)
class FidelityLevel:
    """One fidelity: T snippets x F frames per snippet at S x S pixels.

    `spacing_snippets` G: a snippet's F frames are spaced as on a grid of G snippets, centred on
    the snippet (lofi.sampling). 0 (or T): they fill the snippet, so at fewer snippets the frames
    lie further apart. G = the full level's T: T-LoFi takes fewer snippets of the same short
    clips, and the encoder meets motion at the speed it meets it at full fidelity."""

    name: str
    num_snippets: int
    frames_per_snippet: int = 8
    size_px: int = 224
    spacing_snippets: int = 0

    def __post_init__(self) -> None:
        for key in ("num_snippets", "frames_per_snippet", "size_px"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.spacing_snippets and self.spacing_snippets < self.num_snippets:
            raise ValueError(f"spacing_snippets must be 0 (frames fill the snippet) or >= num_snippets "
                             f"({self.num_snippets}), got {self.spacing_snippets}")
        if not self.name:
            raise ValueError("name must not be empty")

    @property
    def frame_grid(self) -> int:
        """G: the grid whose frame spacing the level keeps (its own T when spacing_snippets is 0)."""
        return self.spacing_snippets or self.num_snippets

    @property
    def frames_key(self) -> tuple[int, int, int, int]:
        """What the level's shards hold, names aside: T, F, S and the frame grid G."""
        return self.num_snippets, self.frames_per_snippet, self.size_px, self.frame_grid

    def same_frames(self, other: "FidelityLevel") -> bool:
        """Whether both levels sample the same frames of a video (names aside)."""
        return self.frames_key == other.frames_key

    @property
    def frames_per_video(self) -> int:
        return self.num_snippets * self.frames_per_snippet

    def pixels_per_video(self) -> int:
        """Input pixels per video, the quantity encoder activation memory scales with."""
        return self.frames_per_video * self.size_px * self.size_px


# The paper's reference levels (Sec. 4): full fidelity and the three reduced ones.
PRESETS: dict[str, FidelityLevel] = {
    "full": FidelityLevel("full", num_snippets=100, frames_per_snippet=8, size_px=224),
    "s_lofi": FidelityLevel("s_lofi", num_snippets=100, frames_per_snippet=8, size_px=112),
    "t_lofi": FidelityLevel("t_lofi", num_snippets=25, frames_per_snippet=8, size_px=224),
    "st_lofi": FidelityLevel("st_lofi", num_snippets=50, frames_per_snippet=8, size_px=158),
}

# The order C-LoFi cycles through its levels.
C_LOFI_ORDER: tuple[str, ...] = ("s_lofi", "t_lofi", "st_lofi")

ScheduleKind = Literal["full", "s_lofi", "t_lofi", "st_lofi", "c_lofi"]


@dataclass(frozen=True)
class LevelOverride:
    """Replaces some fields of a preset level; a new name must give all three fields."""

    num_snippets: int | None = None
    frames_per_snippet: int | None = None
    size_px: int | None = None
    spacing_snippets: int | None = None  # frames spaced as on a grid of this many snippets (0: fill the snippet)


def resolve_level(name: str, overrides: dict[str, LevelOverride] | None = None) -> FidelityLevel:
    """The level called `name`: a preset with its override applied, or a level defined by one."""
    override = (overrides or {}).get(name, LevelOverride())
    changes = {k: v for k, v in dataclasses.asdict(override).items() if v is not None}
    if name in PRESETS:
        base = PRESETS[name]
    elif {"num_snippets", "frames_per_snippet", "size_px"} <= set(changes):
        base = FidelityLevel(name, **changes)
    else:
        missing = sorted({"num_snippets", "frames_per_snippet", "size_px"} - set(changes))
        raise LofiError(
            f"fidelity level {name!r} is not a preset ({', '.join(PRESETS)}); to define it, give "
            f"{', '.join(missing)} under its override (e.g. --set overrides.{name}.{missing[0]}=...)"
        )
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as err:
        raise LofiError(f"fidelity level {name!r}: {err}") from None


@dataclass(frozen=True)
class FidelityScheduleConfig:
    """Which levels training uses and when it switches between them."""

    kind: ScheduleKind = "c_lofi"
    cycle: Literal["epoch", "batches"] = "epoch"
    every_batches: int = 16
    overrides: dict[str, LevelOverride] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.every_batches < 1:
            raise ValueError(f"every_batches must be >= 1, got {self.every_batches}")
        unknown = sorted(set(self.overrides) - set(PRESETS))
        if unknown:
            raise ValueError(
                f"overrides for unknown level(s) {unknown}: a schedule uses only {list(PRESETS)}"
            )

    def __hash__(self) -> int:  # the dict field is not hashable; the plain-data form is
        return hash(repr(dataclasses.astuple(self)))


class FidelitySchedule:
    """Maps (epoch, global batch index) to the FidelityLevel of that batch."""

    def __init__(self, cfg: FidelityScheduleConfig) -> None:
        self.cfg = cfg
        names = C_LOFI_ORDER if cfg.kind == "c_lofi" else (cfg.kind,)
        self._cycle_levels = tuple(resolve_level(n, cfg.overrides) for n in names)

    def level_at(self, epoch: int, batch_index: int) -> FidelityLevel:
        """The level of batch `batch_index` (counted from the start of training, across
        epochs: the global batch counter a checkpoint saves) in epoch `epoch` (0-based)."""
        if epoch < 0 or batch_index < 0:
            raise ValueError(f"epoch and batch_index must be >= 0, got {epoch}, {batch_index}")
        return self._cycle_levels[self.position(epoch, batch_index)]

    def position(self, epoch: int, batch_index: int, done: Collection[int] = ()) -> int:
        """Index into `levels()` of the level in use; 0 for single-level schedules.

        `done`: positions whose pass over the data this epoch is complete (a short cycle reads each
        level's data once per epoch, and the levels' turns do not end together): the next level in
        cycle order that still has data is used instead."""
        count = len(self._cycle_levels)
        slot = epoch if self.cfg.cycle == "epoch" else batch_index // self.cfg.every_batches
        for step in range(count):
            if (slot + step) % count not in done:
                return (slot + step) % count
        raise ValueError(f"every level's data of epoch {epoch} is used up (done: {sorted(done)})")

    def levels(self) -> tuple[FidelityLevel, ...]:
        """The distinct levels the schedule uses, in cycle order (e.g. which shards to prepare)."""
        return self._cycle_levels

    def sequence(self, num_epochs: int, batches_per_epoch: int) -> list[list[str]]:
        """Level names per epoch and batch: a preview for logs and tests."""
        return [
            [self.level_at(e, e * batches_per_epoch + b).name for b in range(batches_per_epoch)]
            for e in range(num_epochs)
        ]

    def state_dict(self) -> dict[str, Any]:
        """What the schedule is; the position itself is derived from (epoch, batch_index)."""
        return {
            "kind": self.cfg.kind,
            "cycle": self.cfg.cycle,
            "every_batches": self.cfg.every_batches,
            "levels": [dataclasses.asdict(level) for level in self._cycle_levels],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that a checkpoint was trained with this schedule; resume is exact if so."""
        mine = self.state_dict()
        # every_batches only matters for a short cycle of several levels
        if not (mine["cycle"] == "batches" and len(self._cycle_levels) > 1):
            mine.pop("every_batches")
        diffs = [
            f"schedule.{key}: checkpoint has {state.get(key)!r}, config has {value!r}"
            for key, value in mine.items()
            if state.get(key) != value
        ]
        if diffs:
            raise LofiError(
                "the checkpoint was trained with another fidelity schedule ("
                + "; ".join(diffs)
                + "); resume with the checkpoint's schedule or start a new run"
            )
