"""Runs a killed job left RUNNING: a new run ends its namesakes as KILLED (Tracker.start), and
`close_running_children` ends a sweep's left-over children (pipelines/tracking/review.py).
Against the real SQLite store of conftest.py."""

from __future__ import annotations

import dataclasses

import pytest

from pipelines.tracking import Tracker, TrackingConfig, TrackingWarning, close_running_children


def _left_running(client, exp_id: str, name: str, parent=None, status: str | None = None) -> str:
    """A run as a killed job leaves it: created, never ended (unless `status`)."""
    tags = {"mlflow.parentRunId": parent} if parent else {}
    run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    if status:
        client.set_terminated(run_id, status)
    return run_id


def _statuses(client, run_ids: dict[str, str]) -> dict[str, str]:
    return {what: client.get_run(run_id).info.status for what, run_id in run_ids.items()}


@pytest.mark.slow
def test_a_new_run_ends_its_namesakes_left_running_as_killed(sqlite_uri, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(sqlite_uri)
    exp = client.create_experiment("replaced", artifact_location=str(tmp_path / "art"))
    sweep, other_sweep = _left_running(client, exp, "sweep"), _left_running(client, exp, "sweep2")
    runs = {"same name and parent": _left_running(client, exp, "w1/train", sweep),
            "another name": _left_running(client, exp, "w1/train_head", sweep),
            "another parent": _left_running(client, exp, "w1/train", other_sweep),
            "top level": _left_running(client, exp, "w1/train"),
            "ended": _left_running(client, exp, "w1/train", sweep, status="FINISHED")}
    runs["child of top level"] = _left_running(client, exp, "w1/train_head", runs["top level"])
    cfg = TrackingConfig(tracking_uri=sqlite_uri, experiment="replaced")

    with Tracker.start(cfg, "w1/train", parent_run_id=sweep) as rerun:
        assert _statuses(client, runs) == {"same name and parent": "KILLED", "another name": "RUNNING",
                                           "another parent": "RUNNING", "top level": "RUNNING", "ended": "FINISHED",
                                           "child of top level": "RUNNING"}
    killed = client.get_run(runs["same name and parent"])
    assert killed.data.tags["lofi.closed_by"] == "a new run of the same name started"
    assert killed.info.end_time is not None and "lofi.closed_by" not in client.get_run(runs["ended"]).data.tags
    # a top-level run replaces the top-level namesake (and its children, which died with it), nothing nested
    with Tracker.start(cfg, "w1/train") as top:
        pass
    assert _statuses(client, runs) == {"same name and parent": "KILLED", "another name": "RUNNING",
                                       "another parent": "RUNNING", "top level": "KILLED", "ended": "FINISHED",
                                       "child of top level": "KILLED"}
    assert _statuses(client, {"rerun": rerun.run_id, "top": top.run_id, "sweep": sweep}) == {
        "rerun": "FINISHED", "top": "FINISHED", "sweep": "RUNNING"}


@pytest.mark.slow
def test_close_running_children_ends_only_the_running_children_of_that_parent(sqlite_uri, tmp_path, dead_uri):
    from mlflow import MlflowClient

    client = MlflowClient(sqlite_uri)
    exp = client.create_experiment("sweep", artifact_location=str(tmp_path / "art"))
    sweep, other = _left_running(client, exp, "sweep"), _left_running(client, exp, "other")
    runs = {"trial 1": _left_running(client, exp, "t1", sweep), "trial 2": _left_running(client, exp, "t2", sweep),
            "done": _left_running(client, exp, "t3", sweep, status="FINISHED"),
            "other's": _left_running(client, exp, "t1", other), "sweep": sweep}
    runs["trial 2's stage"] = _left_running(client, exp, "t2/train", runs["trial 2"])
    cfg = TrackingConfig(tracking_uri=sqlite_uri, experiment="sweep")

    assert close_running_children(cfg, sweep, reason="ASHA stopped the trial") == 3
    assert _statuses(client, runs) == {"trial 1": "KILLED", "trial 2": "KILLED", "done": "FINISHED",
                                       "other's": "RUNNING", "sweep": "RUNNING", "trial 2's stage": "KILLED"}
    assert client.get_run(runs["trial 1"]).data.tags["lofi.closed_by"] == "ASHA stopped the trial"
    assert close_running_children(cfg, sweep) == 0
    assert close_running_children(dataclasses.replace(cfg, enabled=False), other) == 0
    assert client.get_run(runs["other's"]).info.status == "RUNNING"
    down = TrackingConfig(tracking_uri=dead_uri, timeout_sec=1.0)
    with pytest.warns(TrackingWarning, match=f"the children of run {other} were not closed"):
        assert close_running_children(down, other) == 0

