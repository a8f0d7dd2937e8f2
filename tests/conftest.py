"""Shared fixtures: the real data under ../shared/data and one local Ray cluster per session."""

from __future__ import annotations

import functools
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train V2's controller polls its workers every 2 s by default, and a fit waits for a few polls
# (start, each report, the end): 0.25 s cut a 2-fit test from 35 s to 26 s here. Tests run ~30 fits;
# real jobs keep Ray's default. Set in this process once the session's cluster has started
# (`ray_cluster`): a TorchTrainer hands it from its own process to its controller. The sweep test
# removes it while it runs (tests/tuning/test_sweep.py): with fast polls its trials end before the
# kill it aims at them lands, and ASHA's rungs see another sequence.
TRAIN_POLL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real ActivityNet-1.3 / THUMOS14 annotation files (read-only, no videos)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is missing")
    return SHARED_DATA


S3_BUCKET = "lofi-test"


@functools.cache
def s3_environment() -> dict[str, str]:
    """The loopback S3 server's endpoint and credentials, set in this process's environment.

    A port is reserved now and the server (`s3_server`) starts on it only when a test needs it;
    `ray_cluster` calls this before `ray.init`, so the Ray workers (started with the raylet,
    which inherits this environment) reach the same server whichever fixture comes first."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "lofi-test",
           "AWS_SECRET_ACCESS_KEY": "lofi-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        os.environ.pop(name, None)  # a developer's own settings would win over the test server's
    os.environ.update(env)
    return env


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto's, from the registry package `moto[server]`) on loopback
    for the session, with bucket `lofi-test`; returns `s3://lofi-test`. Endpoint and credentials
    are in the environment (`s3_environment`), where pyarrow, boto3 and MLflow read them."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    env = s3_environment()
    port = int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=S3_BUCKET)
    yield f"s3://{S3_BUCKET}"
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session: starting one costs seconds here.

    With its dashboard, as `lofi` starts one: Ray's state API lives there, and Ray Train's
    placement-group cleaner needs it to free the CPUs of a run whose controller was killed
    (a Tune trial stopped by ASHA); without it they stay reserved and later runs hang."""
    import ray

    s3_environment()  # before the raylet starts: its workers inherit the environment
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            object_store_memory=1024**3,
            log_to_driver=False,
            configure_logging=False,
        )
    os.environ.setdefault(*TRAIN_POLL)  # after the raylet started: see TRAIN_POLL
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """`lofi synth` output: 6 intact videos of 20-40 s at 64 px, 10 fps, plus 3 corrupt files.

    Shared read-only by the preprocessing tests; copy it before changing anything.
    """
    from lofi_cli.commands import main

    out = tmp_path_factory.mktemp("synth") / "small"
    argv = ["synth", str(out), "--videos", "6", "--seed", "3", "--size-px", "64", "--fps", "10", "--corrupt", "3",
            "--min-duration-sec", "20", "--max-duration-sec", "40", "--quiet"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="session")
def tiny_tal_videos(tmp_path_factory) -> Path:
    """`lofi synth` output of 6 short 32 px videos (4 training, 2 validation) with 2-4 s instances:
    the data of the tests that run whole jobs (`lofi pipeline`, `lofi sweep`). Read-only."""
    from lofi_cli.commands import main

    out = tmp_path_factory.mktemp("tiny_tal") / "data"
    assert main(["synth", str(out), "--videos", "6", "--seed", "11", "--size-px", "32", "--val-fraction", "0.34",
                 "--min-duration-sec", "12", "--max-duration-sec", "16", "--set", "min_instance_sec=2",
                 "--set", "max_instance_sec=4", "--quiet"]) == 0
    return out
