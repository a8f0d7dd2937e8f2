"""Synthesis over worker processes: every video (or clip) is drawn from its own seed, so the files are
the same whatever the number of workers; `lofi synth` and `lofi synth-clips` take `--workers`."""

from __future__ import annotations

import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class CpuClock:
    """CPU seconds of this process and of the worker processes it waited for (the fair figure on a shared machine)."""

    def __init__(self) -> None:
        self.start = self._now()

    @staticmethod
    def _now() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    def seconds(self) -> float:
        return self._now() - self.start


def map_items(fn: Callable[[Any], Any], items: list[Any], workers: int, desc: str, unit: str,
              progress: bool) -> Iterator[Any]:
    """fn over items in order, on `workers` processes (spawned: the caller may hold threads or Ray); 1: here."""
    bar: Iterable[Any]
    if workers <= 1 or len(items) < 2:
        bar = map(fn, items)
        yield from tqdm(bar, total=len(items), desc=desc, unit=unit, disable=None if progress else True)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=context) as pool:
        results = pool.map(fn, items, chunksize=max(1, len(items) // (workers * 8)))
        yield from tqdm(results, total=len(items), desc=desc, unit=unit, disable=None if progress else True)
