"""`lofi prepare` when a video kills its decoding process, and `--retry-failed`, on the shared Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lofi.config import from_dict
from lofi_cli.commands import main as lofi_main
from pipelines.data.prepare import PrepareConfig, run
from pipelines.data.prepare_tasks import CRASH_TEST_ENV
from pipelines.data.shards import MANIFEST, committed_parts, read_level_table

pytestmark = pytest.mark.ray


def intact_videos(synth: Path, tmp_path: Path) -> tuple[dict, list[str]]:
    """A prepare config over synth's intact videos only (its corrupt ones would fail every retry)."""
    database = json.loads((synth / "annotations.json").read_text())
    corrupt = set(json.loads((synth / "synth_summary.json").read_text())["corrupt_ids"])
    intact = sorted(vid for vid in database["database"] if vid not in corrupt)[:4]  # 2 parts of 2: fast
    database["database"] = {vid: database["database"][vid] for vid in intact}
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps(database))
    cfg = {"input": {"annotations": str(annotations), "videos": str(synth / "videos")}, "output": str(tmp_path / "out"),
           "levels": [{"name": "lo", "num_snippets": 4, "frames_per_snippet": 1, "size_px": 16}],
           "num_workers": 2, "videos_per_part": 2}
    return cfg, sorted(database["database"])


def test_a_video_that_kills_its_decoder_fails_alone_and_retry_failed_redoes_only_it(
        ray_cluster, synth_small, tmp_path, monkeypatch, capsys):
    cfg, ids = intact_videos(synth_small, tmp_path)
    out = Path(cfg["output"])
    crasher = ids[1]  # shares its part with ids[0]
    monkeypatch.setenv(CRASH_TEST_ENV, crasher)
    result = run(from_dict(PrepareConfig, cfg), verbose=False)
    (error,) = result.errors
    assert error["video_id"] == crasher and error["stage"] == "decode-crash" and "process died" in error["error"]
    assert "WorkerCrashedError" in error["error"]  # Ray's cause, as it reported it
    assert set(read_level_table(out, "lo", ["video_id"]).column("video_id").to_pylist()) == set(ids) - {crasher}
    assert (result.videos_ok, result.videos_failed) == (len(ids) - 1, 1)

    # a plain rerun skips the crasher, as any failed video; --retry-failed (hook off) decodes only it
    monkeypatch.delenv(CRASH_TEST_ENV)
    assert run(from_dict(PrepareConfig, cfg), verbose=False).videos_skipped == len(ids)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("lo/part-*.parquet")}
    records = [part for part in committed_parts(out) if part["video_ids"]]
    (tmp_path / "prepare.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert lofi_main(["prepare", "--config", str(tmp_path / "prepare.yaml"), "--retry-failed", "--quiet"]) == 0
    assert f"retrying 1 of the 1 videos that failed in the previous run: {crasher} (decode-crash)" in \
        capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["errors"] == [] and manifest["counts"]["videos_processed_this_run"] == 1
    assert manifest["counts"]["videos_ok"] == len(ids)
    assert set(read_level_table(out, "lo", ["video_id"]).column("video_id").to_pylist()) == set(ids)
    assert all(p.stat().st_mtime_ns == mtime and p.read_bytes() == data for p, (mtime, data) in before.items())
    assert all(part in committed_parts(out) for part in records)  # the other videos' records untouched
