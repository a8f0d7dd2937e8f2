"""What the tracking tests share: a real `mlflow server` on loopback, a real SQLite store, and a
config shaped like a stage's.

Creating an MLflow database costs ~10 s on this machine (schema migrations), so one SQLite store
and one server serve all of tests/pipelines/tracking (session scope: they stop when the session
ends), each test in its own experiment; the server starts first so that its boot overlaps the
SQLite tests. Runs are read back with MlflowClient, never through the tracker.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MLFLOW_BIN = Path(sys.executable).parent / "mlflow"

# 130 + 4 leaves: more params than MLflow sends in one request (100).
Big = dataclasses.make_dataclass("Big", [(f"f{i}", int, dataclasses.field(default=i)) for i in range(130)], frozen=True)


@dataclass(frozen=True)
class Long:
    text: str = "y" * 7000  # over MLflow's 6000-char param limit
    sizes: tuple[int, ...] = (1, 2, 3)
    note: str | None = None


@dataclass(frozen=True)
class StageConfig:
    big: Big = field(default_factory=Big)
    long: Long = field(default_factory=Long)
    seed: int = 7


@pytest.fixture
def stage_config() -> StageConfig:
    """A config shaped like a stage's (dataclasses.replace it for another value)."""
    return StageConfig()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dead_uri() -> str:
    """A tracking URI where nothing listens: every connection is refused."""
    return f"http://127.0.0.1:{_free_port()}"


@pytest.fixture(scope="session")
def server_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [str(MLFLOW_BIN), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/x.db", "--artifacts-destination", str(root / "art")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: uvicorn runs as a child
    )
    yield proc, f"http://127.0.0.1:{port}", root / "server.log"
    # SIGTERM would wait on the test's idle keep-alive connections; the store is thrown away anyway.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()


@pytest.fixture(scope="session")
def server_uri(server_process) -> str:
    proc, uri, log = server_process
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return uri
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer /health in 120 s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def sqlite_uri(tmp_path_factory, server_process) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite-store')}/mlflow.db"


@pytest.fixture
def runs_by_name():
    """runs_by_name(uri, experiment) -> {run name: the run, as MLflow stores it}."""
    from mlflow import MlflowClient

    def read(uri: str, experiment: str) -> dict:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        return {run.info.run_name: run for run in client.search_runs([exp.experiment_id])}

    return read
