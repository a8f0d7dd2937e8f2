"""The decode-and-write tasks of `lofi prepare` on Ray, and what happens when their process dies.

`run_pipeline`: Ray Data, one block per part of `videos_per_part` videos ->
`map_batches(decode_batch)` -> `write_datasink(ShardSink)`, fused into one task per part (a
part's frames never leave the worker that decoded them). `decode_isolating_crashes` runs it so
that a video that kills its decoding process (a decoder segfault, an OOM kill) costs only
itself: see its docstring. Part records (`committed_ids`, `forget_failures`) are the commit
points of pipelines/data/shards.py.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import replace
from typing import Any

import pyarrow as pa
import ray
import ray.data
from ray.data import Datasink
from ray.data.block import BlockAccessor

from pipelines.data import shards
from pipelines.cluster import connect_ray
from pipelines.data.decode import decode_batch
from pipelines.data.prepare_config import PrepareConfig
from pipelines.storage import Location

# Test hook: the driver marks the item of this video id so that its decode kills the process
# (pipelines.data.decode._crash_test_hook), as a decoder segfault would; no real file is known to.
CRASH_TEST_ENV = "LOFI_TEST_CRASH_VIDEO"
# Ray's errors for a task whose process died (segfault, abort, OOM kill, lost node); any other
# error of a part's task is a bug of ours or of the environment (a full disk) and fails the run.
_PROCESS_DEATHS = (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError, ray.exceptions.NodeDiedError)


# 1. part records ----------------------------------------------------------------------------

def committed_ids(out: Location) -> set[str]:
    """Videos of the committed parts, written or failed: a plain rerun skips them."""
    return {vid for part in shards.committed_parts(out) for vid in part["video_ids"] + part["failed_ids"]}


def forget_failures(out: Location, video_ids: set[str]) -> None:
    """Drop these videos' failures from the committed part records, so that they count as not done.

    Before they are decoded again: a retry that lands then leaves no stale error behind, and a
    part of the same videos (the same name) is not mistaken for the retried task's own commit.
    A record left with neither videos nor failures is deleted.
    """
    for part in shards.committed_parts(out):
        if not video_ids & set(part["failed_ids"]):
            continue
        part["failed_ids"] = [vid for vid in part["failed_ids"] if vid not in video_ids]
        part["errors"] = [error for error in part["errors"] if error["video_id"] not in video_ids]
        path = out / shards.PARTS_DIR / f"{part['part']}.json"
        if part["video_ids"] or part["failed_ids"] or part["levels"]:
            path.write_json(part)  # atomic: the whole record or the old one
        else:
            path.delete()


# 2. the Ray Data pipeline --------------------------------------------------------------------

class ShardSink(Datasink):
    """Ray Data sink: each write task writes and commits one part (see shards.PartWriter)."""

    def __init__(self, out_dir: str, levels: list[dict[str, Any]], compression: str) -> None:
        self.out_dir, self.levels, self.compression = out_dir, levels, compression

    def write(self, blocks, ctx) -> dict[str, Any]:
        writer = shards.PartWriter(self.out_dir, self.levels, self.compression)
        for block in blocks:
            writer.add(BlockAccessor.for_block(block).to_arrow())
        record = writer.commit()
        return {"part": record["part"], "ok": len(record["video_ids"]), "failed": len(record["failed_ids"])}


def run_pipeline(cfg: PrepareConfig, items: list[dict[str, Any]], levels: list[dict[str, Any]]) -> None:
    """Decode and write `items` in parts of videos_per_part, num_workers tasks at a time."""
    connect_ray(cfg.ray)
    num_parts = math.ceil(len(items) / cfg.videos_per_part)
    options = {"resize": cfg.resize, "decode_threads": cfg.decode_threads,
               "duration_tolerance_sec": cfg.duration_tolerance_sec}
    # One block per part; map and write share the TaskPoolStrategy size so Ray fuses them
    # into one task per part: a part's rows never leave the worker that decoded them.
    workers = min(cfg.num_workers, num_parts)
    strategy = ray.data.TaskPoolStrategy(size=workers)
    ds = ray.data.from_items(items, override_num_blocks=num_parts)
    ds = ds.map_batches(decode_batch, batch_size=1, batch_format="pyarrow", compute=strategy,
                        fn_kwargs={"levels": levels, "options": options}, max_retries=0)
    # max_retries=0 (on both, or they do not fuse): Ray's default retries a task whose process
    # died forever; decode_isolating_crashes retries its videos instead, each once
    ds.write_datasink(ShardSink(cfg.output_location().uri, levels, cfg.compression), concurrency=workers,
                      ray_remote_args={"max_retries": 0})


# 3. decoding processes that die ----------------------------------------------------------------

class _TaskErrors(logging.Handler):
    """The errors of the parts' tasks that failed: with max_errored_blocks unlimited, Ray Data
    goes on and reports them only in its log, as the exception of an ERROR record."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])

    def raise_unless_deaths(self) -> None:
        """Re-raise the first error that is not a dead process: decoding alone would not cure it."""
        for error in self.errors:
            if not isinstance(error, _PROCESS_DEATHS):
                raise error

    def deaths(self) -> str:
        causes = {f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
                  for e in self.errors if isinstance(e, _PROCESS_DEATHS)}
        return "; ".join(sorted(causes)) or "Ray reported no cause"


def decode_isolating_crashes(cfg: PrepareConfig, items: list[dict[str, Any]], levels: list[dict[str, Any]]) -> None:
    """run_pipeline, surviving decoding processes that die (a decoder segfault, an OOM kill).

    A dead task loses its whole part, and Ray does not say which video killed it: the lost
    videos are decoded again one per task. Those that land were innocent; those that die again
    are committed as failed (stage `decode-crash`), so a plain rerun skips them and
    --retry-failed retries them. Each lost video gets one retry: enough for an OOM kill or a
    lost node, and a deterministic crash costs two decodes, not Ray's default endless retries
    (run_pipeline's tasks have max_retries=0).
    """
    context, errors = ray.data.DataContext.get_current(), _TaskErrors()
    saved, logger = context.max_errored_blocks, logging.getLogger("ray.data")
    context.max_errored_blocks = -1  # a dead task drops its own part only; the run goes on
    logger.addHandler(errors)
    try:
        with warnings.catch_warnings():
            # Ray 2.60 deprecates task options in map_batches' **ray_remote_args (run_pipeline's
            # max_retries) but names no replacement for max_retries yet: revisit on upgrading Ray
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            lost = _decode_and_find_lost(cfg, items, levels, errors)
            if lost:
                print(f"lofi prepare: {len(lost)} videos lost with their part's decoding process "
                      f"({errors.deaths()}); decoding them again one per task to find the one that kills it",
                      flush=True)
                lost = _decode_and_find_lost(replace(cfg, videos_per_part=1), lost, levels, errors)
    finally:
        context.max_errored_blocks = saved
        logger.removeHandler(errors)
    if lost:
        commit_crashes(cfg, levels, lost, errors.deaths())


def _decode_and_find_lost(cfg: PrepareConfig, items: list[dict[str, Any]], levels: list[dict[str, Any]],
                          errors: _TaskErrors) -> list[dict[str, Any]]:
    """Run the pipeline on `items`; return those in no committed part (their task failed)."""
    run_pipeline(cfg, items, levels)
    out = cfg.output_location()
    shards.remove_uncommitted(out, [level["name"] for level in levels])  # what dead tasks left behind
    done = committed_ids(out)
    lost = [item for item in items if item["video_id"] not in done]
    if lost:
        errors.raise_unless_deaths()
    return lost


def commit_crashes(cfg: PrepareConfig, levels: list[dict[str, Any]], items: list[dict[str, Any]], cause: str) -> None:
    """Commit `items` as failed with stage `decode-crash`, in one part record without files."""
    message = (f"the decoding process died on this video twice, the second time decoding it alone ({cause}; "
               "Ray reports no exit code or signal): a crash in the decoder (decord/ffmpeg: segfault, abort) or "
               "the process killed (out of memory); the Ray worker's python-core-worker-*.log holds its last "
               "output. Re-encode the file (ffmpeg -i IN -c:v libx264 OUT) and rerun with --retry-failed, or "
               "drop the video from the annotations")
    rows = [{**{key: item[key] for key in ("video_id", "subset", "path", "duration_sec")}, "stage": "decode-crash",
             "error": message, "decode_sec": 0.0} for item in items]
    writer = shards.PartWriter(cfg.output_location(), levels, cfg.compression)
    writer.add(pa.Table.from_pylist(rows, schema=shards.STAGING_SCHEMA))
    writer.commit()


def mark_crash_test(items: list[dict[str, Any]]) -> None:
    """The CRASH_TEST_ENV hook: read here, in the driver, since Ray's workers do not inherit its environment."""
    crash = os.environ.get(CRASH_TEST_ENV)
    if crash:
        for item in items:
            item["crash_test"] = item["video_id"] == crash
