"""The tuning split: training videos held out for every choice, so validation is scored only at the end.

Levels, recipes and sweeps are chosen on videos that neither train the model nor enter the
reported score. `TuningSplit` takes a fixed share of one subset's videos (the training videos)
and gives them the subset name "tuning": the same videos for the same seed and video list
(ranked by a hash of the seed and the id, not by the list's order), other videos for another
seed. `lofi prepare` applies it when the shards are written (their `subset` column says
"tuning", so every stage that trains on `data.train_subset` leaves them out) and records the
chosen ids in the manifest; scoring against an annotation file relabels the same ids
(`relabel`), so ground truth and shards agree even where loading dropped some entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Iterable

from lofi.annotations.types import AnnotationSet

TUNING_SUBSET = "tuning"


@dataclass(frozen=True)
class TuningSplit:
    fraction: float = 0.0  # share of the source subset's videos held out (rounded to whole videos); 0: none
    seed: int = 0
    source: str = "training"  # the subset the tuning videos are taken from

    def __post_init__(self) -> None:
        if not 0 <= self.fraction < 1:
            raise ValueError(f"tuning fraction (tuning_fraction) must be in [0, 1) (0: no tuning split), "
                             f"got {self.fraction}")

    def choose(self, video_ids: Iterable[str]) -> tuple[str, ...]:
        """The held-out ids among `video_ids` (the source subset's), sorted: round(fraction * n) of them."""
        ids = sorted(set(video_ids))
        count = round(self.fraction * len(ids))
        ranked = sorted(ids, key=lambda vid: hashlib.sha1(f"{self.seed}:{vid}".encode()).hexdigest())
        return tuple(sorted(ranked[:count]))

    def apply(self, annotations: AnnotationSet) -> tuple[AnnotationSet, tuple[str, ...]]:
        """The annotations with the chosen videos' subset set to "tuning", and their ids."""
        chosen = self.choose(v.video_id for v in annotations.videos if v.subset == self.source)
        return relabel(annotations, chosen), chosen


def relabel(annotations: AnnotationSet, tuning_ids: Iterable[str]) -> AnnotationSet:
    """The annotations with the given videos moved to the "tuning" subset (ids not there are ignored)."""
    chosen = set(tuning_ids)
    if not chosen:
        return annotations
    videos = tuple(dataclasses.replace(v, subset=TUNING_SUBSET) if v.video_id in chosen else v
                   for v in annotations.videos)
    return dataclasses.replace(annotations, videos=videos)
