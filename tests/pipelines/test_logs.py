"""A long command's terminal shows lofi's own lines; Ray's and MLflow's go to the run folder's log file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import logging, os, sys, warnings
    import ray
    from pipelines.logs import output_to

    @ray.remote
    def worker():
        print("lofi train: epoch 1/1 | loss 1.0")          # a stage's progress line (worker stdout)
        print("worker noise on stderr", file=sys.stderr)  # e.g. a deprecation warning in a worker
        return 1

    with output_to(sys.argv[1], "lofi test"):
        logging.getLogger("ray").warning("driver-side ray warning")
        logging.getLogger("mlflow.store").warning("mlflow info line")
        warnings.warn("a python warning")
        os.write(2, b"C-level stderr line\\n")             # Ray's core worker writes to fd 2 itself
        print("lofi test: a line of our own on stderr", file=sys.stderr)
        ray.init(num_cpus=1, include_dashboard=False)
        assert ray.get(worker.remote()) == 1
        import time; time.sleep(2)                         # the driver prints worker output asynchronously
        print("lofi test: done")
""")


@pytest.mark.slow
def test_ray_and_mlflow_messages_go_to_the_log_file_and_lofi_lines_stay(tmp_path):
    log = tmp_path / "run" / "lofi.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "RAY_USAGE_STATS_ENABLED": "0",
                                            "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    terminal = proc.stdout + proc.stderr
    assert f"lofi test: Ray's and MLflow's own messages go to {log}" in proc.stdout
    assert "lofi train: epoch 1/1 | loss 1.0" in proc.stdout and "lofi test: done" in proc.stdout
    assert "lofi test: a line of our own on stderr" in proc.stderr
    written = log.read_text()
    for noise in ("driver-side ray warning", "mlflow info line", "a python warning", "C-level stderr line",
                  "worker noise on stderr"):
        assert noise in written and noise not in terminal, noise
