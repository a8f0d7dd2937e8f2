"""A sweep's search space as data: dotted config keys -> one of grid, choice, uniform, loguniform.

    space:
      fidelity.kind: {grid: [s_lofi, c_lofi]}          # every value, crossed with the other grids
      fidelity.overrides.s_lofi.size_px: {choice: [32, 40, 48]}
      train.lr: {loguniform: [1.0e-4, 3.0e-3]}
      train.encoder_lr_scale: {uniform: [0.05, 0.5]}

As in Ray Tune: the grid keys form a cross product, each grid point is repeated
`num_samples` times, and the other keys are drawn independently for every trial. The points
are drawn here, up front and from `search.seed`, rather than inside Tune: every trial's
configuration is then known before anything starts, so the memory planner can keep those that
do not fit the budget from being launched, and a resumed sweep runs exactly the same points.
Keys are the dotted paths `--set` takes; each is applied with the same override function.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lofi.config import ConfigError

KINDS = ("grid", "choice", "uniform", "loguniform")


@dataclass(frozen=True)
class Param:
    key: str  # dotted config path
    kind: str  # one of KINDS
    values: tuple[Any, ...]  # grid/choice: the values; uniform/loguniform: (low, high)

    def draw(self, rng: np.random.Generator) -> Any:
        if self.kind == "choice":
            return self.values[int(rng.integers(len(self.values)))]
        low, high = self.values
        if self.kind == "uniform":
            return float(rng.uniform(low, high))
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def parse_space(space: dict[str, Any]) -> list[Param]:
    """Validate the `space` section; every problem names its key and the fix, all at once."""
    if not space:
        raise ConfigError("space is empty: give at least one dotted config key, e.g. "
                          "space: {fidelity.kind: {grid: [s_lofi, c_lofi]}}")
    params, problems = [], []
    for key, spec in space.items():
        try:
            params.append(_param(key, spec))
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError(f"space: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return params


def _param(key: str, spec: Any) -> Param:
    where = f"space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{where}: expected one of {{grid: [...]}}, {{choice: [...]}}, {{uniform: [low, high]}}, "
                          f"{{loguniform: [low, high]}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        return Param(key, kind, tuple(values))
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}.{kind}: expected [low, high] numbers, got {values!r}")
    low, high = float(values[0]), float(values[1])
    if not low < high:
        raise ConfigError(f"{where}.{kind}: low {low:g} must be below high {high:g}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.loguniform: low must be > 0 (a log scale), got {low:g}; use uniform for ranges "
                          "that include 0")
    return Param(key, kind, (low, high))


def sample_points(params: list[Param], num_samples: int, seed: int) -> list[dict[str, Any]]:
    """The trials' overrides (dotted key -> value), in the order they are launched."""
    if num_samples < 1:
        raise ConfigError(f"search.num_samples must be >= 1, got {num_samples}")
    rng = np.random.default_rng(seed)
    grid = [p for p in params if p.kind == "grid"]
    drawn = [p for p in params if p.kind != "grid"]
    points = []
    for _ in range(num_samples):
        for combo in itertools.product(*(p.values for p in grid)):
            point = dict(zip((p.key for p in grid), combo))
            point.update({p.key: p.draw(rng) for p in drawn})
            points.append({p.key: point[p.key] for p in params})  # the space's key order
    return points
