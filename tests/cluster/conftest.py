"""A real Ray cluster for the job tests: `ray start --head` and a second node with
`ray start --address`, token authentication on, an MLflow tracking server, all on loopback.

Everything runs as separate processes started the way deploy/README.md says, with the
project's virtualenv first on PATH (the image's `lofi` on a real cluster). The token is
generated on the client side (`ray get-auth-token --generate` into a private HOME) and handed
to the nodes and to every `ray job` call by file (RAY_AUTH_TOKEN_PATH). Nodes are started with
`--block` in their own process groups, so stopping them touches nothing else on the machine
(the test session's own Ray cluster keeps running; `ray stop` would kill it).
"""

from __future__ import annotations

import os
import re
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: ray, lofi, mlflow
START_TIMEOUT_SEC = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayJobCluster:
    """Handles of the running cluster and the `ray job` CLI against it."""

    root: Path
    env: dict[str, str]  # the client's environment: RAY_ADDRESS, token mode and file
    dashboard: str
    tracking_uri: str
    pause_file: Path  # written by the first training run that reaches epoch 1 (see below)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def ray(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """`ray ARGS` from the repository root, as a user at their checkout runs it."""
        proc = subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n"
                                 f"{proc.stderr[-4000:]}")
        return proc

    def submit(self, *entrypoint: str, wait: bool = True, timeout: float = 600) -> tuple[str, str]:
        """deploy/README.md's submission; (job id, the job's output when waited for)."""
        argv = ["job", "submit", "--runtime-env", "deploy/runtime_env.yaml", "--working-dir", "."]
        if not wait:
            argv.append("--no-wait")
        proc = self.ray(*argv, "--", *entrypoint, timeout=timeout, check=False)
        text = proc.stdout + proc.stderr
        match = re.search(r"Job '(raysubmit_\w+)'", text)
        assert match, f"no job id in the output of ray job submit:\n{text[-4000:]}"
        if wait:
            assert proc.returncode == 0, f"job {' '.join(entrypoint)} failed:\n{text[-6000:]}"
        return match.group(1), text

    def status(self, job_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        out = self.ray("job", "status", job_id).stdout
        match = re.search(r"Status for job '[^']+': (\w+)", out) or re.search(r"Job '[^']+' (?:was )?(\w+)", out)
        assert match, out
        return match.group(1).upper()

    def logs(self, job_id: str) -> str:
        return self.ray("job", "logs", job_id).stdout

    def runs(self, experiment: str) -> list:
        """Every run of an experiment on the cluster's tracking server."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)

    def stop_nodes(self, session_root: Path) -> None:
        """Kill the nodes' process groups, then anything still running from their session folder
        (Ray's workers). Not SIGTERM: `ray start --block` then drains for 30 s, for nothing here."""
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        subprocess.run(["pkill", "-9", "-f", str(session_root)], check=False)


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(what: str, ready, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SEC
    while time.monotonic() < deadline:
        if ready():
            return
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: {proc.args[:3]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    raise RuntimeError(f"{what} not ready after {START_TIMEOUT_SEC} s; logs in {logs}")


def _http_up(url: str) -> bool:
    """The server answers (a 401 of the token-protected dashboard counts: it is up)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def ray_job_cluster(tmp_path_factory):
    """A 2-node token-authenticated Ray cluster (head: 2 CPUs, worker: 1 CPU) and an MLflow server.

    Module-scoped: a second Ray cluster on the machine makes Ray's address auto-detection (a
    plain `ray.init()` in other tests' subprocesses) refuse to choose, so it must be gone
    before the next module runs."""
    root = tmp_path_factory.mktemp("cluster")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    base.update(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                MLFLOW_DISABLE_TELEMETRY="true")
    # 1. the token, generated on the client and kept in a file that the nodes are given
    client_home = root / "client-home"
    client_home.mkdir()
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env={**base, "HOME": str(client_home)},
                   check=True, capture_output=True)
    token_file = client_home / ".ray" / "auth_token"
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    # 2. the tracking server the cluster's jobs log to (a database backend, artifacts it serves)
    mlflow_port = free_port()
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    mlflow_log = root / "mlflow.log"
    mlflow = _spawn([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                     "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                     "--artifacts-destination", str(root / "mlartifacts")], base, mlflow_log)
    # 3. the nodes: the tracking server is a property of the cluster, set in the nodes' environment.
    # LOFI_TEST_PAUSE (pipelines/trainer): the first training run of the cluster to reach epoch 1
    # writes its worker's PID to pause_file and waits there, so a test can stop its job at a known
    # point (after exactly one checkpoint); once the file exists no run pauses.
    gcs, dashboard = free_port(), free_port()
    pause_file = root / "train.paused"
    node_env = {**base, **auth, "MLFLOW_TRACKING_URI": tracking_uri, "LOFI_TEST_PAUSE": f"1:{pause_file}",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}  # the jobs' fits poll fast: tests/conftest.py TRAIN_POLL
    common = ["--block", "--disable-usage-stats"]
    # Ray's session folder holds UNIX sockets, whose paths must stay under 108 bytes. Each node
    # has its own (as on separate machines): nodes sharing one unpack the same job packages into
    # the same folder, and one node replacing it pulls the working directory from under the other's job.
    ray_tmp = Path(tempfile.mkdtemp(prefix="lofi-ray-", dir="/tmp"))
    head_log, worker_log = root / "head.log", root / "worker.log"
    head = _spawn([str(BIN / "ray"), "start", "--head", *common, "--port", str(gcs),
                   "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                   "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                   "--num-cpus", "2", "--object-store-memory", str(400 * 2**20), "--temp-dir", str(ray_tmp)],
                  node_env, head_log)
    cluster = RayJobCluster(root=root, env={**base, **auth, "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}"},
                            dashboard=f"http://127.0.0.1:{dashboard}", tracking_uri=tracking_uri, pause_file=pause_file,
                            procs=[mlflow, head])
    try:
        _wait_for("the Ray head", lambda: _http_up(f"{cluster.dashboard}/api/version"), [head], [head_log])
        worker = _spawn([str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", *common,
                         "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", "1",
                         "--object-store-memory", str(300 * 2**20), "--temp-dir", str(ray_tmp / "w")],
                        node_env, worker_log)
        cluster.procs.append(worker)

        def both_nodes_up() -> bool:
            out = cluster.ray("status", f"--address=127.0.0.1:{gcs}", check=False).stdout
            return "0.0/3.0 CPU" in out

        _wait_for("the second node", both_nodes_up, [head, worker], [head_log, worker_log])
        _wait_for("the MLflow server", lambda: _http_up(f"{tracking_uri}/health"), [mlflow], [mlflow_log])
        yield cluster
    finally:
        cluster.stop_nodes(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)

